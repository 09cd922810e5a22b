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
