"""Benchmark: wall time of the default training recipe (cellnet, 20 epochs) on this machine.

Usage: python benchmarks/bench_train.py DATA_DIR [--epochs 20] [--out DIR] [--record NAME] [-- TRAIN_ARGS...]
Prints the Trainer.fit wall time, the time per epoch and the test-patient metrics; ``--record``
also writes ``benchmarks/results/NAME.json``. Arguments after ``--`` go to ``malaria-screen train``
(e.g. the bundled recipe's ``--color-augment hed --hed-sigma 0.3``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("data_dir")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", default=None, help="record name (benchmarks/results/NAME.json)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = args.out or tempfile.mkdtemp(prefix="bench_train_")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "malaria_screen.cli", "train", args.data_dir, "--out", out,
                    "--epochs", str(args.epochs), "--no-progress", *extra], check=True)
    wall = time.perf_counter() - t0
    info = json.load(open(os.path.join(out, "train_info.json")))
    m = json.load(open(os.path.join(out, "metrics.json")))
    print(f"cores: {os.cpu_count()}; fit: {info['fit_seconds']:.0f} s for {info['epochs_run']} epochs; whole command: {wall:.0f} s")
    print(f"test patients: {m['n_patients']}, cells: {m['n_cells']}; accuracy {m['accuracy']:.4f} "
          f"[{m['ci95']['accuracy'][0]:.4f}, {m['ci95']['accuracy'][1]:.4f}], ROC-AUC {m['roc_auc']:.4f}")
    print(f"per epoch: {info['fit_seconds'] / max(1, info['epochs_run']):.1f} s")
    if args.record:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from records import write_record

        figures = {"fit_seconds": info["fit_seconds"], "epochs": info["epochs_run"],
                   "seconds_per_epoch": info["fit_seconds"] / max(1, info["epochs_run"]), "wall_seconds": wall,
                   "test.accuracy": m["accuracy"], "test.roc_auc": m["roc_auc"], "test.n_patients": m["n_patients"],
                   "threads": info.get("threads"), "cores": os.cpu_count()}
        write_record(args.record, figures, notes=(
            f"malaria-screen train on {args.data_dir} with its defaults (seed 0 split) plus {extra or 'nothing'}; "
            "fit_seconds is Lightning's Trainer.fit, wall_seconds the whole command (loading the cell store, "
            "testing, plots). Test metrics on that run's own test patients."))


if __name__ == "__main__":
    main()
