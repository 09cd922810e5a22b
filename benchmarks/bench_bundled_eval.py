"""Record: the bundled default model's held-out test metrics, recomputed from the weights.

Usage: python benchmarks/bench_bundled_eval.py [--data DIR] [--n-boot 1000]

Loads ``src/malaria_screen/assets/default_model`` (weights, config, ``split.json``), decodes the
split's **test** patients' cells from the NIH folder (``$MALARIA_SCREEN_DATA/nih_cell_images``)
and computes accuracy, sensitivity, specificity, PPV, F1 and ROC-AUC with 95 % percentile
bootstrap CIs over patients (the same code as ``malaria-screen evaluate``), next to the trivial
baseline (every cell called the majority class: accuracy = its share; ROC-AUC 0.5). Also checks
the shipped ``metrics.json`` against the recomputed figures (``shipped_metrics_match``: 1 when
every metric agrees to 1e-9). Writes ``benchmarks/results/bundled_eval.json`` (tied to the bundled
weights' SHA-256: a new bundled model makes it stale until this script is re-run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import BUNDLED_WEIGHTS, write_record  # noqa: E402

MODEL_DIR = BUNDLED_WEIGHTS.parent
METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MALARIA_SCREEN_DATA", "../shared/data")) / "nih_cell_images")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()

    import numpy as np
    import torch

    from malaria_screen.evaluation.metrics import binary_metrics, evaluate_predictions
    from malaria_screen.export.split_cells import load_split_cells
    from malaria_screen.inference import Predictor

    torch.manual_seed(0)
    pred = Predictor.from_dir(MODEL_DIR)
    split = json.loads((MODEL_DIR / "split.json").read_text())["splits"]
    test = load_split_cells(MODEL_DIR / "split.json", args.data, "test", pred.input_size,
                            positive_class=pred.config.positive_class)
    p = pred.predict_proba_prepared(test.cells)[:, pred.positive_index].astype(np.float64)
    m = evaluate_predictions(test.y, p, test.patients, threshold=pred.threshold, n_boot=args.n_boot, seed=0)

    figures: dict = {}
    for k in METRICS:
        figures[f"test.{k}"] = m[k]
        figures[f"test.{k}.ci_lo"], figures[f"test.{k}.ci_hi"] = m["ci95"][k]
    (tp, fn), (fp, tn) = m["confusion_matrix"]
    figures.update({"test.tp": tp, "test.fn": fn, "test.fp": fp, "test.tn": tn, "test.threshold": m["threshold"],
                    "test.n_cells": m["n_cells"], "test.n_patients": m["n_patients"],
                    "test.n_parasitized": m["n_parasitized"], "test.n_uninfected": m["n_cells"] - m["n_parasitized"]})
    # Trivial baseline: one constant answer for every cell (the test set's majority class).
    majority = int(m["n_parasitized"] * 2 > m["n_cells"])
    base = binary_metrics(test.y, np.full(len(test.y), float(majority)), threshold=0.5)
    figures["baseline.majority_class"] = "Parasitized" if majority else "Uninfected"
    figures["baseline.accuracy"] = base["accuracy"]
    figures["baseline.roc_auc"] = 0.5  # a constant score ranks no cell above another
    for part in ("train", "val", "test"):
        figures[f"split.{part}.n_patients"] = len(split[part]["patients"])
        figures[f"split.{part}.n_cells"] = len(split[part]["files"])
    figures["split.n_patients"] = sum(len(split[k]["patients"]) for k in ("train", "val", "test"))
    shipped = json.loads((MODEL_DIR / "metrics.json").read_text())
    figures["shipped_metrics_match"] = int(all(abs(shipped[k] - m[k]) <= 1e-9 for k in METRICS))

    notes = (f"bundled default model ({pred.config.model}, {MODEL_DIR.name}); held-out TEST patients of its "
             f"split.json: {m['n_patients']} patients, {m['n_cells']} cells ({m['n_parasitized']} Parasitized); "
             f"threshold {m['threshold']}; {m['ci_method']}. The test patients were not used to train, "
             "tune or choose the model. Baseline: every cell called the majority class.")
    path = write_record("bundled_eval", figures, notes=notes, uses_bundled_model=True)
    print(json.dumps(figures, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
