"""Which layer of a pretrained network gives the best features? (Rajaraman et al. 2018)

Rajaraman et al. ("Pre-trained convolutional neural networks as feature extractors toward
improved malaria parasite detection in thin blood smear images", PeerJ 6:e4568, 2018) froze
ImageNet networks, pooled the activations of successive layers and trained a classifier on each,
finding that the optimal layer is often *not* the last one. This module repeats that experiment
by patient:

1. a frozen (pretrained) backbone runs once over every cell; the output of each stage is
   global-average pooled to a ``(n_cells, channels)`` vector;
2. per stage, a logistic regression on standardised features (scikit-learn) is fitted on the
   training patients (train + validation patients of :func:`~malaria_screen.data.split.patient_split`:
   nothing is tuned, so validation patients are training data here);
3. it is scored on the test patients of the same split: accuracy, sensitivity, specificity and
   ROC-AUC with 95 % patient-bootstrap intervals (:mod:`malaria_screen.evaluation.metrics`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from malaria_screen.data.dataset import CellSet
from malaria_screen.data.normalize import normalize_pixels
from malaria_screen.data.split import SplitIndices
from malaria_screen.evaluation.metrics import evaluate_predictions
from malaria_screen.fileio import atomic_write_json, atomic_write_text, rows_to_csv
from malaria_screen.research.multiclass import multiclass_metrics
from malaria_screen.research.plots import save_layer_sweep_plot

__all__ = ["FeatureSweep", "stage_modules", "stage_features", "feature_sweep", "write_feature_sweep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSweep:
    """Result of :func:`feature_sweep`.

    Attributes
    ----------
    rows : list of dict
        One per layer: ``layer``, ``depth`` (1-based), ``channels``, ``feature_map`` (``"HxW"``),
        ``accuracy``, ``accuracy_ci``, ``sensitivity``, ``specificity``, ``roc_auc``,
        ``roc_auc_ci`` (binary data) or ``accuracy``, ``macro_f1``, ``roc_auc`` (multi-class),
        ``fit_seconds``.
    best_layer : str
        Layer with the highest test accuracy.
    meta : dict
        Backbone, weights, input size, split (patients and cells per side), classifier.
    """

    rows: list[dict]
    best_layer: str
    meta: dict = field(default_factory=dict)


def stage_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named stages of a network: ``net.stages`` (transfer backbones), else ``net.features`` children.

    Raises
    ------
    ValueError
        If the network has neither.
    """
    for attr in ("stages", "features"):
        seq = getattr(net, attr, None)
        if isinstance(seq, nn.Sequential):
            return [(name if attr == "stages" else f"{attr}.{name}", m) for name, m in seq.named_children()]
    raise ValueError(f"{type(net).__name__} has no 'stages' or 'features' nn.Sequential to sweep")


@torch.inference_mode()
def stage_features(
    net: nn.Module, images: np.ndarray, mean: Sequence[float], std: Sequence[float], *, batch_size: int = 256
) -> tuple[list[str], list[np.ndarray], list[str]]:
    """Global-average-pooled output of every stage.

    Parameters
    ----------
    net : nn.Module
        See :func:`stage_modules`; run in eval mode.
    images : (N, S, S, 3) ndarray of uint8
    mean, std : sequence of 3 floats
        Normalisation in [0, 1] units (the training patients' statistics).
    batch_size : int, default=256

    Returns
    -------
    names : list of str
    features : list of (N, C_i) ndarray of float32
    shapes : list of str
        Spatial size ``"HxW"`` of each stage's map.
    """
    stages = stage_modules(net)
    net.eval()
    chunks: list[list[np.ndarray]] = [[] for _ in stages]
    shapes = [""] * len(stages)
    for a in range(0, len(images), batch_size):
        x = normalize_pixels(torch.from_numpy(np.ascontiguousarray(images[a : a + batch_size])).permute(0, 3, 1, 2), mean, std)
        for i, (_, mod) in enumerate(stages):
            x = mod(x)
            chunks[i].append(x.mean(dim=(2, 3)).numpy().astype(np.float32))
            shapes[i] = f"{x.shape[2]}x{x.shape[3]}"
    return [n for n, _ in stages], [np.concatenate(c) for c in chunks], shapes


