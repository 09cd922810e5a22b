"""CLI: export, predict/evaluate with the ONNX back-end, explain, bench-infer."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner
from typer_text import flat

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def cli():
    from malaria_screen.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_export_int8_prints_side_by_side_and_writes_report(cli, random_run, nih_dir, tmp_path):
    out = tmp_path / "m.int8.onnx"
    r = cli("export", "--model", random_run, "--format", "onnx", "--int8", "--out", out, "--data", nih_dir,
            "--calibration-cells", 64)
    assert r.exit_code == 0, r.output
    for word in ("torch", "onnx-fp32", "onnx-int8", "ROC-AUC", "3 patients"):
        assert word in r.output
    rep = json.loads((tmp_path / "m.int8.report.json").read_text())
    assert rep["precision"] == "int8-qdq" and rep["parity"]["max_abs_diff"] <= 1e-4
    assert rep["calibration"]["n_patients"] == 6 and rep["test_set"]["n_patients"] == 3
    bad = cli("export", "--model", random_run, "--format", "tflite", "--out", out)
    text = flat(bad.output)
    assert bad.exit_code == 2 and "Invalid value for '--format'" in text and "'tflite' is not one of 'onnx'" in text, text
    bad = cli("export", "--model", random_run, "--out", tmp_path / "m.pt")
    assert bad.exit_code == 2 and "must end in .onnx" in bad.output, bad.output


def test_predict_and_evaluate_with_onnx_backend(cli, random_run, onnx_fp32, sample_pngs, nih_dir, tmp_path):
    out = tmp_path / "p.csv"
    r = cli("predict", *sample_pngs[:6], "--model", onnx_fp32, "--backend", "onnx", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    rows_onnx = list(csv.DictReader(out.open()))
    r = cli("predict", *sample_pngs[:6], "--model", random_run, "--backend", "torch", "--out", tmp_path / "t.csv", "--quiet")
    rows_torch = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [x["label"] for x in rows_onnx] == [x["label"] for x in rows_torch]
    bad = cli("predict", sample_pngs[0], "--model", onnx_fp32, "--backend", "torch", "--out", out)
    assert bad.exit_code == 2 and "is an ONNX" in bad.output, bad.output
    # evaluate: a tiny NIH-layout folder with 2 training and 2 test patients' cells; the ONNX
    # model carries its split's patients and leaves the training ones out
    split = json.loads((random_run / "split.json").read_text())["splits"]
    data = tmp_path / "nih"
    files = split["train"]["files"][:48] + split["test"]["files"][:48]
    for rel in files:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(nih_dir / rel, data / rel)
    r = cli("evaluate", data, "--model", onnx_fp32, "--out", tmp_path / "ev", "--n-boot", 20,
            "--cache-dir", tmp_path / "cache", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "left out 48 cells" in r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_cells"] == 48 and m["backend"] == "onnx"


def test_explain_writes_overlays_and_survives_bad_files(cli, random_run, sample_pngs, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "cams"
    r = cli("explain", sample_pngs[0], sample_pngs[-1], bad, "--model", random_run, "--out", out)
    assert r.exit_code == 1  # one file failed
    rows = list(csv.DictReader((out / "explanations.csv").open()))
    assert len(rows) == 3 and rows[2]["error"] and not rows[0]["error"]
    from PIL import Image

    from malaria_screen.data.io import decode_image

    ov = Image.open(out / rows[0]["overlay"])
    assert ov.size[::-1] == decode_image(sample_pngs[0]).shape[:2]
    bad = cli("explain", sample_pngs[0], "--model", random_run, "--out", out, "--class", "Nope")
    assert bad.exit_code == 2 and "--class must be one of" in bad.output, bad.output


def test_unwritable_outputs_are_refused_up_front_or_reported_per_file(cli, random_run, sample_pngs, tmp_path):
    """--out that cannot be written is refused before any work (usage error, exit 2); an overlay
    that cannot be written (here a folder already holds its name) is that file's error row, and
    the other files' overlays and explanations.csv are still written."""
    folder, afile = tmp_path / "existing_dir", tmp_path / "afile"
    folder.mkdir()
    afile.write_text("x")
    runner = CliRunner()
    from malaria_screen.cli import app

    for args in (["predict", sample_pngs[0], "--out", folder],
                 ["predict", sample_pngs[0], "--out", afile / "r.csv"],
                 ["explain", sample_pngs[0], "--model", random_run, "--out", afile]):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 2 and r.exception is not None and "--out" in r.output, (args, r.output)
    out = tmp_path / "cams"
    (out / f"{sample_pngs[0].stem}_gradcam.png").mkdir(parents=True)
    r = cli("explain", sample_pngs[0], sample_pngs[-1], "--model", random_run, "--out", out)
    assert r.exit_code == 1
    rows = list(csv.DictReader((out / "explanations.csv").open()))
    assert rows[0]["error"] and not rows[0]["overlay"]
    assert not rows[1]["error"] and (out / rows[1]["overlay"]).is_file()


