"""Cell features and the second-stage rescorer, on real IML_Malaria fields and the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from malaria_screen.smear.evaluate import load_iml_annotations

TRAIN = slice(0, 24)  # contiguous frames (blocks of neighbouring fields), 38 infected boxes
HELD_OUT = slice(24, 36)  # the next 12 fields, 18 infected boxes


@pytest.fixture(scope="module")
def iml(iml_dir):
    from malaria_screen.inference import load_model
    from malaria_screen.smear.rescore import collect_rescorer_data

    ann = load_iml_annotations(iml_dir / "annotations.json")
    names = sorted(ann)
    model = load_model(None)
    data = collect_rescorer_data(iml_dir / "images", ann, model, names=names[TRAIN.start:HELD_OUT.stop])
    stems = [Path(n).stem for n in names]
    return {"ann": ann, "names": names, "model": model, "data": data,
            "train": data.subset(set(stems[TRAIN])), "test": data.subset(set(stems[HELD_OUT]))}


def test_features_shape_and_errors(iml_dir):
    from malaria_screen.data.io import decode_image
    from malaria_screen.smear.features import FEATURE_NAMES, cell_features
    from malaria_screen.smear.segment import segment_field

    rgb = decode_image(iml_dir / "images" / "PA172016.JPG")
    seg = segment_field(rgb)
    cells = seg.cells()
    x = cell_features(rgb, seg.labels, cells)
    assert x.shape == (len(cells), len(FEATURE_NAMES)) and x.dtype == np.float32 and np.isfinite(x).all()
    assert cell_features(rgb, seg.labels, []).shape == (0, len(FEATURE_NAMES))
    with pytest.raises(ValueError, match="RGB"):
        cell_features(rgb[..., 0], seg.labels, cells)
    with pytest.raises(ValueError, match="do not match"):
        cell_features(rgb, seg.labels[:-1], cells)


def test_parasite_colour_feature_ranks_infected_cells(iml):
    """The darkest red-absorbing (basophilic) interior pixels single out infected cells on their own."""
    from malaria_screen.smear.features import FEATURE_NAMES

    d = iml["data"]
    j = FEATURE_NAMES.index("inner_exR_q99")
    assert d.y.sum() >= 40 and len(d.y) > 2000
    assert roc_auc_score(d.y, d.X[:, j]) > 0.85
    assert roc_auc_score(d.y, d.X[:, FEATURE_NAMES.index("border")]) < 0.7  # not every column is informative


def test_rescorer_beats_the_nih_model_on_held_out_fields(iml):
    """Fitted on 24 fields, it ranks the cells of the next 12 fields better than the NIH-only model's own logit."""
    from malaria_screen.smear.rescore import CellRescorer

    tr, te = iml["train"], iml["test"]
    assert not set(tr.groups.tolist()) & set(te.groups.tolist())
    r = CellRescorer().fit(tr.X, tr.y, tr.groups)
    p = r.predict_proba(te.X)
    auc_r, auc_cnn = roc_auc_score(te.y, p), roc_auc_score(te.y, te.X[:, -1])
    assert auc_r > 0.93 and auc_r > auc_cnn + 0.02, (auc_r, auc_cnn)
    assert 0 < r.threshold < 1 and r.config.n_fields == 24 and r.config.n_parasitized == int(tr.y.sum())
    called = int((p >= r.threshold).sum())
    assert 0.4 * te.y.sum() <= called <= 2.5 * te.y.sum()  # count-matched threshold: about as many calls as infected


