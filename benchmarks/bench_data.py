"""Benchmark: cold decode+resize+cache of an NIH-layout folder, then warm reload (seconds).

Usage: python benchmarks/bench_data.py DATA_DIR [--size 64] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("data_dir")
    ap.add_argument("--size", type=int, default=64, help="cell side, px")
    ap.add_argument("--workers", type=int, default=None, help="decoding threads")
    args = ap.parse_args()

    import torch

    from malaria_screen.data.dataset import load_cell_set

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        cells = load_cell_set(args.data_dir, size_px=args.size, cache_dir=cache, workers=args.workers, progress=False)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_cell_set(args.data_dir, size_px=args.size, cache_dir=cache, progress=False)
        warm = time.perf_counter() - t0
    print(f"cells: {len(cells)} ({len(set(cells.patients))} patients), size {args.size}px, cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}")
    print(f"cold decode+resize+cache: {cold:.2f} s ({len(cells) / cold:,.0f} cells/s)")
    print(f"warm reload from cache:   {warm:.2f} s")


if __name__ == "__main__":
    main()
