"""Benchmark: cell inference on a GPU (issue 24 item 5), beside the same model on this machine's CPU.

Only where PyTorch sees a CUDA GPU (the device machine; never in CI): it exits with status 2
otherwise, unless ``--allow-cpu`` (a dry run of the script on the CPU, which writes no record
unless ``--record`` is given). On the cells of ``DATA_DIR`` (an NIH-layout folder, e.g. a part
written by ``benchmarks/pack_cells.py``), bundled model or ``--model RUN``:

- inference alone on letterboxed cells already in memory, cells/s, at batch sizes 256, 4096 and
  16384, in float32 and under autocast (``16-mixed``, ``bf16-mixed``): ``Predictor(device=...,
  precision=...)``, the same code ``predict --backend torch --device cuda`` runs;
- ``predict_files`` end to end (decoding and letterboxing in worker processes on every CPU core,
  the network on the GPU), cells/s;
- the share of cells whose label equals the CPU float32 model's, per precision.

Usage::

    python benchmarks/bench_gpu.py DATA_DIR [--model RUN] [--record bench_gpu_infer] [--allow-cpu] [--max-cells N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

BATCHES = (256, 4096, 16384)
PRECISIONS = ("32", "16-mixed", "bf16-mixed")


def _rate(pred, cells: np.ndarray, repeats: int = 3) -> float:
    """Best of ``repeats`` passes over ``cells``, cells/s (the first pass warms the kernels up)."""
    pred.predict_proba_prepared(cells[: pred.batch_size])
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        pred.predict_proba_prepared(cells)  # returns numpy: the GPU has finished
        best = max(best, len(cells) / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir")
    ap.add_argument("--model", default=None, help="run folder; default: the bundled model")
    ap.add_argument("--record", default=None, help="record name (benchmarks/results/NAME.json); default bench_gpu_infer on a GPU")
    ap.add_argument("--allow-cpu", action="store_true", help="dry run on the CPU when there is no GPU")
    ap.add_argument("--max-cells", type=int, default=None, help="use only the first N cells (dry runs)")
    args = ap.parse_args()

    import torch

    from malaria_screen.data.dataset import list_image_files, load_cell_set
    from malaria_screen.inference import load_model

    gpu = torch.cuda.is_available()
    if not gpu and not args.allow_cpu:
        print("no CUDA GPU here: run this on the device machine (or pass --allow-cpu for a dry run)", file=sys.stderr)
        raise SystemExit(2)
    device = "cuda" if gpu else "cpu"
    record = args.record or ("bench_gpu_infer" if gpu else None)
    ref = load_model(args.model, backend="torch")  # CPU float32: the answers every other row is held to
    cells = load_cell_set(args.data_dir, size_px=ref.input_size, progress=False)
    images = cells.images[: args.max_cells]
    files = [str(f) for f in list_image_files([args.data_dir])][: args.max_cells]
    ref_labels = ref.predict_proba_prepared(images)[:, ref.positive_index] >= ref.threshold
    figures: dict[str, float | int | str] = {"n_cells": len(images), "device": torch.cuda.get_device_name(0) if gpu else "cpu",
                                             "cpu_cores": os.cpu_count() or 0}
    for precision in PRECISIONS:
        if not gpu and precision == "16-mixed":
            continue  # float16 autocast is for GPUs
        for batch in BATCHES:
            pred = load_model(args.model, backend="torch", device=device, precision=precision, batch_size=batch)
            rate = _rate(pred, images)
            figures[f"infer.{precision}.b{batch}.cells_per_s"] = round(rate)
            print(f"{device} {precision:>10} batch {batch:>5}: {rate:>12,.0f} cells/s (inference alone, cells in memory)")
        p = pred.predict_proba_prepared(images)[:, pred.positive_index] >= pred.threshold
        figures[f"infer.{precision}.same_label_frac"] = float((p == ref_labels).mean())
        print(f"{device} {precision:>10}: labels as the CPU float32 model on {(p == ref_labels).mean():.4%} of the cells")
    pred = load_model(args.model, backend="torch", device=device, batch_size=4096)
    list(pred.predict_files(files[:2048]))  # warm-up: worker processes, page cache
    t = time.perf_counter()
    rows = list(pred.predict_files(files))
    e2e = len(files) / (time.perf_counter() - t)
    assert all(r.error is None for r in rows), [r.error for r in rows if r.error][:3]
    figures["predict_files.cells_per_s"] = round(e2e)
    print(f"predict_files end to end ({os.cpu_count()} CPU cores decoding, network on {device}): {e2e:,.0f} cells/s")
    if record:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from records import write_record

        write_record(record, figures, uses_bundled_model=args.model is None, notes=(
            f"{len(images)} NIH cells of {args.data_dir} (speed only; patients seen in training included), torch "
            f"back-end on {figures['device']}; inference alone = Predictor.predict_proba_prepared on letterboxed cells "
            "in memory, best of 3 passes after a warm-up; predict_files = files to labels, decoding in worker "
            "processes on every CPU core. Labels compared with the CPU float32 model on the same cells."))
        print(f"record {record}")


if __name__ == "__main__":
    main()