def test_bench_infer_prints_table(cli, random_run, onnx_fp32, nih_dir, tmp_path):
    r = cli("bench-infer", nih_dir, "--model", random_run, "--fp32", onnx_fp32, "--backends", "torch,onnx-fp32",
            "--n-files", 32, "--batch", 4, "--batch", 16, "--threads", 1, "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b.json").read_text())
    assert {(x["backend"], x["batch"]) for x in res["rows"]} == {("torch", 4), ("torch", 16), ("onnx-fp32", 4), ("onnx-fp32", 16)}
    assert all(x["end_to_end"] > 0 and x["decode"] > 0 and x["infer"] > 0 and x["ceiling_ratio"] > 0 for x in res["rows"])
    assert "matmul ceiling" in r.output


@pytest.mark.slow  # 16 s in the last full run (2 cores)
def test_predict_stderr_has_our_error_not_opencvs_log(sample_pngs, nih_dir, tmp_path):
    """Truncated PNG and WebP files: the only report is our per-file error, never a decoder's own
    log line (PNG now goes through libspng, lossless WebP through OpenCV, whose "[ WARN]" log the
    CLI quiets with OPENCV_LOG_LEVEL=ERROR unless the user set the variable: the user's value is
    kept). Run as a subprocess: OpenCV reads the variable once, when first imported."""
    import os
    import subprocess
    import sys

    png = tmp_path / "truncated.png"
    png.write_bytes(sample_pngs[0].read_bytes()[:3000])
    webp_src = sorted((nih_dir / "Parasitized").glob("*.webp"))[0]
    webp = tmp_path / "truncated.webp"
    webp.write_bytes(webp_src.read_bytes()[:3000])
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_LOG_LEVEL"}
    for bad in (png, webp):
        cmd = [sys.executable, "-m", "malaria_screen.cli", "predict", str(bad), "--out", str(tmp_path / "p.csv"), "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        row = (tmp_path / "p.csv").read_text().splitlines()[1]
        assert r.returncode == 1 and ("truncated or corrupt" in row or "corrupt image" in row), row
        assert "WARN" not in r.stderr and "libpng" not in r.stderr.lower(), r.stderr
    # the CLI sets OpenCV's level only when the user did not
    code = (f"import os, sys; sys.argv = ['malaria-screen', 'predict', {str(tmp_path / 'none.png')!r}, '--out', {str(tmp_path / 'q.csv')!r}]\n"
            "from malaria_screen.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LEVEL=' + str(os.environ.get('OPENCV_LOG_LEVEL')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "LEVEL=ERROR" in r.stdout, r.stdout[-300:]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, "OPENCV_LOG_LEVEL": "WARNING"}, timeout=300)
    assert "LEVEL=WARNING" in r.stdout, r.stdout[-300:]


def test_cli_sets_pillows_block_size_unless_the_user_did():
    """The CLI makes Pillow allocate large images in 64 MB blocks, which glibc returns to the system
    when freed (decoding threads otherwise keep them: README, predict memory); a value the user
    set is kept. Run as a subprocess: Pillow reads the variable once, when first imported."""
    import os
    import subprocess
    import sys

    code = "import malaria_screen.cli; from PIL import Image; print(Image.core.get_block_size())"
    env = {k: v for k, v in os.environ.items() if k != "PILLOW_BLOCK_SIZE"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert int(r.stdout) == 64 << 20
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PILLOW_BLOCK_SIZE": "8m"},
                       timeout=120, check=True)
    assert int(r.stdout) == 8 << 20


def test_explain_refuses_onnx_models_empty_input_and_grayscale_files(cli, random_run, onnx_fp32, sample_pngs, tmp_path):
    """An .onnx --model is a usage error naming why (Grad-CAM needs gradients); a folder without
    images exits 1 with a message; a grayscale copy of a real cell gets an error row and the
    colour original beside it its overlay."""
    from PIL import Image

    r = cli("explain", sample_pngs[0], "--model", onnx_fp32, "--out", tmp_path / "a")
    assert r.exit_code == 2
    assert "explain needs a PyTorch run folder" in r.output and "ONNX models cannot be explained" in r.output
    assert "backend=" not in r.output
    site = tmp_path / "site"  # a site folder (adapt's): refused up front, pointing at the cell model inside
    site.mkdir()
    (site / "site.json").write_text("{}")
    r = cli("explain", sample_pngs[0], "--model", site, "--out", tmp_path / "s")
    assert r.exit_code == 2 and "is a site model" in flat(r.output) and not (tmp_path / "s").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("explain", empty, "--model", random_run, "--out", tmp_path / "b")
    assert r.exit_code == 1 and f"no image files found in {empty}" in r.output
    assert not (tmp_path / "b" / "explanations.csv").exists()
    gray = tmp_path / "gray.png"
    Image.open(sample_pngs[0]).convert("L").convert("RGB").save(gray)
    out = tmp_path / "c"
    r = cli("explain", gray, empty, sample_pngs[0], "--model", random_run, "--out", out)
    assert r.exit_code == 1 and f"warning: no image files found in {empty}" in r.output
    rows = list(csv.DictReader((out / "explanations.csv").open()))
    assert len(rows) == 2 and "grayscale" in rows[0]["error"] and not rows[0]["overlay"]
    assert not rows[1]["error"] and (out / rows[1]["overlay"]).is_file()


def test_export_and_bench_options_out_of_range_are_usage_errors(cli, random_run, tmp_path):
    """--opset outside the range the exporter supports (tried: tests/export/test_onnx.py), an
    int8 opset quantisation fails on, bench-infer integers below 1 and an uncreatable output are
    refused before any work (exit 2, no traceback, nothing written)."""
    from malaria_screen.cli.deploy import OPSET_RANGE
    from malaria_screen.export.onnx import MAX_INT8_OPSET, MAX_OPSET, MIN_OPSET

    assert OPSET_RANGE == (MIN_OPSET, MAX_OPSET)
    out = tmp_path / "m.onnx"
    for args in (["--opset", 5], ["--opset", MIN_OPSET - 1], ["--opset", MAX_OPSET + 1], ["--int8", "--opset", MAX_INT8_OPSET + 1]):
        r = cli("export", "--model", random_run, "--out", out, *args)
        assert r.exit_code == 2 and "'--opset'" in r.output and "Traceback" not in r.output, (args, r.output)
    assert not out.exists()
    for args in (["--batch", 0], ["--workers", 0], ["--threads", -1]):
        r = cli("bench-infer", "--model", random_run, *args)
        assert r.exit_code == 2 and f"'{args[0]}'" in r.output, (args, r.output)
    if Path("/proc/self").is_dir():  # root passes os.access on /proc, where nothing can be created
        r = cli("export", "--model", random_run, "--out", "/proc/nope/m.onnx")
        assert r.exit_code == 2 and "'--out'" in r.output and "cannot be written" in r.output
        r = cli("bench-infer", "--model", random_run, "--json", "/proc/nope/b.json")
        assert r.exit_code == 2 and "'--json'" in r.output
