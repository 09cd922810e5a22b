"""Benchmark: wall time of the default training recipe (cellnet, 20 epochs) on this machine.

Usage: python benchmarks/bench_train.py DATA_DIR [--epochs 20] [--out DIR]
Prints the Trainer.fit wall time and the test-patient metrics.
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
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench_train_")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "malaria_screen.cli", "train", args.data_dir, "--out", out,
                    "--epochs", str(args.epochs), "--no-progress"], check=True)
    wall = time.perf_counter() - t0
    info = json.load(open(os.path.join(out, "train_info.json")))
    m = json.load(open(os.path.join(out, "metrics.json")))
    print(f"cores: {os.cpu_count()}; fit: {info['fit_seconds']:.0f} s for {info['epochs_run']} epochs; whole command: {wall:.0f} s")
    print(f"test patients: {m['n_patients']}, cells: {m['n_cells']}; accuracy {m['accuracy']:.4f} "
          f"[{m['ci95']['accuracy'][0]:.4f}, {m['ci95']['accuracy'][1]:.4f}], ROC-AUC {m['roc_auc']:.4f}")


if __name__ == "__main__":
    main()
