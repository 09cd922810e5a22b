"""Benchmark: ``predict`` end to end (image file -> label) in cells/s with the bundled model.

Usage: python benchmarks/bench_predict.py DATA_DIR [--model RUN_DIR] [--n 4096] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("data_dir")
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=4096, help="files to classify")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    import torch

    from malaria_screen.data.dataset import list_image_files
    from malaria_screen.inference import load_model

    files = list_image_files([args.data_dir])[:: max(1, len(list_image_files([args.data_dir])) // args.n)][: args.n]
    pred = load_model(args.model, batch_size=args.batch_size)
    list(pred.predict_files(files[:256]))  # warm-up (page cache, kernels)
    t0 = time.perf_counter()
    rows = list(pred.predict_files(files))
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    cells = [pred.prepare(f) for f in files]
    dec = time.perf_counter() - t0
    import numpy as np

    x = np.stack(cells)
    t0 = time.perf_counter()
    pred.predict_proba_prepared(x)
    inf = time.perf_counter() - t0
    bad = sum(r.error is not None for r in rows)
    print(f"model: {pred.config.model} ({pred.source}), files: {len(files)}, failed: {bad}, batch {args.batch_size}, "
          f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}")
    print(f"end to end (decode in threads overlapping inference): {len(files) / dt:,.0f} cells/s ({dt:.2f} s)")
    print(f"  decode+letterbox alone, 1 thread: {len(files) / dec:,.0f} cells/s; inference alone: {len(files) / inf:,.0f} cells/s")


if __name__ == "__main__":
    main()
