"""The edge install (``malaria-screen[runtime]``: numpy, Pillow, onnxruntime, typer) classifies cells.

A subprocess blocks every package the runtime install lacks (torch, OpenCV, onnx, scikit-learn,
matplotlib, ...), runs the real CLI ``predict`` on the sample PNGs with an ``.onnx`` model, and
reports which modules were imported.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")

_SCRIPT = r"""
import importlib.abc, json, sys
BLOCK = {"torch", "torchvision", "lightning", "torchmetrics", "safetensors", "cv2", "onnx", "sklearn", "scipy",
         "skimage", "matplotlib", "gradio", "fastapi", "tensorboard"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the runtime install)", name=name)
        return None

sys.meta_path.insert(0, Block())
from malaria_screen.cli import app
code = 0
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit as e:
    code = e.code
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCK)
print("RESULT " + json.dumps({"code": code, "loaded": loaded}))
"""


def test_runtime_install_classifies_without_torch(onnx_fp32, random_run, sample_pngs, tmp_path):
    out = tmp_path / "pred.csv"
    folder = sample_pngs[0].parent.parent
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, "predict", str(folder), "--model", str(onnx_fp32),
                           "--backend", "onnx", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout + proc.stderr
    res = json.loads(line[-1][7:])
    assert res["loaded"] == [], f"runtime path imported {res['loaded']}"
    assert res["code"] in (0, None), proc.stdout + proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(sample_pngs) and all(r["label"] in ("Parasitized", "Uninfected") for r in rows)
    # same as torch with OpenCV: the numpy area resize gives OpenCV's pixels, so only float
    # rounding between the two engines remains
    from malaria_screen.inference import Predictor

    ref = {r.path: r.p_parasitized for r in Predictor.from_dir(random_run).predict_files(sample_pngs)}
    diffs = [abs(float(r["p_parasitized"]) - ref[r["path"]]) for r in rows]
    assert max(diffs) < 1e-4, diffs


def test_runtime_install_picks_onnx_for_a_model_folder(onnx_fp32, sample_pngs, tmp_path):
    """Without torch, ``--model FOLDER`` (e.g. the bundled default) falls back to its model.onnx."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onnx_fp32.read_bytes())
    out = tmp_path / "pred.json"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, "predict", *map(str, sample_pngs[:4]), "--model", str(folder),
                           "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=120)
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert res["loaded"] == [] and res["code"] in (0, None), proc.stdout + proc.stderr
    body = json.loads(out.read_text())
    assert body["backend"] == "onnx" and body["model"] == str(folder / "model.onnx") and len(body["results"]) == 4
