"""Record: the bundled model exported to ONNX fp32 and int8, checked on the test patients.

Usage: python benchmarks/bench_export.py [--data DIR]

Runs the ``malaria-screen export --int8`` pipeline (:func:`malaria_screen.export.pipeline.export_model`)
on the bundled default model into a temporary folder: ONNX fp32, then static int8 (QDQ)
calibrated on 512 cells of the split's training patients (seed 0); then torch, ONNX fp32 and ONNX
int8 side by side on the split's **test** patients: file size, accuracy, ROC-AUC, max |Δp|
against torch and label agreement. Writes ``benchmarks/results/bundled_export.json`` (tied to the
bundled weights' SHA-256). The shipped ``model.onnx``/``model.int8.onnx`` are not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import BUNDLED_WEIGHTS, write_record  # noqa: E402

MODEL_DIR = BUNDLED_WEIGHTS.parent
KEYS = {"torch": "torch", "onnx-fp32": "onnx_fp32", "onnx-int8": "onnx_int8"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MALARIA_SCREEN_DATA", "../shared/data")) / "nih_cell_images")
    args = ap.parse_args()

    from malaria_screen.export.pipeline import export_model

    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        rep = export_model(MODEL_DIR, Path(tmp) / "model.int8.onnx", int8=True, data_dir=args.data, seed=0)
    if not rep["test"]:
        raise SystemExit(f"no test-patient check (data missing at {args.data}?)")
    figures: dict = {"torch.size_bytes": BUNDLED_WEIGHTS.stat().st_size}
    for row in rep["test"]:
        k = KEYS[row["backend"]]
        if row["backend"] != "torch":
            figures[f"{k}.size_bytes"] = row["size_bytes"]
        figures[f"{k}.accuracy"] = row["accuracy"]
        figures[f"{k}.roc_auc"] = row["roc_auc"]
        figures[f"{k}.accuracy_delta_points"] = row["accuracy_delta_points"]
        figures[f"{k}.max_abs_diff"] = row["max_abs_diff"]
        figures[f"{k}.same_label_frac"] = row["label_agreement"]
    figures["test.n_cells"] = rep["test_set"]["n_cells"]
    figures["test.n_patients"] = rep["test_set"]["n_patients"]
    figures["int8.calibration_cells"] = rep["calibration"]["n_cells"]
    figures["int8.calibration_patients"] = rep["calibration"]["n_patients"]
    figures["int8.size_ratio_to_fp32"] = figures["onnx_int8.size_bytes"] / figures["onnx_fp32.size_bytes"]
    notes = (f"bundled default model exported by export_model(int8=True, quant_format='qdq', opset 17, seed 0); "
             f"int8 calibrated on {rep['calibration']['n_cells']} cells of {rep['calibration']['n_patients']} TRAINING "
             f"patients; compared on the held-out TEST patients of split.json: {rep['test_set']['n_patients']} patients, "
             f"{rep['test_set']['n_cells']} cells. torch.size_bytes is weights.safetensors (fp32).")
    path = write_record("bundled_export", figures, notes=notes, uses_bundled_model=True)
    print(json.dumps(figures, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
