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
from typer_text import flat

runner = CliRunner()


def _run(*args):
    from malaria_screen.cli import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def four_samples(samples_dir: Path, missing) -> list[Path]:
    files = sorted((samples_dir / "Parasitized").glob("*.png"))[:2] + sorted((samples_dir / "Uninfected").glob("*.png"))[:2]
    if len(files) < 4:
        missing("bundled sample PNGs not present")
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
    assert sorted(os.listdir(tmp_path)) == ["empty", "p.csv", "p.summary.json"]


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


def test_predict_summary_estimates_the_prevalence_of_a_bag_of_unseen_patients(nih_dir, tmp_path):
    """``r.summary.json`` beside ``r.csv``: counts per class and the EM prevalence with its CI,
    on a real bag of 190 Uninfected + 10 Parasitized cells of the bundled model's test patients
    (5 %; the model's NIH training cells are 36 % Parasitized)."""
    import json

    from malaria_screen.inference.base import default_model_dir

    manifest = json.loads((default_model_dir() / "split.json").read_text())
    split = manifest["splits"]["test"]["files"]
    pos = [f for f in split if f.startswith("Parasitized/")]
    neg = [f for f in split if f.startswith("Uninfected/")]
    pos, neg = pos[:: len(pos) // 10][:10], neg[:: len(neg) // 190][:190]  # spread over the test patients
    bag = tmp_path / "bag"
    bag.mkdir()
    for f in pos + neg:
        (bag / Path(f).name).symlink_to(nih_dir / f)
    out = tmp_path / "r.csv"
    r = _run("predict", bag, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "r.summary.json").read_text())
    rows = list(csv.DictReader(out.open()))
    assert s["n"] == 200 and s["n_failed"] == 0
    assert s["counts"] == dict(Counter(x["label"] for x in rows)) | {k: 0 for k in ("Parasitized", "Uninfected")
                                                                    if k not in {x["label"] for x in rows}}
    n = manifest["splits"]["train"]["n_per_class"]
    nih_prior = n["Parasitized"] / (n["Parasitized"] + n["Uninfected"] - manifest["extra_negatives"]["n_cells"])
    assert s["method"] == "em" and s["parameters"]["train_prior"] == pytest.approx(nih_prior) and 0.3 < nih_prior < 0.4
    lo, hi = s["prevalence_ci95"]
    assert lo <= 0.05 <= hi and lo <= s["prevalence"] <= hi
    assert f"prevalence of Parasitized: {100 * s['prevalence']:.2f}%" in r.output


def test_predict_gives_one_row_per_file_however_it_is_named(four_samples, tmp_path):
    """``predict a.png a.png link/a.png ./x/../a.png`` classifies a.png once (first spelling kept)."""
    a = four_samples[0]
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / a.name).symlink_to(a)
    (tmp_path / "x").mkdir()
    out = tmp_path / "p.csv"
    r = _run("predict", a, a, tmp_path / "link" / a.name, a.parent / "x" / ".." / a.name, four_samples[1], "--out", out, "--quiet")
    assert r.exit_code in (0, 1), r.output
    rows = list(csv.DictReader(out.open()))
    assert [row["path"] for row in rows] == [str(a), str(four_samples[1])]
    assert "3 path(s) named a file already given" in r.output


def test_predict_table_on_a_pipe_is_plain_text_that_splits_into_the_csv_columns(four_samples, tmp_path):
    """Not on a terminal (here: the runner's captured output) the table is plain ASCII, one line
    per file, never wrapped, and its columns split on runs of two or more spaces give the CSV's
    values (the truth column is the sample's folder)."""
    import re

    out = tmp_path / "p.csv"
    r = _run("predict", *four_samples, "--out", out)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["file"])
    assert re.split(r"\s{2,}", lines[start].strip()) == ["file", "true (folder)", "label", "p_parasitized", "error"]
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows = list(csv.DictReader(out.open()))
    table = [re.split(r"\s{2,}", ln.strip()) for ln in lines[start + 2 : start + 2 + len(rows)]]
    assert table == [[Path(x["path"]).name, Path(x["path"]).parent.name, x["label"], f"{float(x['p_parasitized']):.3f}"]
                     for x in rows]
    assert all(ord(c) < 128 for c in "".join(lines[start : start + 2 + len(rows)]))


