"""Write an evaluation folder: metrics.json, per-patient CSV, per-cell predictions, plots."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from malaria_screen.evaluation.metrics import evaluate_predictions, per_patient_table
from malaria_screen.fileio import atomic_write_json, atomic_write_text, rows_to_csv
from malaria_screen.plotting import save_confusion_matrix, save_roc_curve

__all__ = ["write_evaluation", "rows_to_csv"]


def write_evaluation(
    out_dir: str | Path,
    *,
    y_true: np.ndarray,
    p_pos: np.ndarray,
    patients: Sequence[str],
    relpaths: Sequence[str],
    threshold: float = 0.5,
    split_name: str = "test",
    extra: dict | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Evaluate binary predictions by patient and write the results folder.

    Writes ``metrics.json`` (see :func:`evaluate_predictions`, plus ``split`` and ``extra``),
    ``per_patient.csv`` (patient, cells, true_parasitized, predicted_parasitized,
    fraction_predicted_parasitized), ``predictions.csv`` (path, patient, true, p_parasitized),
    ``confusion_matrix.png`` and ``roc_curve.png``. All writes are atomic.

    Parameters
    ----------
    out_dir : path
    y_true : (n_cells,) ndarray of {0, 1}
        1 = Parasitized.
    p_pos : (n_cells,) ndarray of float
        Predicted probability of Parasitized.
    patients, relpaths : sequences of str of length n_cells
    threshold : float, default=0.5
    split_name : str, default="test"
        Named in metrics.json and plot titles.
    extra : dict, optional
        Merged into metrics.json (model, data, leakage notes).

    Returns
    -------
    metrics : dict
        As written to metrics.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y_true = np.asarray(y_true).astype(int)
    p_pos = np.asarray(p_pos, dtype=np.float64)
    m = evaluate_predictions(y_true, p_pos, patients, threshold=threshold, n_boot=n_boot, seed=seed)
    m["split"] = split_name
    if extra:
        m.update(extra)
    atomic_write_json(out / "metrics.json", m)
    atomic_write_text(out / "per_patient.csv", rows_to_csv(
        per_patient_table(y_true, p_pos, patients, threshold=threshold),
        ["patient", "cells", "true_parasitized", "predicted_parasitized", "fraction_predicted_parasitized"]))
    atomic_write_text(out / "predictions.csv", rows_to_csv(
        [{"path": r, "patient": pt, "true": "Parasitized" if t else "Uninfected", "p_parasitized": f"{p:.6f}"}
         for r, pt, t, p in zip(relpaths, patients, y_true, p_pos)],
        ["path", "patient", "true", "p_parasitized"]))
    title = f"{split_name}: {m['n_patients']} patients, {m['n_cells']} cells"
    save_confusion_matrix(np.asarray(m["confusion_matrix"]), ["Parasitized", "Uninfected"], out / "confusion_matrix.png", title=title)
    if "roc" in m:
        save_roc_curve(np.asarray(m["roc"]["fpr"]), np.asarray(m["roc"]["tpr"]), m["roc_auc"], out / "roc_curve.png", title=title)
    return m
