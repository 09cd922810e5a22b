"""Binary screening metrics with 95 % confidence intervals from a bootstrap over patients.

Cells of one patient are not independent, so a cell-level bootstrap or a binomial interval is
too narrow. Here each bootstrap replicate draws patients with replacement and pools all their
cells (the cluster bootstrap; Field & Welsh 2007), and the interval is the 2.5-97.5 percentile
range of the replicate statistics.

Positive class: Parasitized. Sensitivity = TP / (TP + FN); specificity = TN / (TN + FP);
precision (PPV) = TP / (TP + FP).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from malaria_screen.evaluation.bootstrap import cluster_bootstrap_weights

__all__ = ["binary_metrics", "count_matched_threshold", "patient_bootstrap_ci", "evaluate_predictions", "per_patient_table"]

_KEYS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")


def _counts_metrics(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised metrics from confusion counts (arrays of any shape); NaN where undefined."""
    with np.errstate(divide="ignore", invalid="ignore"):
        n = tp + fp + tn + fn
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
        prec = tp / (tp + fp)
        return {
            "accuracy": (tp + tn) / n,
            "sensitivity": sens,
            "specificity": spec,
            "precision": prec,
            "f1": 2 * tp / (2 * tp + fp + fn),
        }


def binary_metrics(y_true: np.ndarray, p_pos: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """Point estimates of screening metrics.

    Parameters
    ----------
    y_true : (n_cells,) ndarray of {0, 1}
        1 = Parasitized.
    p_pos : (n_cells,) ndarray of float
        Predicted probability of Parasitized.
    threshold : float, default=0.5
        Predicted Parasitized when ``p_pos >= threshold``.

    Returns
    -------
    dict
        accuracy, sensitivity, specificity, precision, f1, roc_auc (NaN if one class only),
        tp, fp, tn, fn.
    """
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(p_pos) >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    tn, fn = int((~pred & ~y).sum()), int((~pred & y).sum())
    out = {k: float(v) for k, v in _counts_metrics(np.float64(tp), np.float64(fp), np.float64(tn), np.float64(fn)).items()}
    out["roc_auc"] = float(roc_auc_score(y, p_pos)) if 0 < y.sum() < len(y) else float("nan")
    out.update(tp=tp, fp=fp, tn=tn, fn=fn)
    return out


def count_matched_threshold(y_true: np.ndarray, p_pos: np.ndarray) -> float:
    """Decision threshold at which as many cells are called positive as are positive.

    For counting (parasitemia = infected / all cells) the total count matters more than any one
    cell: on a set whose prevalence differs from the training data (1-2 % infected red cells in
    a smear against 50 % in the NIH crops) the 0.5 threshold calls far too many cells. Choosing
    it on held-out cells of the target site so that ``#(p >= t) == #positives`` calibrates the
    count (prior-shift correction by quantile matching).

    Parameters
    ----------
    y_true : np.ndarray
        ``(N,)`` bool or {0, 1} labels (1 = Parasitized).
    p_pos : np.ndarray
        ``(N,)`` float positive-class probabilities.

    Returns
    -------
    float
        Threshold in (0, 1): the k-th largest probability for k positives (ties may call a few
        more); 0.5 when there are no positives.

    Raises
    ------
    ValueError
        If the arrays differ in length or are empty.
    """
    y = np.asarray(y_true).astype(bool).reshape(-1)
    p = np.asarray(p_pos, np.float64).reshape(-1)
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"need equal, non-empty y_true/p_pos, got {y.shape} and {p.shape}")
    k = int(y.sum())
    if k == 0:
        return 0.5
    t = float(np.sort(p)[::-1][k - 1])
    return min(max(t, 1e-6), 1.0 - 1e-6)


