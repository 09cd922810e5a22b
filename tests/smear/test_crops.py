"""Annotation -> NIH-layout crop export."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from malaria_screen.smear.crop_export import export_annotation_crops
from malaria_screen.smear.crops import box_cell_mask
from malaria_screen.smear.labels import load_iml_annotations


def test_box_cell_mask_isolates_disc():
    from smear_synth import BG, RBC, disc

    img = np.zeros((50, 50, 3), np.uint8)
    img[:] = BG
    disc(img, 25, 25, 20, RBC)
    m = box_cell_mask(img)
    assert m[25, 25] and not m[0, 0] and not m[49, 49]
    assert abs(m.sum() - np.pi * 400) < 0.15 * np.pi * 400


def test_export_layout_on_iml(tmp_path, iml_dir):
    ann = load_iml_annotations(iml_dir / "annotations.json")
    # two fields, one of them with parasite boxes
    names = sorted(ann)
    infected = next(n for n in names if any(b.infected for b in ann[n]))
    sub = {infected: ann[infected], names[0]: ann[names[0]]} if infected != names[0] else {names[0]: ann[names[0]]}
    out = tmp_path / "crops"
    s = export_annotation_crops(iml_dir / "images", sub, out)
    n_inf = sum(b.infected for n in sub for b in sub[n])
    n_unf = sum(b.type == "red blood cell" for n in sub for b in sub[n])
    assert s.n_parasitized == n_inf > 0 and s.n_uninfected == n_unf
    par = sorted((out / "Parasitized").glob("*.png"))
    unf = sorted((out / "Uninfected").glob("*.png"))
    assert len(par) == n_inf and len(unf) == n_unf
    stems = {n.rsplit(".", 1)[0] for n in sub}
    for p in par + unf:
        field, _, k = p.stem.rpartition("_cell_")
        assert field in stems and k.isdigit()
        im = np.asarray(Image.open(p))
        assert im.ndim == 3 and im.shape[2] == 3
        assert (im[0, 0] == 0).all()  # black outside the cell, like NIH crops
    with open(out / "groups.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["path"] for r in rows} == {f"{p.parent.name}/{p.name}" for p in par + unf}
    assert all(r["patient"] == r["path"].split("/")[1].rpartition("_cell_")[0] for r in rows)
    # the core reads it
    from malaria_screen.data.patients import read_groups_csv

    assert len(read_groups_csv(out / "groups.csv")) == len(rows)


def test_export_skips_difficult_and_reports_bad_field(tmp_path):
    from smear_synth import synthetic_field

    img, c = synthetic_field()
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "f1.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"junk")
    doc = [
        {"image_name": "f1.png", "objects": [
            {"type": "red blood cell", "bbox": {"x": "200", "y": "50", "w": "40", "h": "40"}},
            {"type": "ring", "bbox": {"x": "200", "y": "210", "w": "40", "h": "40"}},
            {"type": "difficult", "bbox": {"x": "110", "y": "210", "w": "40", "h": "40"}},
        ]},
        {"image_name": "bad.png", "objects": []},
    ]
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    s = export_annotation_crops(tmp_path / "in", load_iml_annotations(tmp_path / "ann.json"), tmp_path / "out")
    assert (s.n_parasitized, s.n_uninfected, s.n_skipped) == (1, 1, 1)
    assert "bad.png" in s.errors
    assert (tmp_path / "out" / "Parasitized" / "f1_cell_1.png").is_file()
    assert (tmp_path / "out" / "Uninfected" / "f1_cell_0.png").is_file()


def test_fields_of_one_stem_keep_their_own_crops_and_a_non_finite_box_is_refused(tmp_path):
    """``a.png`` and ``a.jpg`` (two fields) write crops under their own prefixes, not over each
    other; a box of "nan" px is a clear error of the annotations file, not a crash mid-export."""
    from smear_synth import synthetic_field

    img, _ = synthetic_field()
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "a.png")
    Image.fromarray(np.ascontiguousarray(img[::-1])).save(tmp_path / "in" / "a.jpg", quality=95)
    boxes = [{"type": "red blood cell", "bbox": {"x": "200", "y": "50", "w": "40", "h": "40"}},
             {"type": "ring", "bbox": {"x": "200", "y": "210", "w": "40", "h": "40"}}]
    (tmp_path / "ann.json").write_text(json.dumps([{"image_name": n, "objects": boxes} for n in ("a.png", "a.jpg")]))
    s = export_annotation_crops(tmp_path / "in", load_iml_annotations(tmp_path / "ann.json"), tmp_path / "out")
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").glob("*/*.png"))
    assert (s.n_parasitized, s.n_uninfected) == (2, 2) and len(written) == 4
    assert written == ["Parasitized/a_jpg_cell_1.png", "Parasitized/a_png_cell_1.png",
                       "Uninfected/a_jpg_cell_0.png", "Uninfected/a_png_cell_0.png"]
    with open(tmp_path / "out" / "groups.csv", newline="") as fh:
        assert {r["patient"] for r in csv.DictReader(fh)} == {"a_jpg", "a_png"}
    boxes[0]["bbox"]["x"] = "nan"
    (tmp_path / "nan.json").write_text(json.dumps([{"image_name": "a.png", "objects": boxes}]))
    with pytest.raises(ValueError, match="finite"):
        load_iml_annotations(tmp_path / "nan.json")


def test_detection_crops_are_the_screening_crops(tmp_path, iml_dir):
    """--source detections: each crop is the segmented cell as `smear` cuts it, labelled by its box."""
    from malaria_screen.data.io import decode_image
    from malaria_screen.smear.boxes import match_boxes
    from malaria_screen.smear.crop_export import export_detection_crops
    from malaria_screen.smear.crops import cell_crops
    from malaria_screen.smear.segment import segment_field

    ann = load_iml_annotations(iml_dir / "annotations.json")
    name = next(n for n in sorted(ann) if sum(b.infected for b in ann[n]) >= 2)
    out = tmp_path / "det"
    s = export_detection_crops(iml_dir / "images", {name: ann[name]}, out)
    rgb = decode_image(iml_dir / "images" / name)
    seg = segment_field(rgb)
    cells = seg.cells()
    gt = ann[name]
    pairs = dict(match_boxes(np.asarray([c.bbox for c in cells], float), np.asarray([g.bbox for g in gt], float)))
    inf = {cells[i].id for i, g in pairs.items() if gt[g].infected}
    assert s.n_parasitized == len(inf) >= 1
    assert s.n_uninfected == sum(1 for i, g in pairs.items() if not gt[g].infected and not gt[g].ignored)
    assert s.n_skipped == len(cells) - s.n_parasitized - s.n_uninfected
    stem = name.rsplit(".", 1)[0]
    assert {int(p.stem.rpartition("_det_")[2]) for p in (out / "Parasitized").glob("*.png")} == inf
    crops = cell_crops(rgb, seg.labels, cells)
    k = next(iter(inf))
    i = next(j for j, c in enumerate(cells) if c.id == k)
    assert np.array_equal(np.asarray(Image.open(out / "Parasitized" / f"{stem}_det_{k}.png")), crops[i])
    with open(out / "groups.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == s.n_parasitized + s.n_uninfected and {r["patient"] for r in rows} == {stem}


def test_unmatched_detections_become_negatives_except_near_infected_boxes(tmp_path, iml_dir):
    """--unmatched uninfected: unboxed detections (debris, fragments, marks) are written as
    Uninfected unless they overlap an infected box; matched crops are unchanged."""
    from malaria_screen.data.io import decode_image
    from malaria_screen.smear.boxes import match_boxes
    from malaria_screen.smear.crop_export import export_detection_crops
    from malaria_screen.smear.segment import segment_field

    ann = load_iml_annotations(iml_dir / "annotations.json")
    name = "PA172016.JPG"  # a field with lysed cells and smudges the annotators left unboxed, and 4 infected boxes
    stem = name.rsplit(".", 1)[0]
    base = export_detection_crops(iml_dir / "images", {name: ann[name]}, tmp_path / "skip")
    s = export_detection_crops(iml_dir / "images", {name: ann[name]}, tmp_path / "neg", unmatched="uninfected")
    cells = segment_field(decode_image(iml_dir / "images" / name)).cells()
    gt = ann[name]
    boxes = np.asarray([c.bbox for c in cells], float)
    gb = np.asarray([g.bbox for g in gt], float)
    matched = {i for i, _ in match_boxes(boxes, gb)}
    unm = sorted((tmp_path / "neg" / "Uninfected").glob(f"{stem}_unm_*.png"))
    assert not list((tmp_path / "skip" / "Uninfected").glob("*_unm_*.png"))
    assert len(unm) >= 3 and s.n_parasitized == base.n_parasitized >= 1
    assert s.n_uninfected == base.n_uninfected + len(unm)
    assert s.n_skipped == len(cells) - s.n_parasitized - s.n_uninfected
    by_id = {c.id: i for i, c in enumerate(cells)}
    risky = gb[[g.infected or g.ignored for g in gt]]
    for p in unm:
        i = by_id[int(p.stem.rpartition("_unm_")[2])]
        assert i not in matched
        x, y, w, h = boxes[i]
        ix = np.clip(np.minimum(x + w, risky[:, 0] + risky[:, 2]) - np.maximum(x, risky[:, 0]), 0, None)
        iy = np.clip(np.minimum(y + h, risky[:, 1] + risky[:, 3]) - np.maximum(y, risky[:, 1]), 0, None)
        assert (ix * iy / (w * h)).max() < 0.1
    # the skipped unmatched detections are exactly those that touch an infected/difficult box
    kept_out = [i for i in range(len(cells)) if i not in matched and f"{stem}_unm_{cells[i].id}.png" not in {p.name for p in unm}]
    assert s.n_skipped == len(kept_out) + sum(1 for _, g in match_boxes(boxes, gb) if gt[g].ignored)
    assert kept_out, "this field has a detection beside an infected box, which must not become a negative"
    with pytest.raises(ValueError, match="unmatched"):
        export_detection_crops(iml_dir / "images", {name: ann[name]}, tmp_path / "bad", unmatched="maybe")
