"""Multi-class evaluation by group: accuracy and macro scores with patient-bootstrap CIs.

The binary screening metrics (:mod:`malaria_screen.evaluation.metrics`) need a positive class;
an image folder with N >= 2 arbitrary classes (seed 004 trains the same CNN on MNIST/CIFAR-10)
is scored here instead: accuracy, macro-averaged F1 and one-vs-rest macro ROC-AUC, with 95 %
intervals from the same cluster bootstrap over groups (Field & Welsh 2007) as the binary metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from malaria_screen.data.dataset import CellSet
from malaria_screen.fileio import atomic_write_json
from malaria_screen.inference.predictor import Predictor

__all__ = ["evaluate_multiclass_split", "multiclass_metrics"]


def _auc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    if len(present) < n_classes:  # macro OvR over the classes present
        p = proba[:, present] / np.clip(proba[:, present].sum(1, keepdims=True), 1e-12, None)
        y = np.searchsorted(present, y)
        return float(roc_auc_score(y, p, multi_class="ovr", average="macro")) if len(present) > 2 else float(roc_auc_score(y, p[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", average="macro"))


def multiclass_metrics(
    y_true: np.ndarray,
    proba: np.ndarray,
    groups: Sequence[str],
    *,
    class_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Accuracy, macro F1 and macro one-vs-rest ROC-AUC, with group-bootstrap intervals.

    Parameters
    ----------
    y_true : (n,) ndarray of int
        True class index.
    proba : (n, n_classes) ndarray of float
        Predicted class probabilities; the prediction is the arg-max.
    groups : sequence of str of length n
        Patient (or other grouping) id; the bootstrap resamples groups.
    class_names : sequence of str, optional
    n_boot : int, default=1000
    seed : int, default=0
    alpha : float, default=0.05

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1``, ``roc_auc_ovr_macro`` (floats), ``ci95`` (dict of
        ``[lo, hi]``), ``chance_accuracy`` (share of the commonest class), ``n_cells``,
        ``n_groups``, ``confusion_matrix`` (rows true, columns predicted), ``class_names``.

    Raises
    ------
    ValueError
        If shapes disagree.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    g = np.asarray(groups)
    if p.ndim != 2 or p.shape[0] != len(y) or len(g) != len(y):
        raise ValueError(f"y_true {y.shape}, proba {p.shape} and groups {g.shape} disagree")
    k = p.shape[1]
    pred = p.argmax(1)
    out: dict = {
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=np.arange(k), zero_division=0)),
        "roc_auc_ovr_macro": _auc(y, p, k),
    }
    _, gid = np.unique(g, return_inverse=True)
    n_g = gid.max() + 1
    order = np.argsort(gid, kind="stable")
    starts = np.searchsorted(gid[order], np.arange(n_g))
    ends = np.searchsorted(gid[order], np.arange(n_g), side="right")
    rng = np.random.default_rng(seed)
    stats = {"accuracy": [], "macro_f1": [], "roc_auc_ovr_macro": []}
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, n_g, n_g), minlength=n_g)
        idx = np.concatenate([np.tile(order[starts[j]:ends[j]], c) for j, c in enumerate(w) if c])
        stats["accuracy"].append((pred[idx] == y[idx]).mean())
        stats["macro_f1"].append(f1_score(y[idx], pred[idx], average="macro", labels=np.arange(k), zero_division=0))
        stats["roc_auc_ovr_macro"].append(_auc(y[idx], p[idx], k))
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    ci = {}
    for name, v in stats.items():
        v = np.asarray(v, dtype=np.float64)
        v = v[np.isfinite(v)]
        ci[name] = [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if len(v) >= 10 else [float("nan")] * 2
    out["ci95"] = ci
    out["ci_method"] = f"percentile bootstrap over groups, {n_boot} replicates, seed {seed}"
    out["chance_accuracy"] = float(np.bincount(y, minlength=k).max() / len(y))
    out["n_cells"] = int(len(y))
    out["n_groups"] = int(n_g)
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=np.arange(k)).tolist()
    out["class_names"] = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    return out


def evaluate_multiclass_split(run_dir: str | Path, cells: CellSet, idx: np.ndarray) -> dict:
    """Score a run without a Parasitized class (or with more than two classes) on the cells ``idx``.

    :func:`multiclass_metrics` of the run's probabilities (95 % intervals by bootstrap over
    groups), written to ``run_dir/metrics.json`` with the split, model and data recorded.

    ``run_dir``, ``cells`` and ``idx`` are as in
    :func:`malaria_screen.inference.run_evaluation.evaluate_split`.

    Returns
    -------
    dict
        The metrics written.
    """
    pred = Predictor.from_dir(run_dir)
    sub = cells.subset(idx)
    probs = pred.predict_proba_prepared(sub.images)
    mm = multiclass_metrics(np.asarray(sub.labels), probs, sub.patients, class_names=pred.config.class_names)
    mm.update(split="test", model=pred.config.model, data=str(cells.root))
    atomic_write_json(Path(run_dir) / "metrics.json", mm)
    return mm