def test_flat_trees_equal_sklearn_and_survive_save_load(iml, tmp_path):
    from malaria_screen.smear.rescore import CellRescorer, is_rescorer_dir

    tr, te = iml["train"], iml["test"]
    r = CellRescorer(max_iter=60).fit(tr.X, tr.y, tr.groups)
    ref = r._estimator().fit(tr.X, tr.y).predict_proba(te.X)[:, 1]  # deterministic: same trees
    np.testing.assert_allclose(r.predict_proba(te.X), ref, rtol=0, atol=1e-12)
    r.save(tmp_path / "r")
    assert is_rescorer_dir(tmp_path / "r") and not is_rescorer_dir(tmp_path)
    r2 = CellRescorer.load(tmp_path / "r")
    assert r2.threshold == r.threshold and r2.config.feature_names == r.config.feature_names
    np.testing.assert_array_equal(r2.predict_proba(te.X), r.predict_proba(te.X))
    with pytest.raises(ValueError, match="rescorer inputs"):
        r2.predict_proba(te.X[:, :-1])
    (tmp_path / "r" / "rescorer.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception):
        CellRescorer.load(tmp_path / "r")
    with pytest.raises(FileNotFoundError):
        CellRescorer.load(tmp_path)


def test_fit_refuses_data_it_cannot_use(iml):
    from malaria_screen.smear.rescore import CellRescorer

    tr = iml["train"]
    with pytest.raises(ValueError, match="both"):
        CellRescorer().fit(tr.X, np.zeros(len(tr.y)), tr.groups)
    with pytest.raises(ValueError, match="2 fields"):
        CellRescorer().fit(tr.X, tr.y, np.full(len(tr.y), "one"))
    with pytest.raises(ValueError, match="rescorer inputs"):
        CellRescorer().fit(tr.X[:, :5], tr.y, tr.groups)


def test_cli_fits_a_rescorer_and_smear_uses_it(iml, iml_dir, tmp_path):
    """`rescorer` on a list of fields, then `smear --rescorer` on a held-out field: each cell's
    p_parasitized is the rescorer's, and labels follow the rescorer's threshold."""
    from typer.testing import CliRunner

    from malaria_screen.cli import app
    from malaria_screen.data.io import decode_image
    from malaria_screen.smear.crops import cell_crops
    from malaria_screen.smear.rescore import CellRescorer
    from malaria_screen.smear.segment import segment_field

    names = iml["names"]
    (tmp_path / "fields.txt").write_text("\n".join(names[TRAIN]) + "\n")
    runner = CliRunner()
    res = runner.invoke(app, ["rescorer", str(iml_dir / "images"), "--annotations", str(iml_dir / "annotations.json"),
                              "--fields", str(tmp_path / "fields.txt"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "24 field(s)" in res.output
    r = CellRescorer.load(tmp_path / "r")
    field = names[HELD_OUT][0]
    rgb = decode_image(iml_dir / "images" / field)
    seg = segment_field(rgb)
    cells = seg.cells()
    expect = r.rescore_field(rgb, seg, cells, iml["model"].predict(cell_crops(rgb, seg.labels, cells)))
    # move the threshold to the median rescored probability, so that the labels tell which threshold was used
    cfg = json.loads((tmp_path / "r" / "rescorer.json").read_text())
    cfg["threshold"] = float(np.median(expect))
    (tmp_path / "r" / "rescorer.json").write_text(json.dumps(cfg))
    r = CellRescorer.load(tmp_path / "r")
    res = runner.invoke(app, ["smear", str(iml_dir / "images" / field), "--rescorer", str(tmp_path / "r"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / f"{Path(field).stem}.json").read_text())
    got = np.asarray([c["p_parasitized"] for c in doc["cells"]])
    np.testing.assert_allclose(got, expect, atol=1e-6)
    assert [c["label"] == "Parasitized" for c in doc["cells"]] == list(expect >= r.threshold)
    assert doc["n_infected"] >= len(cells) // 3
    settings = json.loads((tmp_path / "o" / "summary.json").read_text())["settings"]
    assert settings["threshold"] == r.threshold and settings["rescorer"]["n_fields"] == 24
    res = runner.invoke(app, ["smear", str(iml_dir / "images" / field), "--rescorer", str(tmp_path), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "rescorer" in res.output
