"""Cross-validated adaptation of the cell model to the IML_Malaria microscope (whole-smear parasitemia).

The bundled default model was trained on NIH crops only; on the IML fields (another site,
microscope, camera and stain) it calls far too many cells Parasitized. The adaptation path is
``malaria-screen crops FIELDS --annotations A --source detections`` (the segmented cells, cut as
``smear`` cuts them, labelled by the annotated box they match) followed by ``malaria-screen train
CROPS --groups CROPS/groups.csv --init-from default`` (fine-tuning). This script measures that
path without leaking fields: the 120 dev fields, sorted by name (camera frame numbers, so
neighbouring frames, likely of one slide, stay together), are cut into ``--folds`` contiguous
blocks; in fold k the model is fine-tuned on the crops of the other blocks (a contiguous 15 % of
them for validation: checkpoint choice and the decision threshold) and ``smear-eval`` metrics are
taken on block k's fields only. Every field is screened once by a model that never saw it; the
metrics are pooled over all folds, with 95 % bootstrap intervals over fields (1,000 reps).

Model averaging: ``--ensemble-with OTHER_OUT`` averages each fold's probabilities with those of
fold k of another finished run of this script (e.g. the other colour augmentation; both fold-k
models were trained without block k, so the average stays leak-free); the threshold is then set on
the averaged validation probabilities. The same averaging ships as ``malaria-screen ensemble``
(:class:`~malaria_screen.inference.ensemble.EnsemblePredictor`).

Decision threshold: ``--threshold val-count`` (default) picks the probability threshold at which
the number of validation cells called Parasitized equals the number annotated infected (a count,
i.e. parasitemia, calibration; never looks at the test block); a number fixes it.

Usage::

    PYTHONPATH=src python benchmarks/bench_adapt.py --out /tmp/adapt_cv      # resumable per fold
    make bench-adapt

Data: ``$MALARIA_SCREEN_DATA`` (default ``../shared/data`` from the repository root).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path


def _boot_ci(values, stat, reps: int = 1000, seed: int = 0) -> list[float]:
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(values)
    vals = [stat([values[i] for i in rng.integers(0, n, n)]) for _ in range(reps)]
    return [float(np.nanpercentile(vals, 2.5)), float(np.nanpercentile(vals, 97.5))]


_FOLD_KEYS = ("infected_sensitivity", "infected_ppv", "parasitemia_mae_pp", "parasitemia_max_abs_err_pp",
              "n_gt_infected", "n_pred_infected")


def _fold_metrics(matches) -> dict:
    """Metrics of one test block: :func:`summarize_iml` keys + parasitemia pooled over the block
    (~ one slide's worth of fields, as a clinician reports it)."""
    from malaria_screen.smear.scoring import summarize_iml

    m = summarize_iml(matches)
    return {"pooled_parasitemia_pred": sum(mm.inf_pred for mm in matches) / max(1, sum(mm.n_pred for mm in matches)),
            "pooled_parasitemia_true": sum(mm.inf_gt for mm in matches) / max(1, sum(mm.n_gt for mm in matches)),
            **{key: m[key] for key in _FOLD_KEYS}}


def _pooled_results(all_matches, folds: list[dict]) -> tuple[dict, dict]:
    """Metrics over all folds' fields: ``(results entries, summarize_iml totals)``; the entries hold
    the bootstrap CI of the per-field error, the block-pooled error and every field's counts."""
    import numpy as np

    from malaria_screen.smear.scoring import summarize_iml

    tot = summarize_iml(all_matches)
    err = [abs(mm.parasitemia_pred - mm.parasitemia_true) * 100 for mm in all_matches]
    blk = [abs(f["pooled_parasitemia_pred"] - f["pooled_parasitemia_true"]) * 100 for f in folds]
    res = {"parasitemia_mae_pp_ci95": _boot_ci(err, lambda e: float(np.mean(e))),
           **{key: tot[key] for key in (*_FOLD_KEYS, "infected_matched", "parasitemia_mae_pp_perfect_classifier")},
           "mean_true_parasitemia_pp": float(np.mean([mm.parasitemia_true for mm in all_matches]) * 100),
           "block_pooled_parasitemia_mae_pp": float(np.mean(blk)), "block_pooled_parasitemia_max_pp": float(np.max(blk)),
           "per_field": [{"image": mm.image, "n_pred": mm.n_pred, "n_gt": mm.n_gt, "inf_pred": mm.inf_pred,
                          "inf_gt": mm.inf_gt, "inf_tp": mm.inf_tp, "parasitemia_pred": mm.parasitemia_pred,
                          "parasitemia_true": mm.parasitemia_true} for mm in all_matches]}
    return res, tot


def main(argv: list[str] | None = None) -> int:
    from malaria_screen.config import COLOR_AUGMENTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="data root (default $MALARIA_SCREEN_DATA or ../shared/data)")
    ap.add_argument("--out", default="bench_out/adapt", help="work folder (crops, fold runs, results); resumable")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs; 0 = adapt the threshold only")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak one-cycle learning rate of the fine-tuning")
    ap.add_argument("--threshold", default="val-count", help="val-count, or a fixed probability")
    ap.add_argument("--init-from", default="default", help="run folder to fine-tune ('default' = bundled model)")
    ap.add_argument("--stain", default="none", choices=["none", "reinhard", "macenko"],
                    help="stain normalisation of the IML fields (crops and screening alike)")
    ap.add_argument("--with-nih", action="store_true", help="add the NIH cells to every fold's training set")
    ap.add_argument("--color-jitter", type=float, default=0.1,
                    help="colour jitter strength of the fine-tuning augmentation (TrainConfig.color_jitter)")
    ap.add_argument("--color-augment", default="jitter", choices=list(COLOR_AUGMENTS),
                    help="colour augmentation recipe of the fine-tuning (TrainConfig.color_augment)")
    ap.add_argument("--ensemble-with", default=None,
                    help="another finished --out folder: average its fold-k model with this run's fold-k model")
    ap.add_argument("--unmatched", default="skip", choices=["skip", "uninfected"],
                    help="training crops of detections that match no box (crops --unmatched; test blocks unaffected)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", default=None, help="also write benchmarks/results/NAME.json (pooled figures)")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import cv2
    import numpy as np
    import torch

    cv2.setNumThreads(args.threads)
    torch.set_num_threads(args.threads)

    from malaria_screen.config import TrainConfig
    from malaria_screen.data.dataset import load_cell_set
    from malaria_screen.data.split import SplitIndices
    from malaria_screen.evaluation.metrics import count_matched_threshold
    from malaria_screen.fileio import atomic_write_json
    from malaria_screen.inference import EnsemblePredictor, load_model
    from malaria_screen.inference.base import default_model_dir
    from malaria_screen.smear.crop_export import export_detection_crops
    from malaria_screen.smear.evaluate import match_iml_fields
    from malaria_screen.smear.labels import load_iml_annotations
    from malaria_screen.training.run import train

    root = Path(args.data or os.environ.get("MALARIA_SCREEN_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    iml = root / "iml_malaria_dev"
    if not (iml / "annotations.json").is_file():
        print(f"IML data not found under {root}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ann = load_iml_annotations(iml / "annotations.json")
    names = sorted(ann)
    init = str(default_model_dir()) if args.init_from == "default" else args.init_from

    crops = out / "crops"
    if not (crops / "groups.csv").is_file():
        t0 = time.perf_counter()
        try:
            s = export_detection_crops(iml / "images", ann, crops, stain=args.stain, unmatched=args.unmatched)
        except KeyboardInterrupt:  # groups.csv then lists the fields done: not a finished export to reuse
            (crops / "groups.csv").unlink(missing_ok=True)
            raise
        print(f"crops: {s.n_parasitized} Parasitized, {s.n_uninfected} Uninfected from {s.n_fields} fields "
              f"({s.n_skipped} detections unmatched or difficult; {len(s.errors)} fields failed: {s.errors}) in "
              f"{time.perf_counter() - t0:.0f} s")
    cells = load_cell_set(crops, size_px=64, groups_csv=crops / "groups.csv", cache_dir=out / "cache", progress=False)
    n_iml = len(cells)
    if args.with_nih:  # NIH cells join every fold's training set (they never meet the IML test blocks)
        import dataclasses

        nih = load_cell_set(root / "nih_cell_images", size_px=64, progress=False)
        if nih.class_names != cells.class_names:
            raise SystemExit(f"class names differ: {nih.class_names} vs {cells.class_names}")
        cells = dataclasses.replace(
            cells, images=np.concatenate([cells.images, nih.images]), labels=np.concatenate([cells.labels, nih.labels]),
            patients=cells.patients + [f"nih:{q}" for q in nih.patients],
            relpaths=cells.relpaths + [f"nih/{r}" for r in nih.relpaths])
    field_of = np.asarray(cells.patients)
    pos = cells.class_names.index("Parasitized")

    blocks = np.array_split(np.arange(len(names)), args.folds)
    all_matches = []
    folds = []
    for k, blk in enumerate(blocks):
        test_names = [names[i] for i in blk]
        rest = [names[i] for i in range(len(names)) if i not in set(blk.tolist())]
        n_val = max(1, math.ceil(0.15 * len(rest)))
        val_names = rest[-n_val:] if k < args.folds - 1 else rest[:n_val]
        stem = lambda ns: {Path(n).stem for n in ns}  # noqa: E731
        te, va = stem(test_names), stem(val_names)
        idx = np.arange(len(field_of))
        split = SplitIndices(train=idx[~np.isin(field_of, list(te | va))], val=idx[np.isin(field_of, list(va))],
                             test=idx[np.isin(field_of, list(te))])
        assert split.test.max(initial=-1) < n_iml and split.val.max(initial=-1) < n_iml
        run = out / f"fold_{k}"
        t0 = time.perf_counter()
        if args.epochs == 0:  # no fine-tuning: the threshold alone is adapted, on all training-block cells
            model = load_model(init)
            calib = np.concatenate([split.train, split.val])
        else:
            if not (run / "weights.safetensors").is_file():
                cfg = TrainConfig(epochs=args.epochs, lr=args.lr, init_from=init, seed=0, color_jitter=args.color_jitter,
                                  color_augment=args.color_augment)
                shutil.rmtree(run, ignore_errors=True)  # a run stopped before its weights: from the start
                train(crops, run, cfg, cells=cells, split=split, progress=False, groups_csv=crops / "groups.csv")
            model = load_model(run)
            calib = split.val
        if args.ensemble_with:
            other = Path(args.ensemble_with) / f"fold_{k}"
            if not (other / "weights.safetensors").is_file():
                raise SystemExit(f"--ensemble-with: {other} has no weights.safetensors (run that benchmark first)")
            model = EnsemblePredictor([model, load_model(other)])
        train_s = time.perf_counter() - t0
        if args.threshold == "val-count":
            p_cal = np.asarray(model.predict(list(cells.images[calib])))
            thr = count_matched_threshold(cells.labels[calib] == pos, p_cal)
        else:
            thr = float(args.threshold)
        model.config = model.config.replace(threshold=thr)
        matches, failed = match_iml_fields(iml / "images", ann, model, names=test_names, stain=args.stain)
        all_matches += matches
        folds.append({"fold": k, "test_fields": [test_names[0], test_names[-1]], "n_test_fields": len(test_names),
                      "n_train_cells": int(len(split.train)), "n_val_cells": int(len(split.val)),
                      "threshold": thr, "train_seconds": train_s, "failed": failed, **_fold_metrics(matches)})
        f = folds[-1]
        pooled_pred, pooled_true = f["pooled_parasitemia_pred"], f["pooled_parasitemia_true"]
        print(f"fold {k}: fields {test_names[0]}..{test_names[-1]} ({len(test_names)}), threshold {thr:.3f}, "
              f"sens {f['infected_sensitivity']:.3f}, PPV {f['infected_ppv']:.3f}, "
              f"parasitemia MAE {f['parasitemia_mae_pp']:.2f} pp (max {f['parasitemia_max_abs_err_pp']:.2f}), "
              f"pooled over the block {100 * pooled_pred:.2f} % vs {100 * pooled_true:.2f} % annotated, "
              f"trained {train_s:.0f} s", flush=True)

    pooled, tot = _pooled_results(all_matches, folds)
    ci = pooled["parasitemia_mae_pp_ci95"]
    res = {"folds": folds, "n_fields": len(all_matches), "epochs": args.epochs, "lr": args.lr, "stain": args.stain,
           "with_nih": args.with_nih, "color_jitter": args.color_jitter,
           "color_augment": args.color_augment, "ensemble_with": args.ensemble_with, "unmatched": args.unmatched,
           "threshold_rule": args.threshold, **pooled}
    print(f"\nAll {len(all_matches)} IML dev fields, each screened by a model fine-tuned without its block "
          f"({args.folds} contiguous blocks):")
    print(f"  infected cells: {tot['n_gt_infected']} annotated, {tot['n_pred_infected']} called; sensitivity "
          f"{tot['infected_sensitivity']:.3f}, PPV {tot['infected_ppv']:.3f}")
    print(f"  parasitemia absolute error per field: mean {tot['parasitemia_mae_pp']:.2f} pp "
          f"[{ci[0]:.2f}, {ci[1]:.2f}], max {tot['parasitemia_max_abs_err_pp']:.2f} pp "
          f"(mean annotated parasitemia {res['mean_true_parasitemia_pp']:.2f} %)")
    print(f"  floor set by detection: {tot['infected_matched']} of {tot['n_gt_infected']} infected boxes matched to a "
          f"detection; a perfect classifier of the detections: {tot['parasitemia_mae_pp_perfect_classifier']:.2f} pp")
    atomic_write_json(out / "results.json", res)
    print(f"  parasitemia pooled over each block of {len(blocks[0])} fields: mean absolute error "
          f"{res['block_pooled_parasitemia_mae_pp']:.2f} pp (max {res['block_pooled_parasitemia_max_pp']:.2f})")
    print(f"results: {out / 'results.json'}")
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from records import write_record

        pred = np.asarray([mm.parasitemia_pred for mm in all_matches]) * 100
        true = np.asarray([mm.parasitemia_true for mm in all_matches]) * 100
        figures = {"n_fields": len(all_matches), "folds": args.folds, "epochs": args.epochs,
                   "n_gt_infected": tot["n_gt_infected"], "n_pred_infected": tot["n_pred_infected"],
                   "infected_sensitivity": tot["infected_sensitivity"], "infected_ppv": tot["infected_ppv"],
                   "parasitemia_mae_pp": tot["parasitemia_mae_pp"], "parasitemia_mae_pp.ci95_lo": ci[0],
                   "parasitemia_mae_pp.ci95_hi": ci[1], "parasitemia_r": float(np.corrcoef(pred, true)[0, 1]),
                   "constant_1.3.mae_pp": float(np.mean(np.abs(true - 1.3))),
                   "mean_true_parasitemia_pp": res["mean_true_parasitemia_pp"],
                   "train_seconds_per_fold": float(np.mean([f["train_seconds"] for f in folds]))}
        notes = (f"The {len(all_matches)} IML dev fields sorted by name, {args.folds} contiguous blocks; in fold k the "
                 f"cell model ({args.init_from}) is fine-tuned for {args.epochs} epochs (lr {args.lr}) on the segmented "
                 "cells of the other blocks labelled by the annotated box they match (a contiguous 15 % of them for "
                 f"validation: checkpoint and the {args.threshold} threshold), {'with' if args.with_nih else 'without'} "
                 "the NIH cells, and scores block k's fields only; pooled over all folds. Per-field MAE CI: bootstrap over "
                 "fields. Constant 1.3 % per field as the trivial baseline. No IML data is in the repo.")
        write_record(args.record, figures, notes=notes, uses_bundled_model=args.init_from == "default")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
