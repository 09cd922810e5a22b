"""The ``malaria-screen export`` pipeline: export, optionally quantise, then prove parity and accuracy.

1. Export the run's PyTorch model to ONNX fp32 (:func:`~malaria_screen.export.onnx.export_onnx`).
2. With ``int8``: calibrate on cells of the run's TRAINING patients (``split.json``) and quantise
   (:func:`~malaria_screen.export.onnx.quantize_int8`).
3. Check: fp32 ONNX Runtime against PyTorch (max |p difference| must be <= ``parity_tol``), and
   accuracy / ROC-AUC of torch, fp32 and int8 side by side on the run's TEST patients. The
   check is stored in the written model's metadata (``malaria_screen.export_check``) and in a
   JSON report beside it (``<out stem>.report.json``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from malaria_screen.export.backend_agreement import compare_backends
from malaria_screen.export.onnx import export_onnx, quantize_int8, set_metadata
from malaria_screen.export.split_cells import default_nih_dir, load_split_cells
from malaria_screen.fileio import atomic_write_bytes, atomic_write_json

__all__ = ["export_model", "ExportParityError", "report_path"]

log = logging.getLogger(__name__)

META_CHECK = "malaria_screen.export_check"


class ExportParityError(RuntimeError):
    """The fp32 ONNX model disagrees with PyTorch beyond the tolerance."""


def report_path(out: str | Path) -> Path:
    """``cellnet.int8.onnx`` -> ``cellnet.int8.report.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".report.json")


def export_model(
    model_dir: str | Path,
    out: str | Path,
    *,
    int8: bool = False,
    data_dir: str | Path | None = None,
    calibration_cells: int = 512,
    quant_format: str = "qdq",
    check: bool = True,
    parity_tol: float = 1e-4,
    seed: int = 0,
    opset: int = 17,
) -> dict:
    """Export a run folder to ONNX (fp32 or int8) and check it.

    Parameters
    ----------
    model_dir : path
        Run folder (``config.json``, ``weights.safetensors``, ``split.json``), e.g. the bundled
        default model folder.
    out : path
        Destination ``.onnx`` file (fp32, or int8 with ``int8=True``); written atomically.
    int8 : bool, default=False
        Static int8 quantisation calibrated on training-patient cells.
    data_dir : path, optional
        NIH cell folder the split's files are relative to; default
        ``$MALARIA_SCREEN_DATA/nih_cell_images``.
    calibration_cells : int, default=512
        Training-patient cells used for calibration (random, seeded).
    quant_format : {"qdq", "qoperator"}, default="qdq"
    check : bool, default=True
        Evaluate on the split's test patients (skipped, with a warning, when the data or the
        split are missing; fp32 parity is then checked on the bundled-free random cells).
    parity_tol : float, default=1e-4
        Largest accepted |p_torch - p_onnx_fp32|.
    seed : int, default=0
    opset : int, default=17

    Returns
    -------
    report : dict
        ``out``, ``precision``, ``size_bytes`` (per back-end), ``parity`` (max/mean abs diff of
        fp32 vs torch, on how many cells), ``test`` (rows of :func:`compare_backends`, or None)
        and ``calibration`` (cells, patients).

    Raises
    ------
    FileNotFoundError
        If ``int8`` and the split or data folder is missing (calibration needs real cells).
    ExportParityError
        If fp32 ONNX differs from PyTorch by more than ``parity_tol`` (nothing is written).
    """
    from malaria_screen.inference import OnnxPredictor, Predictor  # torch and ONNX Runtime: only when exporting

    model_dir, out = Path(model_dir), Path(out)
    data_dir = Path(data_dir) if data_dir is not None else default_nih_dir()
    split = model_dir / "split.json"
    have_data = split.is_file() and data_dir.is_dir()
    pt = Predictor.from_dir(model_dir)
    report: dict = {"out": str(out), "model": str(model_dir), "precision": "int8-" + quant_format if int8 else "fp32",
                    "size_bytes": {}, "parity": None, "test": None, "calibration": None}
    with tempfile.TemporaryDirectory(prefix="malaria-screen-export-") as tmp:
        fp32 = Path(tmp) / "model.fp32.onnx"
        export_onnx(pt, fp32, opset=opset)
        report["size_bytes"]["onnx-fp32"] = fp32.stat().st_size
        ort32 = OnnxPredictor.from_file(fp32)

        test = None
        if check and have_data:
            test = load_split_cells(split, data_dir, "test", pt.input_size, positive_class=pt.config.positive_class)
        elif check:
            log.warning("no split.json in %s or no data at %s: skipping the test-patient check", model_dir, data_dir)
        cells = test.cells if test is not None else np.random.default_rng(seed).integers(
            0, 256, (256, pt.input_size, pt.input_size, 3), dtype=np.uint8)
        d = np.abs(pt.predict_proba_prepared(cells) - ort32.predict_proba_prepared(cells))
        report["parity"] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "n_cells": int(len(cells)),
                            "cells": "test patients" if test is not None else "random uint8", "tolerance": parity_tol}
        if d.max() > parity_tol:
            raise ExportParityError(f"ONNX fp32 differs from torch by {d.max():.2e} > {parity_tol:.0e}")

        models = {"torch": pt, "onnx-fp32": ort32}
        final = fp32
        if int8:
            if not have_data:
                raise FileNotFoundError(f"int8 calibration needs the run's split.json ({split}) and the NIH cells ({data_dir})")
            cal = load_split_cells(split, data_dir, "train", pt.input_size, n=calibration_cells, seed=seed,
                                   positive_class=pt.config.positive_class)
            report["calibration"] = {"part": "train", "n_cells": int(len(cal.y)), "n_patients": cal.n_patients, "seed": seed}
            final = Path(tmp) / "model.int8.onnx"
            quantize_int8(fp32, final, cal.cells, quant_format=quant_format, calibration_info=report["calibration"])
            report["size_bytes"]["onnx-int8"] = final.stat().st_size
            models["onnx-int8"] = OnnxPredictor.from_file(final)
        if test is not None:
            report["test"] = compare_backends(models, test, reference="torch", sizes=report["size_bytes"])
            report["test_set"] = {"n_cells": int(len(test.y)), "n_patients": test.n_patients, "part": "test"}

        import onnx

        m = onnx.load(str(final))
        set_metadata(m, {META_CHECK: json.dumps({k: report[k] for k in ("parity", "test", "calibration")})})
        atomic_write_bytes(out, m.SerializeToString())
    report["size_bytes"]["written"] = out.stat().st_size
    atomic_write_json(report_path(out), report)
    log.info("wrote %s (%d bytes) and %s", out, out.stat().st_size, report_path(out))
    return report
