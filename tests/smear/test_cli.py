"""The smear Typer commands, registered on a bare app."""

from __future__ import annotations

import json

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from smear_synth import synthetic_field
from malaria_screen.cli.smear import register


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
    r = CliRunner().invoke(_app(), ["smear", str(tmp_path), "--out", str(tmp_path / "o"), "--no-classify", "--stain", "x"])
    assert r.exit_code != 0


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
    assert m["n_fields"] == 2 and 0.6 <= m["rbc_f1"] <= 1.0
    assert (tmp_path / "e" / "per_field.csv").is_file()
    # The annotators' box convention (IML boxes carry a margin) recovers near-misses, never loses matches here.
    r2 = CliRunner().invoke(
        _app(),
        ["smear-eval", str(iml_dir / "images"), "--annotations", str(iml_dir / "annotations.json"),
         "--out", str(tmp_path / "e2"), "--no-classify", "--limit", "2", "--box-scale", "1.19"],
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
    assert bad.exit_code != 0


def test_smear_exits_1_when_a_field_fails_and_keeps_the_others(tmp_path):
    img, _ = synthetic_field()
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "f.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    r = CliRunner().invoke(_app(), ["smear", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--no-classify"])
    assert r.exit_code == 1, r.output
    assert "bad.png: ERROR" in r.output and "1 failed" in r.output
    assert json.loads((tmp_path / "o" / "f.json").read_text())["n_rbc"] == 6
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["n_fields"] == 1 and s["n_failed"] == 1 and (tmp_path / "o" / "report.html").is_file()
    help_text = " ".join(CliRunner().invoke(_app(), ["smear", "--help"]).output.split())
    assert "exit status is 1 if any field failed" in help_text


def test_smear_eval_and_crops_survive_a_field_too_small_to_segment(tmp_path, iml_with_tiny_field):
    fields, ann = iml_with_tiny_field
    r = CliRunner().invoke(_app(), ["smear-eval", str(fields), "--annotations", str(ann), "--out", str(tmp_path / "e"),
                                    "--no-classify"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["n_fields"] == 2 and m["n_failed"] == 1 and m["tp"] > 100
    assert "too small" in m["failed"]["tiny.png"]
    r = CliRunner().invoke(_app(), ["crops", str(fields), "--annotations", str(ann), "--out", str(tmp_path / "c"),
                                    "--source", "detections"])
    assert r.exit_code == 0, r.output
    assert "tiny.png: ERROR" in r.output and "too small" in r.output and "2 field(s)" in r.output
    rows = (tmp_path / "c" / "groups.csv").read_text().splitlines()
    assert len(rows) > 100 and {row.rpartition(",")[2] for row in rows[1:]} == {"PA171926", "PA171966"}


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
}


@pytest.mark.parametrize("case", list(_USAGE_ERRORS))
def test_bad_out_annotations_and_field_dir_are_usage_errors(case, tmp_path, iml_with_tiny_field):
    """Checked before any work: exit status 2 and a message naming the option, no traceback."""
    fields, ann = iml_with_tiny_field
    (tmp_path / "taken").write_text("x")
    (tmp_path / "dict.json").write_text('{"image_name": "x"}')
    (tmp_path / "nobox.json").write_text('[{"image_name": "x", "objects": [{"type": "ring"}]}]')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    args, param, msg = _USAGE_ERRORS[case]
    r = CliRunner().invoke(_app(), args.format(fields=fields, ann=ann, tmp=tmp_path).split())
    text = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "Invalid value" in text and param in text and msg in text, r.output
    assert not (tmp_path / "o").exists()
