"""Cell features and the second-stage rescorer, on real IML_Malaria fields and the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from malaria_screen.smear.labels import load_iml_annotations

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
    d = iml["data"]
    assert d.relative and len(d.columns) == d.X.shape[1] and d.columns[-1] == "model_logit"
    j = d.columns.index("rel:inner_exR_q99")
    assert d.y.sum() >= 40 and len(d.y) > 2000
    assert roc_auc_score(d.y, d.X[:, j]) > 0.85
    assert roc_auc_score(d.y, d.X[:, d.columns.index("rel:border")]) < 0.7  # not every column is informative


def test_field_relative_inputs_ignore_a_fields_overall_stain_and_scale(iml_dir):
    """A field whose every cell reads k times stronger (and shifted) gives the same relative inputs;
    the median cell of a field maps to 0."""
    from malaria_screen.data.io import decode_image
    from malaria_screen.smear.rescore import field_relative, input_names, rescorer_inputs
    from malaria_screen.smear.segment import segment_field

    rgb = decode_image(iml_dir / "images" / "PA171845.JPG")
    seg = segment_field(rgb)
    cells = seg.cells()
    p = np.linspace(0.01, 0.99, len(cells))
    absolute = rescorer_inputs(rgb, seg, cells, p, relative=False)
    rel = rescorer_inputs(rgb, seg, cells, p)
    assert absolute.shape[1] == len(input_names(relative=False)) and rel.shape[1] == len(input_names()) == absolute.shape[1] + 1
    np.testing.assert_array_equal(rel[:, :-1], field_relative(absolute))
    np.testing.assert_allclose(rel[:, -1], absolute[:, -1])  # the raw logit again
    spread = np.percentile(absolute, 75, axis=0) - np.percentile(absolute, 25, axis=0)
    wide, flat = spread > 1e-6, spread == 0  # columns constant over the middle half (counts, flags) are only centred
    assert wide.sum() >= 30 and (wide | flat).all()
    moved = field_relative(3.0 * absolute + 2.0)
    np.testing.assert_allclose(moved[:, wide], rel[:, :-1][:, wide], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(moved[:, flat], 3.0 * rel[:, :-1][:, flat], rtol=1e-9, atol=1e-9)
    assert not np.allclose(field_relative(absolute[: len(cells) // 2]), rel[: len(cells) // 2, :-1])  # it depends on the field
    assert np.all(np.abs(np.median(rel[:, :-1], axis=0)) < 1e-9)
    assert field_relative(absolute[:1]).tolist() == [[0.0] * absolute.shape[1]]


@pytest.mark.slow
def test_rescorer_ranks_held_out_fields(iml):
    """Fitted on 24 fields, it ranks the cells of the next 12 fields well, and its count-matched
    threshold calls about as many cells as are infected.

    It beat the previous, NIH-only bundled model's own logit here (0.95 vs 0.91); the stain-robust
    bundled model's logit alone ranks these 12 fields' cells at ROC-AUC 0.992, above the
    rescorer's 0.962 (measured 2026-12-02; 16 infected detections, so a coarse comparison), so
    "beats the model" is no longer asserted: the learning curve (docs/adaptation.md) is where the
    second stage is judged."""
    from malaria_screen.smear.rescore import CellRescorer

    tr, te = iml["train"], iml["test"]
    assert not set(tr.groups.tolist()) & set(te.groups.tolist())
    r = CellRescorer().fit(tr.X, tr.y, tr.groups)
    p = r.predict_proba(te.X)
    auc_r, auc_cnn = roc_auc_score(te.y, p), roc_auc_score(te.y, te.X[:, -1])
    assert auc_r > 0.93 and auc_cnn > 0.93, (auc_r, auc_cnn)  # chance 0.5; measured 0.962 and 0.992
    assert 0 < r.threshold < 1 and r.config.n_fields == 24 and r.config.n_parasitized == int(tr.y.sum())
    called = int((p >= r.threshold).sum())
    print(f"rescorer on fields 25-36: ROC-AUC {auc_r:.4f} (model logit {auc_cnn:.4f}); {called} called, "
          f"{int(te.y.sum())} infected, threshold {r.threshold:.4f}")
    # The threshold is count-matched on out-of-fold probabilities of the 24 training fields.
    # Measured on these 12 held-out fields (2026-12-02, bundled model, deterministic trees): 12
    # called, 16 infected detections; moving the threshold's odds by a factor 2 either way gives 9
    # to 15 calls. Bound: that range, i.e. the measured 12 +- 3 (was 0.4-2.5x the infected count).
    assert int(te.y.sum()) == 16 and 9 <= called <= 15, called


def test_rescorer_equals_sklearn_and_survives_save_load(iml, tmp_path):
    from malaria_screen.smear.rescore import CellRescorer, is_rescorer_dir

    tr, te = iml["train"], iml["test"]
    r = CellRescorer(max_iter=60).fit(tr.X, tr.y, tr.groups)
    ref = r.new_estimator().fit(tr.X, tr.y).predict_proba(te.X)[:, 1]  # deterministic: same trees
    np.testing.assert_allclose(r.predict_proba(te.X), ref, rtol=0, atol=1e-12)
    r.save(tmp_path / "r")
    assert is_rescorer_dir(tmp_path / "r") and not is_rescorer_dir(tmp_path)
    r2 = CellRescorer.load(tmp_path / "r")
    assert r2.threshold == r.threshold and r2.config.feature_names == r.config.feature_names
    np.testing.assert_array_equal(r2.predict_proba(te.X), r.predict_proba(te.X))
    with pytest.raises(ValueError, match="rescorer inputs"):
        r2.predict_proba(te.X[:, :-1])
    (tmp_path / "r" / "rescorer.skops").write_bytes(b"not skops")
    with pytest.raises(ValueError, match="not a readable rescorer"):
        CellRescorer.load(tmp_path / "r")
    with pytest.raises(FileNotFoundError):
        CellRescorer.load(tmp_path)


def test_rescorer_json_shares_segment_config_and_old_files_fail_clearly(iml, tmp_path):
    """rescorer.json holds the SegmentConfig of the training fields; the plain ``segment_kwargs``
    dict of older files reads into the same SegmentConfig; a folder of the old flat-tree format
    (rescorer.safetensors) is refused with a message that says to refit."""
    from malaria_screen.smear.rescore import CellRescorer, RescorerConfig
    from malaria_screen.smear.segment import SegmentConfig

    tr = iml["train"]
    r = CellRescorer(max_iter=20).fit(tr.X, tr.y, tr.groups, segment_config=SegmentConfig(pixel_size_um=0.1))
    r.save(tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "rescorer.json").read_text())
    assert cfg["segment"] == SegmentConfig(pixel_size_um=0.1).to_dict()
    assert CellRescorer.load(tmp_path / "r").config.segment == SegmentConfig(pixel_size_um=0.1)
    old = {k: v for k, v in cfg.items() if k != "segment"} | {"segment_kwargs": {"pixel_size_um": 0.1}}
    assert RescorerConfig.from_dict(old).segment == SegmentConfig(pixel_size_um=0.1)
    assert RescorerConfig.from_dict(old | {"segment_kwargs": {}}).segment == SegmentConfig()
    with pytest.raises(ValueError, match="unknown segmentation setting"):
        RescorerConfig.from_dict(old | {"segment_kwargs": {"pixel_size": 0.1}})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "rescorer.json").write_text(json.dumps(old))
    (tmp_path / "old" / "rescorer.safetensors").write_bytes(b"flat trees")
    with pytest.raises(ValueError, match="older malaria-screen.*fit it again"):
        CellRescorer.load(tmp_path / "old")


@pytest.mark.slow
def test_rescorer_of_absolute_inputs_still_loads_and_screens(iml, iml_dir, tmp_path):
    """A rescorer file without ``field_relative`` (written before field-relative inputs) keeps
    its absolute inputs: rescore_field gives what its trees give on absolute inputs."""
    from malaria_screen.data.io import decode_image
    from malaria_screen.smear.crops import cell_crops
    from malaria_screen.smear.rescore import CellRescorer, collect_rescorer_data, rescorer_inputs
    from malaria_screen.smear.segment import segment_field

    names = iml["names"][TRAIN][:12]
    d = collect_rescorer_data(iml_dir / "images", iml["ann"], iml["model"], names=names, relative=False)
    assert not d.relative and d.X.shape[1] == iml["data"].X.shape[1] - 1
    r = CellRescorer(relative=False, max_iter=40).fit(d.X, d.y, d.groups)
    r.save(tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "rescorer.json").read_text())
    assert cfg.pop("field_relative") is False
    (tmp_path / "r" / "rescorer.json").write_text(json.dumps(cfg))
    r2 = CellRescorer.load(tmp_path / "r")
    assert r2.config.field_relative is False
    rgb = decode_image(iml_dir / "images" / iml["names"][HELD_OUT][0])
    seg = segment_field(rgb)
    cells = seg.cells()
    p = iml["model"].predict(cell_crops(rgb, seg.labels, cells))
    np.testing.assert_array_equal(r2.rescore_field(rgb, seg, cells, p),
                                  r.predict_proba(rescorer_inputs(rgb, seg, cells, p, relative=False)))
    with pytest.raises(ValueError, match="rescorer inputs"):
        r2.predict_proba(rescorer_inputs(rgb, seg, cells, p))  # relative inputs have one more column


def test_fit_refuses_data_it_cannot_use(iml):
    from malaria_screen.smear.rescore import CellRescorer

    tr = iml["train"]
    with pytest.raises(ValueError, match="both"):
        CellRescorer().fit(tr.X, np.zeros(len(tr.y)), tr.groups)
    with pytest.raises(ValueError, match="2 fields"):
        CellRescorer().fit(tr.X, tr.y, np.full(len(tr.y), "one"))
    with pytest.raises(ValueError, match="rescorer inputs"):
        CellRescorer().fit(tr.X[:, :5], tr.y, tr.groups)


@pytest.mark.slow
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
    # threshold at the median: about half the cells called (ties at the median are called too;
    # 58 of 113 here), border-cut cells counted (smear's default --count-border)
    k = sum(c["label"] == "Parasitized" for c in doc["cells"])
    assert doc["n_infected"] == k == int((expect >= r.threshold).sum())
    assert len(cells) // 3 <= k <= 2 * len(cells) // 3
    settings = json.loads((tmp_path / "o" / "summary.json").read_text())["settings"]
    assert settings["threshold"] == r.threshold and settings["rescorer"]["n_fields"] == 24
    res = runner.invoke(app, ["smear", str(iml_dir / "images" / field), "--rescorer", str(tmp_path), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "rescorer" in res.output


@pytest.mark.slow
def test_rest_api_and_web_app_screen_fields_with_a_rescorer(iml, iml_dir, tmp_path):
    """`serve --rescorer` / `app --rescorer`: POST /v1/field and the app's field tab give the
    rescorer's probabilities and labels; GET /v1/model names it."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from malaria_screen.app import screen_field_image
    from malaria_screen.data.io import decode_image
    from malaria_screen.serve import create_app
    from malaria_screen.smear.rescore import CellRescorer
    from malaria_screen.smear.screen import screen_field

    tr = iml["train"]
    r = CellRescorer(max_iter=60).fit(tr.X, tr.y, tr.groups)
    r.save(tmp_path / "r")
    r = CellRescorer.load(tmp_path / "r")
    model = iml["model"]
    field = iml_dir / "images" / iml["names"][HELD_OUT][1]
    rgb = decode_image(field)
    expect = screen_field(rgb, model, image_name=field.name, rescorer=r)
    plain = screen_field(rgb, model, image_name=field.name)
    p_expect = [c.p_parasitized for c in expect.cells]
    assert not np.allclose(p_expect, [c.p_parasitized for c in plain.cells], atol=1e-3)  # the rescorer changes them

    c = TestClient(create_app(model, rescorer=r), base_url="http://localhost")  # Host allow-list: loopback names
    res = c.post("/v1/field", files=[("file", (field.name, field.read_bytes(), "image/jpeg"))])
    assert res.status_code == 200, res.text
    body = res.json()
    np.testing.assert_allclose([x["p_parasitized"] for x in body["cells"]], p_expect, atol=1e-6)
    assert body["n_infected"] == expect.n_infected and body["n_rbc"] == expect.n_rbc
    info = c.get("/v1/model").json()["rescorer"]
    assert info["model"]["name"] == "r" and len(info["model"]["sha256"]) == 64 and info["threshold"] == r.threshold and info["field_relative"] is True
    assert TestClient(create_app(model), base_url="http://localhost").get("/v1/model").json()["rescorer"] is None

    summary, overlay = screen_field_image(model, rgb, rescorer=r)
    assert f"{expect.n_rbc} red cells, {expect.n_infected} Parasitized" in summary and overlay.shape == rgb.shape