def test_table_cells_are_literal_text_and_long_rows_are_not_wrapped(capsys):
    from malaria_screen.cli.core import echo_table

    cell = "[bold]x[/bold] :smile: " + "y" * 300
    echo_table([["a", cell], ["bb", "c"]], ["name", "note"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[2].rstrip() == "a     " + cell and lines[3].rstrip() == "bb    c"
    assert lines[0].rstrip() == "name  note"


def test_predict_prints_at_most_its_table_rows_failed_files_first_and_writes_every_row(nih_dir, tmp_path):
    """On thousands of cells the printed table would cost more than classifying them: it shows
    ``PREDICT_TABLE_ROWS`` rows, the failed files among them, and says where the rest are."""
    import re

    from malaria_screen.cli.core import PREDICT_TABLE_ROWS

    cells = sorted(nih_dir.glob("*/*"))[:: 200][: PREDICT_TABLE_ROWS + 10]
    bad = tmp_path / "zz_not_an_image.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    r = _run("predict", *cells, bad, "--out", out)
    assert r.exit_code == 1, r.output  # one file failed
    assert len(list(csv.DictReader(out.open()))) == len(cells) + 1
    lines = r.output.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["file"])
    shown = [re.split(r"\s{2,}", ln.strip())[0] for ln in lines[start + 2 : start + 2 + PREDICT_TABLE_ROWS]]
    assert bad.name in shown and len(set(shown)) == PREDICT_TABLE_ROWS
    assert shown[:-1] == [c.name[:48] for c in cells[: PREDICT_TABLE_ROWS - 1]]  # input order kept
    assert f"the table shows {PREDICT_TABLE_ROWS} of {len(cells) + 1} rows, failed files first" in r.output


def test_predict_runs_the_bundled_model_onnx_with_pytorchs_labels(four_samples, tmp_path):
    """Without ``--model``, ``predict`` runs the bundled ``model.onnx`` (as ``smear`` and ``serve``
    do); ``--backend torch`` gives the same labels and probabilities to float rounding."""
    import json

    default, torch_out = tmp_path / "d.csv", tmp_path / "t.csv"
    assert _run("predict", *four_samples, "--out", default, "--quiet").exit_code == 0
    assert _run("predict", *four_samples, "--out", torch_out, "--quiet", "--backend", "torch").exit_code == 0
    assert json.loads((tmp_path / "d.summary.json").read_text())["model"].endswith("model.onnx")
    a, b = list(csv.DictReader(default.open())), list(csv.DictReader(torch_out.open()))
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert max(abs(float(x["p_parasitized"]) - float(y["p_parasitized"])) for x, y in zip(a, b)) <= 2e-6


def test_bad_arguments_of_evaluate_ensemble_and_smear_eval_are_usage_errors_before_any_work(samples_dir, data_dir, tmp_path):
    """A one-class folder, an ``--out`` that is a file, a corrupt model and a folder that is not a
    Chula-RBC-12 folder: each a usage error (exit 2, a message, no traceback), found before any
    cell is classified or field screened, and nothing written."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"garbage")
    default = Path(__file__).resolve().parents[2] / "src" / "malaria_screen" / "assets" / "default_model"
    iml = data_dir / "iml_malaria_dev"
    cases = [
        (("evaluate", samples_dir / "Parasitized", "--out", tmp_path / "ev"), "class folders"),
        (("evaluate", samples_dir, "--out", afile), "afile"),
        (("ensemble", default, default, "--out", afile), "afile"),
        (("ensemble", default, default, "--out", tmp_path / "ens", "--calibrate", samples_dir / "Parasitized"), "class folders"),
        (("smear-eval", iml / "images", "-a", iml / "annotations.json", "-o", tmp_path / "se", "--limit", "1",
          "--model", bad_onnx), "cannot load the cell model"),
        (("smear-eval", iml / "images", "-a", iml / "annotations.json", "-o", tmp_path / "se", "--limit", "1",
          "--no-classify", "--chula", data_dir / "chula_rbc" / "images"), "Chula-RBC-12"),
    ]
    for args, what in cases:
        r = _run(*args)
        assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), (args, r.output)
        assert what in flat(r.output), (args, r.output)
    assert afile.read_text() == "mine" and not (tmp_path / "ev").exists() and not (tmp_path / "se").exists()
    assert not (tmp_path / "ens").exists()


def test_train_and_research_refuse_bad_out_and_option_combinations_before_any_work(tmp_path):
    """Each a usage error (exit 2, no traceback) before a cell is read: an --out inside DATA_DIR
    (its plots would become cells of the next run), --resume without a checkpoint (no folder
    left behind), 0 epochs, a plateau schedule without validation patients, an unknown model or
    optimizer for cv / lr-find."""
    data = tmp_path / "data"
    for c in ("Parasitized", "Uninfected"):
        (data / c).mkdir(parents=True)
    cases = [
        (("train", data, "--out", data / "run1"), "inside DATA_DIR"),
        (("train", data, "--out", tmp_path / "nores", "--resume"), "no checkpoint"),
        (("train", data, "--out", tmp_path / "r0", "--epochs", "0"), "epochs"),
        (("train", data, "--out", tmp_path / "rp", "--scheduler", "plateau", "--val-fraction", "0"), "validation patients"),
        (("cv", data, "--out", tmp_path / "cv", "--model", "nope"), "nope"),
        (("lr-find", data, "--out", tmp_path / "lr", "--optimizer", "sgd"), "sgd"),
    ]
    for args, what in cases:
        r = _run(*args)
        assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), (args, r.output)
        assert what in flat(r.output), (args, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and not (data / "run1").exists()