def patient_bootstrap_ci(
    y_true: np.ndarray,
    p_pos: np.ndarray,
    patients: Sequence[str],
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, list[float]]:
    """Percentile confidence intervals of :func:`binary_metrics` from a patient bootstrap.

    Parameters
    ----------
    y_true, p_pos : (n_cells,) ndarrays
    patients : sequence of str of length n_cells
    threshold : float, default=0.5
    n_boot : int, default=1000
        Bootstrap replicates.
    seed : int, default=0
    alpha : float, default=0.05
        Gives a ``1 - alpha`` interval.

    Returns
    -------
    dict of str to [lo, hi]
        One interval per metric; ``[nan, nan]`` where too few replicates define it.
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(p_pos, dtype=np.float64)
    weights, pid = cluster_bootstrap_weights(patients, n_boot=n_boot, seed=seed)  # (n_boot, n_pat)
    n_pat = pid.max() + 1
    pred = p >= threshold
    # Per-patient confusion counts: a replicate's counts are weighted sums of these.
    per = np.stack([np.bincount(pid, weights=(pred & y), minlength=n_pat),
                    np.bincount(pid, weights=(pred & ~y), minlength=n_pat),
                    np.bincount(pid, weights=(~pred & ~y), minlength=n_pat),
                    np.bincount(pid, weights=(~pred & y), minlength=n_pat)], axis=1)
    tp, fp, tn, fn = (weights @ per).T
    stats = _counts_metrics(tp, fp, tn, fn)
    # ROC-AUC needs the cells themselves: repeat each patient's cells by its draw weight.
    order = np.argsort(pid, kind="stable")
    starts = np.searchsorted(pid[order], np.arange(n_pat))
    ends = np.searchsorted(pid[order], np.arange(n_pat), side="right")
    aucs = np.full(n_boot, np.nan)
    for b in range(n_boot):
        idx = np.concatenate([np.tile(order[starts[k]:ends[k]], w) for k, w in enumerate(weights[b]) if w])
        yb = y[idx]
        if 0 < yb.sum() < len(yb):
            aucs[b] = roc_auc_score(yb, p[idx])
    stats["roc_auc"] = aucs
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    out = {}
    for k in _KEYS:
        v = np.asarray(stats[k], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[k] = [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if len(v) >= 10 else [float("nan")] * 2
    return out


def per_patient_table(y_true: np.ndarray, p_pos: np.ndarray, patients: Sequence[str], *, threshold: float = 0.5) -> list[dict]:
    """One row per patient: patient, cells, true_parasitized, predicted_parasitized, fraction_predicted_parasitized."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(p_pos) >= threshold
    pats = np.asarray(patients)
    rows = []
    for pt in sorted(set(pats.tolist())):
        m = pats == pt
        n = int(m.sum())
        rows.append({
            "patient": pt,
            "cells": n,
            "true_parasitized": int(y[m].sum()),
            "predicted_parasitized": int(pred[m].sum()),
            "fraction_predicted_parasitized": round(float(pred[m].mean()), 6),
        })
    return rows


def evaluate_predictions(
    y_true: np.ndarray,
    p_pos: np.ndarray,
    patients: Sequence[str],
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Metrics, confusion matrix, ROC points and 95 % patient-bootstrap CIs in one dict.

    Returns
    -------
    dict
        ``accuracy, sensitivity, specificity, precision, f1, roc_auc`` (floats),
        ``ci95`` (dict of [lo, hi]), ``n_cells``, ``n_patients``, ``n_parasitized``,
        ``threshold``, ``confusion_matrix`` ([[TP, FN], [FP, TN]] with rows = true
        Parasitized, Uninfected and columns = predicted Parasitized, Uninfected), ``roc``
        (``fpr``, ``tpr`` lists, at most 200 points).
    """
    m = binary_metrics(y_true, p_pos, threshold=threshold)
    out: dict = {k: m[k] for k in _KEYS}
    out["ci95"] = patient_bootstrap_ci(y_true, p_pos, patients, threshold=threshold, n_boot=n_boot, seed=seed)
    out["ci_method"] = f"percentile bootstrap over patients, {n_boot} replicates, seed {seed}"
    out["n_cells"] = int(len(y_true))
    out["n_patients"] = int(len(set(patients)))
    out["n_parasitized"] = int(np.asarray(y_true).astype(bool).sum())
    out["threshold"] = float(threshold)
    out["confusion_matrix"] = [[m["tp"], m["fn"]], [m["fp"], m["tn"]]]
    out["confusion_matrix_layout"] = "rows: true [Parasitized, Uninfected]; columns: predicted [Parasitized, Uninfected]"
    y = np.asarray(y_true).astype(bool)
    if 0 < y.sum() < len(y):
        fpr, tpr, _ = roc_curve(y, p_pos)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(200, len(fpr))).astype(int))
        out["roc"] = {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}
    return out
