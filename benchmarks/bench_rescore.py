"""Cross-validated second-stage rescorer on the IML_Malaria fields (whole-smear parasitemia).

The adaptation path without fine-tuning: ``malaria-screen rescorer FIELDS --annotations A --out R``
fits gradient-boosted trees on colour/shape features of the segmented cells plus the cell model's
logit (:mod:`malaria_screen.smear.rescore`), and ``smear --rescorer R`` uses them. This script
measures it without leaking fields, on the same blocks as ``bench_adapt.py``: the 120 dev fields,
sorted by name (camera frame numbers, neighbouring frames likely of one slide), are cut into
``--folds`` contiguous blocks; in fold k the rescorer is fitted on the other blocks (its threshold
count-matched on their field-grouped out-of-fold probabilities) and ``smear-eval`` metrics are taken
on block k only. The cell model is the bundled NIH-only model, which never saw an IML field.
Metrics are pooled over all folds, with 95 % bootstrap intervals over fields (1,000 reps).

Usage::

    PYTHONPATH=src python benchmarks/bench_rescore.py --out /tmp/rescore_cv
    make bench-rescore

Data: ``$MALARIA_SCREEN_DATA`` (default ``../shared/data`` from the repository root).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="data root (default $MALARIA_SCREEN_DATA or ../shared/data)")
    ap.add_argument("--out", default="bench_out/rescore", help="output folder (results.json)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--no-model-logit", action="store_true", help="colour/shape features only (no cell model input)")
    ap.add_argument("--absolute", action="store_true", help="absolute inputs (default: field-relative, as `rescorer` fits)")
    ap.add_argument("--unmatched", default="uninfected", choices=["skip", "uninfected"],
                    help="training cells of detections that match no box (test blocks unaffected)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import cv2
    import numpy as np
    import torch

    cv2.setNumThreads(args.threads)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_adapt import _fold_metrics, _pooled_results

    from malaria_screen.fileio import atomic_write_json
    from malaria_screen.inference import load_model
    from malaria_screen.smear.evaluate import match_iml_fields
    from malaria_screen.smear.labels import load_iml_annotations
    from malaria_screen.smear.rescore import CellRescorer, collect_rescorer_data

    root = Path(args.data or os.environ.get("MALARIA_SCREEN_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    iml = root / "iml_malaria_dev"
    if not (iml / "annotations.json").is_file():
        print(f"IML data not found under {root}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ann = load_iml_annotations(iml / "annotations.json")
    names = sorted(ann)
    model = None if args.no_model_logit else load_model(None)

    t0 = time.perf_counter()
    data = collect_rescorer_data(iml / "images", ann, model, names=names, unmatched=args.unmatched,
                                 relative=not args.absolute)
    collect_s = time.perf_counter() - t0
    print(f"training cells of all {len(data.fields)} fields: {len(data.y)} ({int(data.y.sum())} Parasitized), "
          f"{collect_s:.0f} s", flush=True)

    blocks = np.array_split(np.arange(len(names)), args.folds)
    all_matches, folds = [], []
    for k, blk in enumerate(blocks):
        test_names = [names[i] for i in blk]
        test_stems = {Path(n).stem for n in test_names}
        train = data.subset(set(data.fields) - test_stems)
        assert not set(train.groups.tolist()) & test_stems
        r = CellRescorer(use_model_logit=model is not None, relative=data.relative).fit(train.X, train.y, train.groups)
        t1 = time.perf_counter()
        matches, failed = match_iml_fields(iml / "images", ann, model if model is not None else _Null(), names=test_names,
                                           rescorer=r)
        screen_s = (time.perf_counter() - t1) / max(1, len(matches))
        all_matches += matches
        folds.append({"fold": k, "test_fields": [test_names[0], test_names[-1]], "n_test_fields": len(test_names),
                      "n_train_cells": int(len(train.y)), "n_train_parasitized": int(train.y.sum()),
                      "threshold": r.threshold, "fit_seconds": r.config.fit_seconds, "seconds_per_field": screen_s,
                      "failed": failed, **_fold_metrics(matches)})
        f = folds[-1]
        print(f"fold {k}: fields {test_names[0]}..{test_names[-1]} ({len(test_names)}), threshold {r.threshold:.3f}, "
              f"sens {f['infected_sensitivity']:.3f}, PPV {f['infected_ppv']:.3f}, "
              f"parasitemia MAE {f['parasitemia_mae_pp']:.2f} pp (max {f['parasitemia_max_abs_err_pp']:.2f}), "
              f"fitted in {r.config.fit_seconds:.1f} s, {screen_s:.2f} s per field", flush=True)

    pooled, tot = _pooled_results(all_matches, folds)
    ci = pooled["parasitemia_mae_pp_ci95"]
    res = {"folds": folds, "n_fields": len(all_matches), "model_logit": model is not None, "unmatched": args.unmatched,
           "field_relative": data.relative,
           "collect_seconds": collect_s, **pooled}
    atomic_write_json(out / "results.json", res)
    print(f"\nAll {len(all_matches)} IML dev fields, each screened with a rescorer fitted without its block "
          f"({args.folds} contiguous blocks; cell model: {'bundled NIH-only' if model is not None else 'none'}):")
    print(f"  infected cells: {tot['n_gt_infected']} annotated, {tot['n_pred_infected']} called; sensitivity "
          f"{tot['infected_sensitivity']:.3f}, PPV {tot['infected_ppv']:.3f}")
    print(f"  parasitemia absolute error per field: mean {tot['parasitemia_mae_pp']:.2f} pp [{ci[0]:.2f}, {ci[1]:.2f}], "
          f"max {tot['parasitemia_max_abs_err_pp']:.2f} pp; floor (perfect classifier of the detections) "
          f"{tot['parasitemia_mae_pp_perfect_classifier']:.2f} pp")
    per_block = " / ".join(f"{f['parasitemia_mae_pp']:.2f}" for f in folds)
    print(f"  per block: {per_block}; pooled over each block: mean absolute error "
          f"{res['block_pooled_parasitemia_mae_pp']:.2f} pp")
    print(f"results: {out / 'results.json'}")
    return 0


class _Null:
    """Constant cell model for the features-only rescorer (its output is not used)."""

    threshold = 0.5

    def predict(self, images):
        import numpy as np

        return np.full(len(images), 0.5)


if __name__ == "__main__":
    raise SystemExit(main())
