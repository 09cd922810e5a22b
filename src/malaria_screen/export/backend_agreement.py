"""Side-by-side check of back-ends (torch, ONNX fp32, ONNX int8) on the same test-patient cells."""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from malaria_screen.export.split_cells import SplitCells

__all__ = ["compare_backends"]

log = logging.getLogger(__name__)


def compare_backends(models: Mapping[str, object], data: SplitCells, *, reference: str | None = None,
                     sizes: Mapping[str, int] | None = None) -> list[dict]:
    """Accuracy, ROC-AUC and agreement of several classifiers on the same cells.

    Parameters
    ----------
    models : mapping of name to classifier
        Each has ``predict_proba_prepared``, ``positive_index`` and ``threshold``
        (:class:`~malaria_screen.inference.base.CellClassifierBase`).
    data : SplitCells
        Cells and labels (test patients).
    reference : str, optional
        Name whose probabilities the others are compared with; default the first.
    sizes : mapping of name to int, optional
        Model file sizes, bytes, copied into the rows.

    Returns
    -------
    rows : list of dict
        Per model: ``backend``, ``size_bytes``, ``n_cells``, ``n_patients``, ``accuracy``,
        ``roc_auc``, ``sensitivity``, ``specificity``, ``max_abs_diff`` and ``mean_abs_diff``
        of p_parasitized against the reference, ``label_agreement`` (fraction), and
        ``accuracy_delta_points`` (percentage points against the reference).
    """
    from malaria_screen.evaluation.metrics import binary_metrics  # scikit-learn: only when comparing

    names = list(models)
    ref = reference or names[0]
    p = {}
    for name in names:
        m = models[name]
        p[name] = m.predict_proba_prepared(data.cells)[:, m.positive_index].astype(np.float64)
    rows = []
    for name in names:
        m = models[name]
        met = binary_metrics(data.y, p[name], threshold=m.threshold)
        ref_m = models[ref]
        d = np.abs(p[name] - p[ref])
        agree = float(np.mean((p[name] >= m.threshold) == (p[ref] >= ref_m.threshold)))
        rows.append({
            "backend": name, "size_bytes": (sizes or {}).get(name), "n_cells": int(len(data.y)),
            "n_patients": data.n_patients, "accuracy": met["accuracy"], "roc_auc": met["roc_auc"],
            "sensitivity": met["sensitivity"], "specificity": met["specificity"],
            "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "label_agreement": agree,
        })
    ref_acc = rows[names.index(ref)]["accuracy"]
    for r in rows:
        r["accuracy_delta_points"] = 100.0 * (r["accuracy"] - ref_acc)
    return rows
