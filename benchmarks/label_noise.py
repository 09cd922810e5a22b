"""Experiment: does training against NIH label noise help? Confident learning and label smoothing.

Usage::

    python benchmarks/label_noise.py --data ../shared/data --runs runs/label_noise [--folds 3]

The NIH ``Parasitized`` folder holds crops with no visible parasite (Fuhad et al. 2020), and the
bundled model's train accuracy equals its validation accuracy (model card): label noise, not
capacity, looked like the limit. Issue 19 asks for label-noise-robust training. This script
trains, on the bundled model's own split and recipe (its ``config.json`` and ``split.json``; only
the training cells change), three candidates next to the bundled model:

- ``cleaned``: confident learning (Northcutt, Jiang & Chuang 2021, "Confident learning:
  estimating uncertainty in dataset labels", JAIR; ``cleanlab.filter.find_label_issues``, its
  default ``prune_by_noise_rate``) on out-of-fold probabilities of the NIH **training** cells:
  ``--folds`` patient-grouped folds of the training patients, one model of the same recipe per
  fold (checkpoint chosen on the run's validation patients), each scoring the patients it did
  not train on. The flagged training cells are left out and the recipe is trained again.
  Validation and test cells are never cleaned or scored by these models.
- ``cleaned_parasitized``: the same, leaving out only the flagged cells labelled Parasitized
  (the documented noise: the flagged Uninfected cells are mostly cells with a platelet or stain
  dot on their edge, which a whole-field screen must keep calling Uninfected).
- ``smoothed``: all training cells, cross-entropy with label smoothing ``0.1`` (Szegedy et al.
  2016; its effect under label noise: Lukasik et al. 2020, "Does label smoothing mitigate label
  noise?", ICML).

The record ``label_noise`` holds the flagged counts per class and each run's folder; the models are
then scored by the existing benchmarks (``bench_model_card.py --model RUN``, ``bench_quantify.py
--model RUN --record NAME``), whose records hold the figures. No IML data chose anything here. The
run folders stay outside the repo (``runs/`` is ignored): weights of candidates are not bundled.

Needs ``cleanlab`` (the ``dev`` extra). About 25 minutes on 2 CPU cores (5 trainings of 20 epochs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from malaria_screen.config import TrainConfig
from malaria_screen.data.dataset import load_cell_set
from malaria_screen.data.split import SplitIndices, patient_folds
from malaria_screen.inference import load_model
from malaria_screen.inference.base import default_model_dir
from malaria_screen.training.run import split_from_manifest, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import write_record  # noqa: E402


def _reusable(run: Path, relpaths: list[str], train_idx: np.ndarray, cfg: TrainConfig) -> bool:
    """Whether ``run`` is a finished run of ``cfg`` on exactly these NIH training cells (then it is
    reused: the experiment resumes; a run of other folds or settings is an error)."""
    if not (run / "weights.safetensors").is_file():
        return False
    files = set(json.loads((run / "split.json").read_text())["splits"]["train"]["files"])
    want = {relpaths[i] for i in train_idx}
    same = TrainConfig.from_json(run / "config.json").replace(mean=cfg.mean, std=cfg.std) == cfg
    if not same or want - files or not (files - want).isdisjoint(relpaths):
        raise ValueError(f"{run} holds a run of other settings or cells: remove it or pass another --runs")
    return True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--base", default=None, help="run folder whose recipe and split are used (default: the bundled model)")
    ap.add_argument("--runs", default="runs/label_noise", help="folder for the fold and candidate runs")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--smoothing", type=float, default=0.1)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    from cleanlab.filter import find_label_issues

    base_dir = Path(args.base) if args.base else default_model_dir()
    base = TrainConfig.from_json(base_dir / "config.json")
    data = Path(args.data) / "nih_cell_images"
    runs = Path(args.runs)
    cells = load_cell_set(data, size_px=base.input_size, progress=False)
    split = split_from_manifest(json.loads((base_dir / "split.json").read_text()), cells.relpaths)
    tr, labels = split.train, np.asarray(cells.labels)

    oof = np.full((len(tr), base.num_classes), np.nan, np.float32)
    fold_acc = []
    pats = [cells.patients[i] for i in tr]
    for k, (a, b) in enumerate(patient_folds(labels[tr], pats, n_splits=args.folds, seed=base.seed)):
        out = runs / f"fold{k}"
        fold_cfg = base.replace(test_patients=())
        if not _reusable(out, cells.relpaths, tr[a], fold_cfg):
            shutil.rmtree(out, ignore_errors=True)  # train() never mixes a new run with an old one's files
            train(data, out, fold_cfg, cells=cells, progress=False, split=SplitIndices(train=tr[a], val=split.val, test=tr[b]))
        oof[b] = load_model(str(out), backend="torch").predict_proba_prepared(cells.images[tr[b]])
        fold_acc.append(float((oof[b].argmax(1) == labels[tr[b]]).mean()))
        print(f"fold {k}: {len(a)} training cells, {len(b)} scored, accuracy {fold_acc[-1]:.4f}", flush=True)

    issues = find_label_issues(labels[tr], oof)
    flagged = tr[issues]
    pos = base.positive_index
    (runs / "label_issues.json").write_text(json.dumps(
        {"method": "cleanlab.filter.find_label_issues (prune_by_noise_rate)", "folds": args.folds,
         "files": [cells.relpaths[i] for i in flagged]}, indent=1))
    print(f"flagged {len(flagged)} of {len(tr)} training cells: "
          + ", ".join(f"{n} {int((labels[flagged] == c).sum())}" for c, n in enumerate(cells.class_names)), flush=True)

    candidates = {
        "cleaned": (base, np.setdiff1d(tr, flagged)),
        "cleaned_parasitized": (base, np.setdiff1d(tr, flagged[labels[flagged] == pos])),
        "smoothed": (base.replace(label_smoothing=args.smoothing), tr),
    }
    for name, (cfg, keep) in candidates.items():
        out = runs / name
        if not _reusable(out, cells.relpaths, keep, cfg):
            shutil.rmtree(out, ignore_errors=True)
            train(data, out, cfg, cells=cells, progress=False, split=SplitIndices(train=keep, val=split.val, test=split.test))
        print(f"{name}: {len(keep)} NIH training cells -> {out}", flush=True)

    figures = {
        "folds": args.folds,
        "fold_accuracy_mean": float(np.mean(fold_acc)),
        "oof_accuracy": float((oof.argmax(1) == labels[tr]).mean()),
        "n_train_nih_cells": int(len(tr)),
        "n_flagged": int(len(flagged)),
        **{f"n_flagged.{n}": int((labels[flagged] == c).sum()) for c, n in enumerate(cells.class_names)},
        "smoothing": args.smoothing,
    }
    if not args.no_record:
        write_record("label_noise", figures, notes=(
            f"Bundled model's recipe and split ({base_dir.name}: {len(tr)} NIH training cells of "
            f"{len(set(pats))} patients); out-of-fold probabilities from {args.folds} patient-grouped folds of the "
            f"training patients only; candidates in {runs}/{{cleaned,cleaned_parasitized,smoothed}}, scored by "
            "bench_model_card.py and bench_quantify.py (records label_noise_candidates, candidate_*_quantify*)."))
    return figures


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
