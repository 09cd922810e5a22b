"""The smear Typer commands, registered on a bare app."""

from __future__ import annotations

import json

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
