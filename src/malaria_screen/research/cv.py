"""Patient-grouped k-fold cross-validation of a training recipe.

One train/test split by patient leaves a wide interval with 160 patients; k-fold
cross-validation tests every patient once (Stone 1974; grouped and stratified as scikit-learn's
:class:`~sklearn.model_selection.StratifiedGroupKFold`, via
:func:`~malaria_screen.data.split.patient_folds`). In fold ``k`` the test patients are fold
``k``; a validation share of the remaining patients (for checkpoint selection, as in a normal
run) is split off by patient too, and :func:`malaria_screen.training.run.train` trains on the
rest. Reported: per-fold test metrics (:mod:`malaria_screen.evaluation.metrics`), their mean and
standard deviation (ddof=1) across folds, and the metrics of the pooled out-of-fold predictions
with 95 % patient-bootstrap intervals over all patients.

Folds are resumable: a fold whose ``fold_metrics.json`` exists is read back, not retrained.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malaria_screen.config import TrainConfig
from malaria_screen.data.dataset import CellSet
from malaria_screen.data.split import SplitIndices, patient_folds
from malaria_screen.evaluation.metrics import evaluate_predictions
from malaria_screen.fileio import atomic_write_json, atomic_write_text, rows_to_csv

__all__ = ["CVResult", "fold_split", "cross_validate", "write_cv"]

log = logging.getLogger(__name__)

_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")


@dataclass(frozen=True)
class CVResult:
    """Result of :func:`cross_validate`.

    Attributes
    ----------
    folds : list of dict
        Per fold: ``fold``, ``n_patients``, ``n_cells``, metrics, ``train_seconds``, ``epochs_run``.
    mean, std : dict of str to float
        Across folds (std with ddof=1).
    pooled : dict
        :func:`~malaria_screen.evaluation.metrics.evaluate_predictions` of all out-of-fold
        predictions (every patient once), with patient-bootstrap CIs.
    oof : list of dict
        ``path, patient, fold, true, p_parasitized`` per cell.
    """

    folds: list[dict]
    mean: dict
    std: dict
    pooled: dict
    oof: list[dict]


def fold_split(labels: np.ndarray, patients: list[str], train_idx: np.ndarray, test_idx: np.ndarray, *,
               val_fraction: float = 0.1, seed: int = 0) -> SplitIndices:
    """Split a fold's training cells into train and validation, by patient.

    Parameters
    ----------
    labels : (n_cells,) ndarray of int
    patients : list of str of length n_cells
    train_idx, test_idx : ndarray of int64
        One fold of :func:`~malaria_screen.data.split.patient_folds`.
    val_fraction : float, default=0.1
        Share of *all* patients for validation (approximate); 0 gives no validation set.
    seed : int, default=0

    Returns
    -------
    SplitIndices
    """
    if val_fraction <= 0:
        return SplitIndices(train=np.sort(train_idx), val=np.zeros(0, np.int64), test=np.sort(test_idx))
    share_rest = len(train_idx) / max(1, len(train_idx) + len(test_idx))
    groups = np.asarray(patients)[train_idx]
    n = max(2, min(round(share_rest / val_fraction), len(np.unique(groups))))
    tr, va = next(iter(patient_folds(np.asarray(labels)[train_idx], groups, n_splits=n, seed=seed + 1)))
    return SplitIndices(train=np.sort(train_idx[tr]), val=np.sort(train_idx[va]), test=np.sort(test_idx))


def cross_validate(
    cells: CellSet,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    n_folds: int = 5,
    n_boot: int = 1000,
    progress: bool = False,
    accelerator: str = "auto",
    limit_train_batches: float | int | None = None,
) -> CVResult:
    """Train and test one recipe on every fold; write each fold's run under ``out_dir/fold<k>``.

    Parameters
    ----------
    cells : CellSet
        At ``config.input_size``; needs the ``config.positive_class`` class (binary screening).
    config : TrainConfig
        The recipe (``seed`` seeds the folds too; ``val_fraction`` as in :func:`fold_split`).
    out_dir : path
    n_folds : int, default=5
    n_boot : int, default=1000
        Patient-bootstrap replicates for the pooled CIs (per-fold CIs use ``n_boot // 5``).
    progress : bool, default=False
    accelerator : str, default="auto"
    limit_train_batches : float or int, optional
        Smoke runs.

    Returns
    -------
    CVResult

    Raises
    ------
    ValueError
        If the data have no ``positive_class`` or fewer patients than ``n_folds``, or ``out_dir``
        holds the folds of another cross-validation (other folds, recipe or cells: ``cv_recipe.json``).
    """
    # torch and Lightning (Predictor, training) only when folds are trained: write_cv runs without them
    from malaria_screen.inference import Predictor
    from malaria_screen.training.run import train

    if config.positive_class not in cells.class_names:
        raise ValueError(f"cross-validation scores screening metrics: classes {cells.class_names} lack {config.positive_class!r}")
    pos = cells.class_names.index(config.positive_class)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # folds are read back only into the cross-validation that made them: same folds, recipe, cells
    recipe = json.loads(json.dumps({"n_folds": n_folds, "n_cells": len(cells), "config": config.to_dict()}))
    recipe_file = out / "cv_recipe.json"
    if recipe_file.exists() and json.loads(recipe_file.read_text()) != recipe:
        raise ValueError(f"{out} holds a cross-validation of other folds, recipe or cells ({recipe_file}): choose another "
                         "--out (its fold results cannot be reused)")
    atomic_write_json(recipe_file, recipe)
    folds, oof = [], []
    for k, (tr, te) in enumerate(patient_folds(cells.labels, cells.patients, n_splits=n_folds, seed=config.seed)):
        fdir = out / f"fold{k}"
        done = fdir / "fold_metrics.json"
        if done.exists():
            rec = json.loads(done.read_text())
            log.info("fold %d: results exist, skipped (%s)", k, done)
        else:
            if fdir.exists():  # a fold stopped before its results: trained again from the start
                shutil.rmtree(fdir)
            split = fold_split(cells.labels, cells.patients, tr, te, val_fraction=config.val_fraction, seed=config.seed)
            t0 = time.perf_counter()
            res = train(cells.root, fdir, config, cells=cells, split=split, progress=progress,
                        accelerator=accelerator, limit_train_batches=limit_train_batches)
            pred = Predictor.from_dir(fdir)
            p = pred.predict_proba_prepared(cells.images[split.test])[:, pred.config.class_names.index(config.positive_class)]
            y = (cells.labels[split.test] == pos).astype(int)
            pats = [cells.patients[i] for i in split.test]
            m = evaluate_predictions(y, p, pats, n_boot=max(100, n_boot // 5), seed=config.seed)
            rec = {
                "fold": k, "n_patients": m["n_patients"], "n_cells": m["n_cells"],
                **{name: m[name] for name in _METRICS}, "ci95": m["ci95"],
                "train_seconds": round(res.seconds, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
                "epochs_run": res.epochs_run,
                "predictions": [{"path": cells.relpaths[i], "patient": cells.patients[i], "fold": k, "true": int(t),
                                 "p_parasitized": round(float(q), 6)} for i, t, q in zip(split.test, y, p)],
            }
            atomic_write_json(done, rec)
        oof += rec.pop("predictions")
        folds.append(rec)
        log.info("fold %d: %d patients, accuracy %.4f, roc_auc %.4f", k, rec["n_patients"], rec["accuracy"], rec["roc_auc"])
    mean = {m: float(np.nanmean([f[m] for f in folds])) for m in _METRICS}
    std = {m: float(np.nanstd([f[m] for f in folds], ddof=1)) if len(folds) > 1 else float("nan") for m in _METRICS}
    pooled = evaluate_predictions(np.array([r["true"] for r in oof]), np.array([r["p_parasitized"] for r in oof]),
                                  [r["patient"] for r in oof], threshold=config.threshold, n_boot=n_boot, seed=config.seed)
    pooled.pop("roc", None)
    return CVResult(folds=folds, mean=mean, std=std, pooled=pooled, oof=oof)


def write_cv(result: CVResult, out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    """Write ``cv_folds.csv``, ``cv_summary.md``, ``cv_summary.json`` and ``oof_predictions.csv``."""
    out = Path(out_dir)
    cols = ["fold", "n_patients", "n_cells", *_METRICS, "epochs_run", "train_seconds"]
    rows = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in f.items()} for f in result.folds]
    oof = [{**r, "true": "Parasitized" if r["true"] else "Uninfected"} for r in result.oof]
    p = result.pooled
    lines = [f"# Patient-grouped {len(result.folds)}-fold cross-validation{': ' + title if title else ''}", "",
             f"{p['n_patients']} patients, {p['n_cells']} cells; each patient is tested once.", "",
             "| fold | patients | cells | " + " | ".join(_METRICS) + " |", "|---:|---:|---:|" + "---:|" * len(_METRICS)]
    for f in result.folds:
        lines.append(f"| {f['fold']} | {f['n_patients']} | {f['n_cells']} | " + " | ".join(f"{f[m]:.4f}" for m in _METRICS) + " |")
    lines.append("| **mean ± std** | | | " + " | ".join(f"{result.mean[m]:.4f} ± {result.std[m]:.4f}" for m in _METRICS) + " |")
    lines += ["", f"Pooled out-of-fold predictions ({p['ci_method']}):", ""]
    for m in _METRICS:
        lo, hi = p["ci95"][m]
        lines.append(f"- {m}: {p[m]:.4f} [{lo:.4f}, {hi:.4f}]")
    lines.append("")
    return {
        "folds_csv": atomic_write_text(out / "cv_folds.csv", rows_to_csv(rows, cols)),
        "markdown": atomic_write_text(out / "cv_summary.md", "\n".join(lines)),
        "json": atomic_write_json(out / "cv_summary.json", {"folds": result.folds, "mean": result.mean, "std": result.std,
                                                            "pooled": result.pooled}),
        "oof_csv": atomic_write_text(out / "oof_predictions.csv", rows_to_csv(oof, ["path", "patient", "fold", "true", "p_parasitized"])),
    }
