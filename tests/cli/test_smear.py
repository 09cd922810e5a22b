"""The smear Typer commands, registered on a bare app."""

from __future__ import annotations

import json

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from smear_synth import synthetic_field
from malaria_screen.cli.smear import register
from typer_text import flat


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command so Typer keeps sub-command names
        pass

    return app


def test_smear_no_classify(tmp_path):
    img, _ = synthetic_field()
    Image.fromarray(img).save(tmp_path / "f.png")
    r = CliRunner().invoke(_app(), ["smear", str(tmp_path / "f.png"), "--out", str(tmp_path / "o"), "--no-classify"])
    assert r.exit_code == 0, r.output
    assert "6 RBC" in r.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["n_rbc"] == 6


def test_smear_rejects_bad_stain(tmp_path):
    """A field that screens fine (exit 0 with ``--stain none``) is refused with an unknown stain: a
    usage error naming ``--stain``, before any output is written."""
    img, _ = synthetic_field()
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "f.png")
    ok = CliRunner().invoke(_app(), ["smear", str(tmp_path / "in"), "--out", str(tmp_path / "ok"), "--no-classify", "--stain", "none"])
    assert ok.exit_code == 0, ok.output
    r = CliRunner().invoke(_app(), ["smear", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--no-classify", "--stain", "x"])
    assert r.exit_code == 2 and "--stain" in r.output, r.output
    assert not (tmp_path / "o" / "summary.json").exists()


def test_smear_and_smear_eval_refuse_an_unknown_parasitemia_method_before_any_work(tmp_path):
    for cmd in (["smear", str(tmp_path)], ["smear-eval", str(tmp_path), "--annotations", __file__]):
        r = CliRunner().invoke(_app(), [*cmd, "--out", str(tmp_path / "o"), "--parasitemia-method", "median"])
        assert r.exit_code == 2 and "got 'median'" in r.output, r.output
        assert not (tmp_path / "o" / "summary.json").exists()


def test_help_lists_units():
    r = CliRunner().invoke(_app(), ["smear", "--help"])
    assert r.exit_code == 0 and "µm" in r.output


def test_smear_eval_no_classify(tmp_path, iml_dir):
    r = CliRunner().invoke(
        _app(),
        ["smear-eval", str(iml_dir / "images"), "--annotations", str(iml_dir / "annotations.json"),
         "--out", str(tmp_path / "e"), "--no-classify", "--limit", "2"],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    # Measured on these 2 fields (302 boxes): strict F1 0.9385 (290 matched, 26 extra, 12 missed); the
    # segmentation is deterministic, the floor leaves 0.04 for changes elsewhere (about 12 more misses).
    assert m["n_fields"] == 2 and m["n_gt_rbc"] == 302 and 0.90 <= m["rbc_f1"] <= 1.0, m
    assert (tmp_path / "e" / "per_field.csv").is_file()
    # The annotators' box convention (IML boxes carry a margin) recovers near-misses, never loses matches here.
    r2 = CliRunner().invoke(
        _app(),
        ["smear-eval", str(iml_dir / "images"), "--annotations", str(iml_dir / "annotations.json"),
         "--out", str(tmp_path / "e2"), "--no-classify", "--limit", "2", "--box-scale", "1.15"],
    )
    assert r2.exit_code == 0, r2.output
    m2 = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert m2["tp"] >= m["tp"] and m2["n_pred_rbc"] == m["n_pred_rbc"]


def test_crops_cli_detections(tmp_path, iml_dir):
    ann = json.loads((iml_dir / "annotations.json").read_text())
    one = [a for a in ann if a["image_name"] == sorted(x["image_name"] for x in ann)[0]]
    (tmp_path / "a.json").write_text(json.dumps(one))
    r = CliRunner().invoke(_app(), ["crops", str(iml_dir / "images"), "--annotations", str(tmp_path / "a.json"),
                                    "--out", str(tmp_path / "c"), "--source", "detections"])
    assert r.exit_code == 0, r.output
    n = len(list((tmp_path / "c" / "Uninfected").glob("*_det_*.png"))) + len(list((tmp_path / "c" / "Parasitized").glob("*.png")))
    assert n > 50 and f"{n - len(list((tmp_path / 'c' / 'Parasitized').glob('*.png')))} Uninfected" in r.output
    bad = CliRunner().invoke(_app(), ["crops", str(iml_dir / "images"), "--annotations", str(tmp_path / "a.json"),
                                      "--out", str(tmp_path / "d"), "--source", "nope"])
    text = flat(bad.output)
    assert bad.exit_code == 2 and "Invalid value for '--source'" in text and "'nope' is not one of 'boxes', 'detections'" in text, text


def test_smear_exits_1_when_a_field_fails_and_keeps_the_others(tmp_path):
    img, _ = synthetic_field()
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "f.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    r = CliRunner().invoke(_app(), ["smear", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--no-classify"])
    assert r.exit_code == 1, r.output
    assert "bad.png: ERROR" in r.output and "2 field(s): 1 screened, 1 failed" in r.output
    assert json.loads((tmp_path / "o" / "f.json").read_text())["n_rbc"] == 6
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["n_fields"] == 1 and s["n_failed"] == 1 and (tmp_path / "o" / "report.html").is_file()
    help_text = " ".join(CliRunner().invoke(_app(), ["smear", "--help"]).output.split())
    assert "exit status is 1 if any field failed" in help_text


def _with_all_iml_annotations(ann, iml_dir, tmp_path):
    """The fixture's annotations plus all 120 IML ones (118 of them for images not in its folder)."""
    doc = json.loads(ann.read_text())
    doc += [a for a in json.loads((iml_dir / "annotations.json").read_text()) if a["image_name"] not in {d["image_name"] for d in doc}]
    (tmp_path / "all.json").write_text(json.dumps(doc))
    return tmp_path / "all.json"


def test_smear_eval_and_crops_survive_a_field_too_small_to_segment(tmp_path, iml_with_tiny_field, iml_dir):
    """The annotated fields present are done, the annotated images absent skipped with one line; a
    field that fails is reported, the others written, and the exit status is 1."""
    fields, ann = iml_with_tiny_field
    ann = _with_all_iml_annotations(ann, iml_dir, tmp_path)
    r = CliRunner().invoke(_app(), ["smear-eval", str(fields), "--annotations", str(ann), "--out", str(tmp_path / "e"),
                                    "--no-classify"])
    assert r.exit_code == 1, r.output
    assert f"118 annotated image(s) are not in {fields} (skipped)" in r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["n_fields"] == 2 and m["n_failed"] == 1 and m["tp"] > 100
    assert "too small" in m["failed"]["tiny.png"] and json.loads(r.stdout) == m
    r = CliRunner().invoke(_app(), ["crops", str(fields), "--annotations", str(ann), "--out", str(tmp_path / "c"),
                                    "--source", "detections"])
    assert r.exit_code == 1, r.output
    assert "tiny.png: ERROR" in r.output and "too small" in r.output and "2 field(s)" in r.output
    assert "118 annotated image(s) are not in" in r.output and "no such file" not in r.output
    rows = (tmp_path / "c" / "groups.csv").read_text().splitlines()
    assert len(rows) > 100 and {row.rpartition(",")[2] for row in rows[1:]} == {"PA171926", "PA171966"}


def test_smear_eval_limit_picks_among_the_fields_present(tmp_path, iml_with_tiny_field, iml_dir):
    fields, ann = iml_with_tiny_field
    ann = _with_all_iml_annotations(ann, iml_dir, tmp_path)
    r = CliRunner().invoke(_app(), ["smear-eval", str(fields), "-a", str(ann), "--out", str(tmp_path / "e"),
                                    "--no-classify", "--limit", "1"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["n_fields"] == 1 and m["n_failed"] == 0 and m["n_gt_rbc"] > 50  # PA171926.JPG, the first present


def test_all_fields_failing_grayscale_and_unannotated_images(tmp_path, iml_with_tiny_field):
    """A grayscale copy of a real field is a field's error (not 0 % infected); when every field fails,
    smear-eval prints strict JSON (null, not NaN) and exits 1, and so does crops; an image without
    annotation is skipped with one line."""
    fields, ann = iml_with_tiny_field
    d = tmp_path / "gray"
    d.mkdir()
    Image.open(fields / "PA171926.JPG").convert("L").save(d / "PA171926.JPG")
    (fields / "tiny.png").rename(d / "tiny.png")
    synthetic = Image.fromarray(synthetic_field()[0])
    synthetic.save(d / "unannotated.png")
    r = CliRunner().invoke(_app(), ["smear-eval", str(d), "-a", str(ann), "--out", str(tmp_path / "e"), "--no-classify"])
    assert r.exit_code == 1, r.output
    assert "NaN" not in r.stdout
    m = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert m["n_fields"] == 0 and m["rbc_f1"] is None and set(m["failed"]) == {"PA171926.JPG", "tiny.png"}
    assert "grayscale" in m["failed"]["PA171926.JPG"]
    assert f"1 image(s) in {d} have no annotation (skipped), e.g. unannotated.png" in r.output
    r = CliRunner().invoke(_app(), ["crops", str(d), "-a", str(ann), "--out", str(tmp_path / "c"), "--source", "detections"])
    assert r.exit_code == 1, r.output
    assert "PA171926.JPG: ERROR" in r.output and "grayscale" in r.output and "0 field(s)" in r.output
    assert (tmp_path / "c" / "groups.csv").read_text() == "path,patient\n"
    r = CliRunner().invoke(_app(), ["smear", str(d), "--out", str(tmp_path / "s"), "--no-classify"])
    assert r.exit_code == 1 and "3 field(s): 1 screened, 2 failed" in r.output, r.output
    assert "PA171926.JPG: ERROR ImageDecodeError: image has no colour (grayscale)" in r.output


def test_smear_empty_folder_duplicates_and_help(tmp_path):
    img, _ = synthetic_field()
    (tmp_path / "in").mkdir()
    (tmp_path / "empty").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "f.png")
    r = CliRunner().invoke(_app(), ["smear", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--no-classify"])
    assert r.exit_code == 1
    assert f"No field images found in {tmp_path / 'empty'} (hidden files and non-image files" in r.output
    assert "error: no field images to screen" in r.output
    same = tmp_path / "in" / ".." / "in" / "f.png"
    r = CliRunner().invoke(_app(), ["smear", str(tmp_path / "empty"), str(tmp_path / "in"), str(same),
                                    "--out", str(tmp_path / "o2"), "--no-classify"])
    assert r.exit_code == 0, r.output
    assert "1 field(s): 1 screened, 0 failed: 6 RBC" in r.output
    assert "WARNING: No field images found in" in r.output and "1 input path(s) named a field already given" in r.output
    from malaria_screen.data.io import MAX_PIXELS

    help_text = flat(CliRunner().invoke(_app(), ["smear", "--help"]).output)
    assert f"up to {MAX_PIXELS // 1_000_000} Mpx" in help_text and "subfolders are not searched" in help_text
    assert "WebP" in help_text and "non-image files such as .json" in help_text and "*_overlay.png" in help_text
    help_text = flat(CliRunner().invoke(_app(), ["smear-eval", "--help"]).output)
    assert "~1.15x the cell" in help_text


def test_smear_quiet_silences_library_warnings_and_errors_print_once(tmp_path, monkeypatch, caplog):
    import logging

    import malaria_screen.smear.report as report

    real = report.screen_field

    def screen(rgb, model, **kw):
        logging.getLogger("malaria_screen.smear.segment").warning("a library warning")
        return real(rgb, model, **kw)

    monkeypatch.setattr(report, "screen_field", screen)
    (tmp_path / "in").mkdir()
    Image.fromarray(synthetic_field()[0]).save(tmp_path / "in" / "f.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        r = CliRunner().invoke(_app(), ["smear", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--no-classify",
                                        "--workers", "1"])  # the monkeypatch lives in this process
    assert r.exit_code == 1 and r.output.count("bad.png") == 1, r.output
    assert [rec.getMessage() for rec in caplog.records] == ["a library warning"]  # the field error is not logged too
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        r = CliRunner().invoke(_app(), ["smear", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--no-classify", "-q",
                                        "--workers", "1"])
    assert r.exit_code == 1 and "bad.png" not in r.output and "2 field(s): 1 screened, 1 failed" in r.output
    assert not caplog.records


def test_interrupted_smear_and_crops_exit_130(tmp_path, monkeypatch):
    """Ctrl-C: smear keeps both files of each finished field and neither of the field in progress;
    crops writes groups.csv for the fields finished and removes the crops of the one in progress."""
    import malaria_screen.smear.crop_export as crop_export
    import malaria_screen.smear.report as report

    img, _ = synthetic_field()
    (tmp_path / "in").mkdir()
    for n in ("f1.png", "f2.png"):
        Image.fromarray(img).save(tmp_path / "in" / n)
    real_png = report._png_bytes

    def png(rgb):  # the second field is interrupted after its JSON was written
        if (tmp_path / "o" / report._part_names("f2")[0]).exists():
            raise KeyboardInterrupt
        return real_png(rgb)

    monkeypatch.setattr(report, "_png_bytes", png)
    r = CliRunner().invoke(_app(), ["smear", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--no-classify",
                                    "--workers", "1"])  # the monkeypatch lives in this process
    assert r.exit_code == 130 and "interrupted after 1 field(s)" in r.output, r.output
    assert sorted(q.name for q in (tmp_path / "o").iterdir()) == ["f1.json", "f1_overlay.png", "report.html", "summary.json"]

    boxes = [{"type": t, "bbox": {"x": "200", "y": y, "w": "40", "h": "40"}} for t, y in (("red blood cell", "50"), ("ring", "210"))]
    (tmp_path / "ann.json").write_text(json.dumps([{"image_name": n, "objects": boxes} for n in ("f1.png", "f2.png")]))
    calls = []
    real_mask = crop_export.box_cell_mask

    def mask(crop):  # interrupted on the second box of f2, after its first crop was written
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_mask(crop)

    monkeypatch.setattr(crop_export, "box_cell_mask", mask)
    r = CliRunner().invoke(_app(), ["crops", str(tmp_path / "in"), "-a", str(tmp_path / "ann.json"), "--out", str(tmp_path / "c")])
    assert r.exit_code == 130 and "interrupted after 1 of 2 field(s)" in r.output, r.output
    rows = (tmp_path / "c" / "groups.csv").read_text().splitlines()
    on_disk = sorted(f"{q.parent.name}/{q.name}" for q in (tmp_path / "c").glob("*/*"))
    assert sorted(row.partition(",")[0] for row in rows[1:]) == on_disk == ["Parasitized/f1_cell_1.png", "Uninfected/f1_cell_0.png"]


_USAGE_ERRORS = {  # what is wrong -> (arguments with {fields}, {ann} and {tmp} to fill in, option named, message)
    "smear --out is a file": ("smear {fields} --out {tmp}/taken --no-classify", "'--out'", "exists and is not a folder"),
    "smear --out under a file": ("smear {fields} --out {tmp}/taken/sub --no-classify", "'--out'", "is a file, not a folder"),
    "smear-eval --out is a file": ("smear-eval {fields} -a {ann} --out {tmp}/taken --no-classify", "'--out'", "not a folder"),
    "crops --out is a file": ("crops {fields} -a {ann} --out {tmp}/taken", "'--out'", "not a folder"),
    "rescorer --out is a file": ("rescorer {fields} -a {ann} --out {tmp}/taken --no-model-logit", "'--out'", "not a folder"),
    "missing field_dir": ("smear-eval {tmp}/nope -a {ann} --out {tmp}/o --no-classify", "'field_dir'", "does not exist"),
    "missing annotations": ("crops {fields} -a {tmp}/nope.json --out {tmp}/o", "'--annotations'", "does not exist"),
    "annotations not JSON": ("crops {fields} -a {tmp}/taken --out {tmp}/o", "'--annotations'", "JSONDecodeError"),
    "annotations not a list": ("smear-eval {fields} -a {tmp}/dict.json --out {tmp}/o --no-classify", "'--annotations'",
                               "expected a JSON list"),
    "annotation without bbox": ("rescorer {fields} -a {tmp}/nobox.json --out {tmp}/o", "'--annotations'",
                                "bad annotation entry"),
    "annotations not UTF-8": ("crops {fields} -a {tmp}/binary.json --out {tmp}/o", "'--annotations'", "UnicodeDecodeError"),
    "missing --fields list": ("rescorer {fields} -a {ann} --fields {tmp}/nope.txt --out {tmp}/o", "'--fields'",
                              "does not exist"),
    "smear-eval unknown stain": ("smear-eval {fields} -a {ann} --out {tmp}/o --no-classify --stain sepia", "--stain", "sepia"),
    "crops --pixel-size-um 0": ("crops {fields} -a {ann} --out {tmp}/o --source detections --pixel-size-um 0",
                                "'--pixel-size-um'", "0.0001"),
    "crops --out holds crops": ("crops {fields} -a {ann} --out {tmp}/full", "'--out'",
                                "already holds 2 image file(s) in Parasitized/ and Uninfected/"),
    "no annotated image in field_dir": ("smear-eval {tmp}/empty -a {ann} --out {tmp}/o --no-classify", "'FIELD_DIR'",
                                        "none of the 3 annotated images is in"),
}


@pytest.mark.parametrize("case", list(_USAGE_ERRORS))
def test_bad_out_annotations_and_field_dir_are_usage_errors(case, tmp_path, iml_with_tiny_field):
    """Checked before any work: exit status 2 and a message naming the option, no traceback."""
    fields, ann = iml_with_tiny_field
    (tmp_path / "taken").write_text("x")
    (tmp_path / "dict.json").write_text('{"image_name": "x"}')
    (tmp_path / "nobox.json").write_text('[{"image_name": "x", "objects": [{"type": "ring"}]}]')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    for cls in ("Parasitized", "Uninfected"):  # an earlier export
        (tmp_path / "full" / cls).mkdir(parents=True)
        (tmp_path / "full" / cls / "old_cell_0.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    args, param, msg = _USAGE_ERRORS[case]
    r = CliRunner().invoke(_app(), args.format(fields=fields, ann=ann, tmp=tmp_path).split())
    text = flat(r.output)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "Invalid value" in text and param in text and msg in text, r.output
    assert not (tmp_path / "o").exists()


def test_smear_target_prior_moves_the_prior_methods_threshold(tmp_path):
    """``--target-prior`` reaches the estimator: a higher prior lowers the prior method's threshold
    on the posterior and calls at least as many cells Parasitized on the bundled demo field
    (bundled model), and summary.json names the prior; out-of-range values are refused."""
    from pathlib import Path

    import malaria_screen

    field = next((Path(malaria_screen.__file__).parent / "assets" / "demo_field").glob("*.jpg"))
    out = {}
    for prior in ("0.02", "0.2"):
        r = CliRunner().invoke(_app(), ["smear", str(field), "--out", str(tmp_path / prior), "--target-prior", prior,
                                        "--workers", "1", "--no-overlays"])
        assert r.exit_code == 0, r.output
        out[prior] = json.loads((tmp_path / prior / "summary.json").read_text())
    q_low, q_high = out["0.02"]["settings"]["quantifier"], out["0.2"]["settings"]["quantifier"]
    assert (q_low["method"], q_low["target_prior"], q_high["target_prior"]) == ("prior", 0.02, 0.2)
    assert q_high["threshold_"] < q_low["threshold_"]
    assert out["0.2"]["n_infected"] >= out["0.02"]["n_infected"]
    r = CliRunner().invoke(_app(), ["smear", str(field), "--out", str(tmp_path / "bad"), "--target-prior", "0"])
    assert r.exit_code == 2 and "--target-prior" in r.output
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_smear_runs_the_bundled_model_on_onnx_runtime_with_the_same_answers_as_torch(tmp_path, iml_dir):
    """The default back-end for the bundled model is ONNX Runtime (model.onnx, no torch import); on
    three IML fields (another microscope) and the bundled demo field it gives PyTorch's cell calls,
    self-check verdicts and parasitemias, and the cell probabilities to float rounding."""
    from pathlib import Path

    import malaria_screen

    fields = sorted((iml_dir / "images").iterdir())[:3]
    fields.append(next((Path(malaria_screen.__file__).parent / "assets" / "demo_field").glob("*.jpg")))
    out = {}
    for name, extra in (("default", []), ("torch", ["--backend", "torch"])):
        r = CliRunner().invoke(_app(), ["smear", *map(str, fields), "--out", str(tmp_path / name), "--workers", "1",
                                        "--no-overlays", "--quiet", *extra])
        assert r.exit_code == 0, r.output
        out[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert out["default"]["settings"]["model"].endswith("model.onnx")
    assert not out["torch"]["settings"]["model"].endswith(".onnx")
    for key in ("n_rbc", "n_infected", "parasitemia", "parasitemia_ci95", "out_of_domain"):
        assert out["default"][key] == out["torch"][key], key
    for fa, fb in zip(out["default"]["fields"], out["torch"]["fields"]):
        a = json.loads((tmp_path / "default" / fa["json"]).read_text())
        b = json.loads((tmp_path / "torch" / fb["json"]).read_text())
        assert a["in_domain"] == b["in_domain"] is not None and a["domain_score"] == pytest.approx(b["domain_score"], abs=1e-3)
        assert [c["label"] for c in a["cells"]] == [c["label"] for c in b["cells"]] and a["cells"]
        assert max(abs(c["p_parasitized"] - d["p_parasitized"]) for c, d in zip(a["cells"], b["cells"])) < 1e-5
