"""Benchmark: ``predict --ray`` with 1 and 2 Ray workers against a local run, same cells, same labels.

Starts a private Ray runtime on this machine (``--num-cpus``, default 2), classifies the same NIH
cells with 1 and then 2 workers (one actor per CPU, model loaded once per actor; start-up excluded
by a warm-up run), and locally (:meth:`predict_files`, worker processes), and checks that the
three give the same labels.

Usage::

    python benchmarks/bench_ray.py DATA_DIR/nih_cell_images [--model FILE.onnx] [--n 4096] [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--model", default=None, help="default: the bundled model.int8.onnx")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--notes", default="")
    args = ap.parse_args()

    import ray

    from malaria_screen.data.dataset import list_image_files
    from malaria_screen.inference import load_model
    from malaria_screen.inference.base import default_model_dir
    from malaria_screen.inference.distributed import predict_files_ray
    from records import write_record

    model = args.model or str(default_model_dir() / "model.int8.onnx")
    allf = list_image_files([args.data_dir])
    files = [str(f) for f in allf[:: max(1, len(allf) // args.n)][: args.n]]
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    figures: dict[str, float | int | str] = {"n_cells": len(files), "num_cpus": args.num_cpus}
    load = [os.getloadavg()[0]]
    labels = {}
    for w in (1, 2):
        list(predict_files_ray(model, files[:600], backend="onnx", workers=w, chunk=128))  # warm-up: workers, cache
        t = time.perf_counter()
        rows = list(predict_files_ray(model, files, backend="onnx", workers=w))
        dt = time.perf_counter() - t
        labels[w] = [r.label for r in rows]
        figures[f"workers{w}.cells_per_s"] = round(len(files) / dt)
        load.append(os.getloadavg()[0])
        print(f"ray, {w} worker(s): {len(files) / dt:,.0f} cells/s")
    ray.shutdown()
    pred = load_model(model, backend="onnx")
    list(pred.predict_files(files[:600]))
    t = time.perf_counter()
    local = [r.label for r in pred.predict_files(files)]
    figures["local.cells_per_s"] = round(len(files) / (time.perf_counter() - t))
    load.append(os.getloadavg()[0])
    figures["speedup_2_over_1"] = round(figures["workers2.cells_per_s"] / figures["workers1.cells_per_s"], 2)
    figures["same_labels_frac"] = sum(a == b == c for a, b, c in zip(labels[1], labels[2], local)) / len(files)
    figures["load_avg_start"], figures["load_avg_max"] = round(load[0], 2), round(max(load), 2)
    print(f"local (worker processes): {figures['local.cells_per_s']:,} cells/s; 2 vs 1 Ray workers: "
          f"{figures['speedup_2_over_1']}x; same labels: {figures['same_labels_frac']:.4f}; load average up to {max(load):.1f}")
    # The load during the runs counts this benchmark's own workers: only the load before them tells other jobs.
    shared = load[0] > 0.5
    write_record("bench_ray", figures, uses_bundled_model=args.model is None, notes=(
        f"{len(files)} NIH cells (every k-th file; speed only), model {Path(model).name}, a local Ray runtime with "
        f"{args.num_cpus} CPUs on this one machine (a multi-node cluster adds network file reads). Wall time; load "
        f"average {load[0]:.1f} before the runs, up to {max(load):.1f} during them (this benchmark's own workers "
        "included): " + ("machine SHARED with other jobs. " if shared else "no other jobs. ") + args.notes))


if __name__ == "__main__":
    main()
