"""Figures of the research tools (matplotlib, Agg backend, PNG written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from malaria_screen.plotting import pyplot, save_figure

__all__ = ["save_layer_sweep_plot", "save_lr_find_plot"]


def save_layer_sweep_plot(rows: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """Test accuracy and ROC-AUC (with 95 % CIs) per feature layer.

    Parameters
    ----------
    rows : sequence of dict
        Keys ``layer``, ``accuracy``, ``accuracy_ci`` ([lo, hi]), ``roc_auc``, ``roc_auc_ci``.
    path : path of the PNG
    """
    plt = pyplot()
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(rows) + 2), 3.6))
    for key, colour in (("accuracy", "tab:blue"), ("roc_auc", "tab:orange")):
        v = np.array([r[key] for r in rows], dtype=float)
        ci = np.array([r.get(f"{key}_ci", [np.nan, np.nan]) for r in rows], dtype=float)
        err = np.abs(np.stack([v - ci[:, 0], ci[:, 1] - v]))
        ax.errorbar(x, v, yerr=np.nan_to_num(err), marker="o", capsize=3, color=colour, label=key.replace("_", "-"))
    best = int(np.nanargmax([r["accuracy"] for r in rows]))
    ax.axvline(best, color="grey", ls=":", lw=1)
    ax.set_xticks(x, [r["layer"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("test patients")
    ax.set_xlabel("feature layer (global average pooled)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_lr_find_plot(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None, path: str | Path, *, title: str = "") -> Path:
    """Smoothed training loss against learning rate (log axis), suggested rate marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(lrs, losses, color="tab:blue")
    ax.set_xscale("log")
    if suggestion is not None:
        i = int(np.argmin(np.abs(np.log(np.asarray(lrs)) - np.log(suggestion))))
        ax.plot([lrs[i]], [losses[i]], "o", color="tab:red", label=f"suggested {suggestion:.2e}")
        ax.legend()
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.grid(alpha=0.3, which="both")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
