"""Figures saved by training and evaluation (matplotlib, Agg backend, PNG written atomically)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from malaria_screen.fileio import atomic_write_bytes

__all__ = ["pyplot", "save_figure", "save_cell_grid", "save_training_curves", "save_confusion_matrix", "save_roc_curve"]


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG atomically (110 dpi, tight box) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def save_cell_grid(images: np.ndarray, titles: Sequence[str], path: str | Path, *, ncols: int = 4) -> Path:
    """Grid of cells (seed 000's 4x4 look at random training cells).

    Parameters
    ----------
    images : (N, H, W, 3) ndarray of uint8
    titles : sequence of str of length N
    path : path of the PNG to write
    """
    plt = pyplot()
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.0 * ncols, 2.1 * nrows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, img, t in zip(np.ravel(axes), images, titles):
        ax.imshow(img)
        ax.set_title(t, fontsize=8, color="crimson" if t.startswith("Parasitized") else "black")
    return save_figure(fig, path)


def save_training_curves(history: dict[str, Sequence[float]], path: str | Path) -> Path:
    """Loss and accuracy per epoch, train and validation.

    Parameters
    ----------
    history : dict
        Keys among ``train_loss, val_loss, train_acc, val_acc``; values indexed by epoch
        (NaN where missing).
    """
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, ax in (("loss", a1), ("acc", a2)):
        for split, style in (("train", "-o"), ("val", "-s")):
            vals = np.asarray(history.get(f"{split}_{key}", []), dtype=float)
            if vals.size and np.isfinite(vals).any():
                ax.plot(np.arange(1, len(vals) + 1), vals, style, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy loss" if key == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def save_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """Confusion matrix ``cm[true, predicted]`` (counts) as a labelled heat map."""
    plt = pyplot()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(3.8 + 0.3 * len(class_names), 3.4 + 0.3 * len(class_names)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, f"{v:d}", ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_roc_curve(fpr: np.ndarray, tpr: np.ndarray, auc: float, path: str | Path, *, title: str = "") -> Path:
    """ROC curve: sensitivity against 1 - specificity, with its AUC in the legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot(fpr, tpr, lw=1.8, label=f"ROC-AUC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