def test_serve_and_app_refuse_a_bad_rescorer_before_starting(tmp_path):
    from typer.testing import CliRunner

    from malaria_screen.cli import app

    for cmd in ("serve", "app"):
        res = CliRunner().invoke(app, [cmd, "--rescorer", str(tmp_path)])
        assert res.exit_code == 2 and "cannot load the rescorer" in res.output, (cmd, res.output)


def test_fields_too_small_to_segment_are_errors_not_crashes(iml_with_tiny_field, tmp_path):
    """collect_rescorer_data and the `rescorer` command list a readable 1x1 field in the errors
    and fit on the others."""
    from typer.testing import CliRunner

    from malaria_screen.cli import app
    from malaria_screen.smear.rescore import CellRescorer, collect_rescorer_data

    fields, ann = iml_with_tiny_field
    data = collect_rescorer_data(fields, load_iml_annotations(ann), None)
    assert data.fields == ["PA171926", "PA171966"] and set(data.errors) == {"tiny.png"}
    assert "too small" in data.errors["tiny.png"] and len(data.y) > 100 and data.y.sum() >= 1
    with pytest.raises(ValueError, match="unmatched"):
        collect_rescorer_data(fields, load_iml_annotations(ann), None, unmatched="maybe")
    res = CliRunner().invoke(app, ["rescorer", str(fields), "--annotations", str(ann), "--out", str(tmp_path / "r"),
                                   "--no-model-logit"])
    assert res.exit_code == 0, res.output
    assert "tiny.png: ERROR" in res.output and "2 field(s)" in res.output
    assert CellRescorer.load(tmp_path / "r").config.n_fields == 2