def feature_sweep(
    net: nn.Module,
    cells: CellSet,
    split: SplitIndices,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    positive_class: str = "Parasitized",
    C: float = 1.0,
    max_iter: int = 2000,
    n_boot: int = 500,
    seed: int = 0,
    batch_size: int = 256,
) -> FeatureSweep:
    """Fit a logistic regression on each stage's pooled features; score on test patients.

    Parameters
    ----------
    net : nn.Module
        A (pretrained) network with stages (:func:`stage_modules`); not modified.
    cells : CellSet
        At the network's input size.
    split : SplitIndices
        Patient-level split; ``train`` and ``val`` patients fit, ``test`` patients score.
    mean, std : sequence of 3 floats
    positive_class : str, default="Parasitized"
        Binary data with this class get screening metrics; other data get multi-class ones.
    C : float, default=1.0
        Inverse L2 regularisation of :class:`~sklearn.linear_model.LogisticRegression`.
    max_iter : int, default=2000
    n_boot : int, default=500
        Patient-bootstrap replicates for the CIs.
    seed : int, default=0
    batch_size : int, default=256

    Returns
    -------
    FeatureSweep

    Raises
    ------
    ValueError
        If the split has no training or no test cells, or training cells hold one class only.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit_idx = np.sort(np.concatenate([split.train, split.val]))
    test_idx = split.test
    if len(fit_idx) == 0 or len(test_idx) == 0:
        raise ValueError(f"need training and test cells, got {len(fit_idx)} and {len(test_idx)}")
    if len(np.unique(cells.labels[fit_idx])) < 2:
        raise ValueError("training patients hold a single class")
    t0 = time.perf_counter()
    names, feats, shapes = stage_features(net, cells.images, mean, std, batch_size=batch_size)
    log.info("extracted %d stages from %d cells in %.1f s", len(names), len(cells), time.perf_counter() - t0)
    binary = len(cells.class_names) == 2 and positive_class in cells.class_names
    pos = cells.class_names.index(positive_class) if binary else None
    patients_test = [cells.patients[i] for i in test_idx]
    rows = []
    for depth, (name, f, shp) in enumerate(zip(names, feats, shapes), start=1):
        t1 = time.perf_counter()
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
        clf.fit(f[fit_idx], cells.labels[fit_idx])
        proba = np.zeros((len(test_idx), len(cells.class_names)))
        proba[:, clf.classes_] = clf.predict_proba(f[test_idx])
        row: dict = {"layer": name, "depth": depth, "channels": int(f.shape[1]), "feature_map": shp}
        if binary:
            m = evaluate_predictions((cells.labels[test_idx] == pos).astype(int), proba[:, pos], patients_test,
                                     n_boot=n_boot, seed=seed)
            row.update({k: m[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")})
            row.update({f"{k}_ci": m["ci95"][k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")})
        else:
            m = multiclass_metrics(cells.labels[test_idx], proba, patients_test, n_boot=n_boot, seed=seed)
            row.update(accuracy=m["accuracy"], accuracy_ci=m["ci95"]["accuracy"], macro_f1=m["macro_f1"],
                       roc_auc=m["roc_auc_ovr_macro"], roc_auc_ci=m["ci95"]["roc_auc_ovr_macro"])
        row["fit_seconds"] = round(time.perf_counter() - t1, 2)
        rows.append(row)
        log.info("layer %s: accuracy %.4f, roc_auc %.4f", name, row["accuracy"], row["roc_auc"])
    best = max(rows, key=lambda r: (r["accuracy"], r["roc_auc"]))["layer"]
    pats = lambda idx: len({cells.patients[i] for i in idx})  # noqa: E731
    meta = {
        "n_fit_patients": pats(fit_idx), "n_fit_cells": int(len(fit_idx)),
        "n_test_patients": pats(test_idx), "n_test_cells": int(len(test_idx)),
        "classifier": f"StandardScaler + LogisticRegression(C={C}, L2, lbfgs)",
        "pooling": "global average", "input_size": int(cells.size_px), "binary": binary,
        "ci_method": f"percentile bootstrap over test patients, {n_boot} replicates, seed {seed}",
        "extract_seconds": round(time.perf_counter() - t0, 1),
    }
    return FeatureSweep(rows=rows, best_layer=best, meta=meta)


def _fmt_ci(v: float, ci: Sequence[float]) -> str:
    return f"{v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def write_feature_sweep(result: FeatureSweep, out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    """Write ``feature_layers.md``, ``feature_layers.csv``, ``feature_layers.json``, ``feature_layers.png``.

    Returns
    -------
    dict of str to Path
        The files written, by kind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    binary = result.meta.get("binary", True)
    cols = ["layer", "depth", "channels", "feature_map", "accuracy", "accuracy_ci_lo", "accuracy_ci_hi"]
    cols += (["sensitivity", "specificity"] if binary else ["macro_f1"]) + ["roc_auc", "roc_auc_ci_lo", "roc_auc_ci_hi", "fit_seconds"]
    flat = []
    for r in result.rows:
        d = dict(r)
        for k in ("accuracy", "roc_auc"):
            d[f"{k}_ci_lo"], d[f"{k}_ci_hi"] = r[f"{k}_ci"]
        flat.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()})
    m = result.meta
    lines = [
        f"# Feature-layer sweep{': ' + title if title else ''}",
        "",
        f"Logistic regression on global-average-pooled features of each frozen stage; fitted on "
        f"{m.get('n_fit_patients')} patients ({m.get('n_fit_cells')} cells), scored on "
        f"{m.get('n_test_patients')} held-out test patients ({m.get('n_test_cells')} cells); "
        f"95 % CI: {m.get('ci_method')}. Input {m.get('input_size')} px.",
        "",
        "| layer | channels | map | accuracy [95% CI] | " + ("sensitivity | specificity | " if binary else "macro F1 | ") + "ROC-AUC [95% CI] |",
        "|---|---:|---:|---|" + ("---:|---:|" if binary else "---:|") + "---|",
    ]
    for r in result.rows:
        mid = f"{r['sensitivity']:.4f} | {r['specificity']:.4f} | " if binary else f"{r['macro_f1']:.4f} | "
        best = " **(best)**" if r["layer"] == result.best_layer else ""
        lines.append(f"| {r['layer']}{best} | {r['channels']} | {r['feature_map']} | {_fmt_ci(r['accuracy'], r['accuracy_ci'])} | "
                     f"{mid}{_fmt_ci(r['roc_auc'], r['roc_auc_ci'])} |")
    lines += ["", f"Best layer by test accuracy: **{result.best_layer}**.", ""]
    files = {
        "markdown": atomic_write_text(out / "feature_layers.md", "\n".join(lines)),
        "csv": atomic_write_text(out / "feature_layers.csv", rows_to_csv(flat, cols)),
        "json": atomic_write_json(out / "feature_layers.json", {"rows": result.rows, "best_layer": result.best_layer, "meta": m}),
        "plot": save_layer_sweep_plot(result.rows, out / "feature_layers.png", title=title),
    }
    return files
