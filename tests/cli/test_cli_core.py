"""CLI core commands: ``predict``'s inputs, option bounds, up-front output check and summary line.

Runs the bundled default model on the bundled NIH sample PNGs.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

runner = CliRunner()


def _run(*args):
    from malaria_screen.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def four_samples(samples_dir: Path) -> list[Path]:
    files = sorted((samples_dir / "Parasitized").glob("*.png"))[:2] + sorted((samples_dir / "Uninfected").glob("*.png"))[:2]
    if len(files) < 4:
        pytest.skip("bundled sample PNGs not present")
    return files


def test_predict_without_any_image_file_exits_1_and_writes_nothing(tmp_path):
    """A folder holding no image (only a text file, which is skipped) is not "0 files, success"."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    out = tmp_path / "p.csv"
    r = _run("predict", empty, "--out", out)
    assert r.exit_code == 1, r.output
    assert f"error: no image files found in {empty}" in r.output
    assert not out.exists()


def test_predict_warns_about_an_empty_folder_goes_on_and_names_the_classes(four_samples, tmp_path):
    """An empty folder beside good files is a warning; the summary counts each of the model's
    classes by name (not "other"); the output check leaves no probe behind."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "p.csv"
    r = _run("predict", empty, *four_samples, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert f"warning: no image files found in {empty}; skipped" in r.output
    rows = list(csv.DictReader(out.open()))
    assert [Path(x["path"]).name for x in rows] == [f.name for f in four_samples] and not any(x["error"] for x in rows)
    n = Counter(x["label"] for x in rows)
    assert set(n) <= {"Parasitized", "Uninfected"}
    assert f"4 files: {n['Parasitized']} Parasitized, {n['Uninfected']} Uninfected, 0 failed -> {out}" in r.output
    assert "other" not in r.output
    assert sorted(os.listdir(tmp_path)) == ["empty", "p.csv"]


@pytest.mark.parametrize("option,value", [("--workers", -1), ("--workers", 0), ("--batch-size", 0)])
def test_predict_integer_options_below_1_are_usage_errors(four_samples, tmp_path, option, value):
    out = tmp_path / "p.csv"
    r = _run("predict", four_samples[0], "--out", out, option, value)
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{option}'" in r.output and "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_predict_refuses_an_uncreatable_out_folder_before_any_work(four_samples):
    """/proc passes os.access for root, but nothing can be created there: the check tries it."""
    r = _run("predict", four_samples[0], "--out", "/proc/nope/p.csv")
    assert r.exit_code == 2, r.output
    assert "'--out'" in r.output and "cannot be written" in r.output
    assert "files:" not in r.output  # no summary line: refused before inference
