"""The labelling session behind the web app's labelling tab: the queue is the active-learning
rule's choice, labels undo in order, the CSV export reads back, and an adapt on real IML fields
labelled by their annotations gives a before/after that matches an independent count."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def bundled_model(default_model_dir):
    from malaria_screen.inference import load_model

    return load_model(default_model_dir, backend="torch")


def test_queue_label_undo_and_csv_round_trip(bundled_model, demo_field, tmp_path):
    from malaria_screen.data.io import decode_image
    from malaria_screen.evaluation.quantify import adjust_to_prior, params_from_model
    from malaria_screen.smear.adapt import field_cells, read_labels_csv, select_cells
    from malaria_screen.smear.labelling import TILE_PX, LabellingSession

    field = tmp_path / "fields" / demo_field.name
    field.parent.mkdir()
    shutil.copy(demo_field, field)
    s = LabellingSession(bundled_model, batch_size=8, seed=3)
    n = s.add_field(field)
    fc = field_cells(decode_image(field), bundled_model)
    assert n == len(fc.p) == s.n_cells > 50
    # the first batch is the library's active-learning choice on the prior-corrected posterior
    p_adj = adjust_to_prior(fc.p, params_from_model(bundled_model).train_prior, 0.02)
    expected = select_cells(p_adj, 0.5, 8, seed=3)
    batch = s.next_batch()
    assert [c.index for c in batch] == expected.tolist()
    assert batch[0].tile.shape == (TILE_PX, TILE_PX, 3) and batch[0].tile.dtype == np.uint8
    assert np.allclose([c.p for c in batch], fc.p[expected])
    assert s.current.index == expected[0]

    plan = ["Parasitized", "Uninfected", "Parasitized", "not a cell", "Uninfected", "Parasitized", "Uninfected"]
    for lab in plan:
        s.label(lab)
    assert s.counts == {"Parasitized": 3, "Uninfected": 3, "not a cell": 1}
    assert s.current.index == expected[7]
    back = s.undo()  # the last label goes; its cell is current again
    assert back.index == expected[6] and s.label_of(int(expected[6])) is None and s.n_labelled == 6
    s.label("Uninfected")
    s.label("Uninfected")  # the batch's last cell: the next batch is chosen, without the labelled cells
    assert s.n_labelled == 8 and len(s.batch) == 8
    assert not set(c.index for c in s.batch) & set(expected.tolist())
    assert s.undo().index == expected[7] and s.batch[0].index == expected[7]  # brought back from the old batch
    s.select(3)
    s.label("not a cell")
    with pytest.raises(ValueError, match="unknown label"):
        s.label("maybe")

    csv_path = s.write_csv(tmp_path / "fields" / "labels.csv")
    assert csv_path.read_text().splitlines()[1].startswith(f"{field.name},")  # relative to the CSV's folder
    back = read_labels_csv(csv_path)
    ours = s.labelled_cells()
    assert [(c.label, Path(c.field).resolve(), c.bbox) for c in back] == \
        [(c.label, Path(c.field).resolve(), tuple(float(round(v)) for v in c.bbox)) for c in ours]


def test_session_refuses_bad_fields_and_limits(bundled_model, demo_field, tmp_path):
    import skimage.data
    from PIL import Image

    from malaria_screen.smear.labelling import LabellingSession

    s = LabellingSession(bundled_model, max_fields=1)
    with pytest.raises(ValueError, match="nothing labelled"):
        s.write_csv(tmp_path / "l.csv")
    assert s.next_batch() == [] and s.current is None and s.undo() is None
    Image.fromarray(skimage.data.coffee()).save(tmp_path / "coffee.png")
    with pytest.raises(ValueError, match="not a blood smear"):
        s.add_field(tmp_path / "coffee.png")
    s.add_field(demo_field)
    with pytest.raises(ValueError, match="limit of 1 fields"):
        s.add_field(tmp_path / "coffee.png")
    t = LabellingSession(bundled_model, max_fields=2)
    t.add_field(demo_field)
    with pytest.raises(ValueError, match="already in this session"):
        t.add_field(demo_field)
    with pytest.raises(ValueError):
        LabellingSession(bundled_model, batch_size=0)


def _annotator(annotations):
    """Label a candidate as the IML annotators did: its box matched (IoU >= 0.5) to an annotated
    box gives Parasitized / Uninfected; no annotated box there: 'not a cell'."""
    from malaria_screen.smear.boxes import match_boxes

    def label(c):
        gts = [g for g in annotations[c.field] if not g.ignored]
        pairs = match_boxes(np.asarray([c.bbox]), np.asarray([g.bbox for g in gts], np.float64))
        if not pairs:
            return "not a cell"
        return "Parasitized" if gts[pairs[0][1]].infected else "Uninfected"

    return label


@pytest.mark.slow
def test_adapt_from_a_session_on_iml_fields(bundled_model, iml_dir, tmp_path):
    """Three IML dev fields (13 annotated infected cells), 36 cells labelled as the annotators
    did: adapt writes a site folder that loads as a site model; the before/after counts agree
    with an independent count over the same cells; later batches are ranked by the site model."""
    from malaria_screen.inference import load_model
    from malaria_screen.inference.site import SitePredictor, platt
    from malaria_screen.smear.labelling import LabellingSession, adaptable_model
    from malaria_screen.smear.labels import load_iml_annotations
    from malaria_screen.smear.parasitemia import field_quantifier

    ann = load_iml_annotations(iml_dir / "annotations.json")
    names = ["PA171959.JPG", "PA172016.JPG", "PA172005.JPG"]  # 5, 4 and 4 infected cells annotated
    d = tmp_path / "fields"
    d.mkdir()
    for n in names:
        shutil.copy(iml_dir / "images" / n, d / n)
    s = LabellingSession(bundled_model, batch_size=12)
    for n in names:
        s.add_field(d / n)
    oracle = _annotator(ann)
    s.next_batch()
    for _ in range(36):
        s.label(oracle(s.current))
    counts = s.counts
    assert counts["Parasitized"] >= 6  # uncertainty sampling finds most of the 13 infected cells in 36 of ~370
    res, cmp = s.adapt(d / "labels.csv", tmp_path / "site", model_dir=Path(bundled_model.source))
    site = load_model(res.out)
    assert isinstance(site, SitePredictor) and res.site.n_parasitized == counts["Parasitized"]
    assert adaptable_model(site)[1] == res.out / "model"  # an app started on a site model adapts its cell model
    assert res.site.n_uninfected == counts["Uninfected"] and res.site.n_not_a_cell == counts["not a cell"]

    # independent count: the labelled cells' model posteriors, the whole-field call, the site's call
    rows = s.labelled()
    p = np.asarray([pp for _, _, pp in rows])
    y = np.asarray([c.label == "Parasitized" for _, c, _ in rows])
    before = field_quantifier(bundled_model).labels(p)
    assert cmp.before["tp"] == int(np.sum(before & y)) and cmp.before["called"] == int(before.sum())
    assert cmp.before["n_parasitized"] == cmp.after["n_parasitized"] == counts["Parasitized"]
    assert cmp.before["n_negative"] == 36 - counts["Parasitized"]
    assert cmp.before["specificity"] == pytest.approx(int(np.sum(~before & ~y)) / int(np.sum(~y)))
    if res.site.method == "calibration":
        after = platt(p, res.site.calibration_a, res.site.calibration_b) >= res.site.threshold
        assert cmp.after["tp"] == int(np.sum(after & y)) and cmp.after["called"] == int(after.sum())
        # the count-matched threshold calls about as many labelled cells as are labelled Parasitized
        assert abs(cmp.after["called"] - counts["Parasitized"]) <= 2
    assert [f["field"] for f in cmp.fields] == names and sum(f["labelled"] for f in cmp.fields) == 36
    assert all(0.0 <= f["before"] <= 1.0 and 0.0 <= f["after"] <= 1.0 for f in cmp.fields)
    # later batches are ranked by the site model
    nxt = s.next_batch()
    assert s.fit.rescorer is None  # 36 labels: calibration
    p_site, thr = s.fit.proba(np.asarray([c.p for c in nxt]))
    assert np.allclose([c.p_current for c in nxt], p_site) and nxt[0].threshold == pytest.approx(thr)


def test_adaptable_model(bundled_model, default_model_dir):
    """A run folder's model is adapted from its folder; an ONNX file can label but not adapt."""
    from malaria_screen.inference import load_model
    from malaria_screen.smear.labelling import adaptable_model

    assert adaptable_model(bundled_model) == (bundled_model, default_model_dir)
    onnx = load_model(default_model_dir / "model.onnx")
    assert adaptable_model(onnx) == (onnx, None)
