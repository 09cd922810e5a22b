"""Compare the model zoo on one patient-level split of the NIH cells (issue 4).

Trains each entry with ``malaria_screen.training.run.train`` (same split for all), evaluates on the
test patients (95 % patient-bootstrap CIs) and measures parameters, MFLOPs per cell and CPU latency
per cell; writes ``compare.md`` and ``compare.csv``. Resumable: entries whose
``runs/<label>/compare_row.json`` exists are read back.

Usage::

    PYTHONPATH=src python benchmarks/bench_model_zoo.py --out bench_out/compare --epochs 2
    PYTHONPATH=src python benchmarks/bench_model_zoo.py --out bench_out/compare --models cellnet efficientnet_lite0_frozen
    PYTHONPATH=src python benchmarks/bench_model_zoo.py --out bench_out/compare --latency-only   # idle machine

Data: ``$MALARIA_SCREEN_DATA`` (default ``../shared/data`` from the repository root).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out/compare", help="results folder (default: %(default)s)")
    ap.add_argument("--data", default=None, help="NIH cell folder (default $MALARIA_SCREEN_DATA/nih_cell_images)")
    ap.add_argument("--models", nargs="*", default=None, help="entry labels (default: all)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per model (default: %(default)s)")
    ap.add_argument("--input-size", type=int, default=64, help="CNN input side, px (default: %(default)s)")
    ap.add_argument("--transfer-input-size", type=int, default=64, help="pretrained backbones' input side, px (default: %(default)s)")
    ap.add_argument("--mobilenet-weights", default=None, help="local ImageNet weights for mobilenet_v3_small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")
    ap.add_argument("--latency-only", action="store_true",
                    help="re-measure the latency of every finished row (on an idle machine) and rewrite the table")
    return ap


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from malaria_screen.config import TrainConfig
    from malaria_screen.research.model_comparison import compare_models, default_entries, remeasure_latency

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = Path(os.environ.get("MALARIA_SCREEN_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    data = Path(args.data) if args.data else root / "nih_cell_images"
    entries = default_entries(input_size=args.input_size, transfer_input_size=args.transfer_input_size,
                              mobilenet_weights=args.mobilenet_weights)
    if args.models:
        by = {e.label: e for e in entries}
        missing = [m for m in args.models if m not in by]
        if missing:
            raise SystemExit(f"unknown entries {missing}; choose from {sorted(by)}")
        entries = [by[m] for m in args.models]
    if args.latency_only:
        remeasure_latency(args.out)
        sys.stdout.write((Path(args.out) / "compare.md").read_text())
        return 0
    compare_models(data, args.out, entries, base_config=TrainConfig(epochs=args.epochs, seed=args.seed), progress=False)
    sys.stdout.write((Path(args.out) / "compare.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
