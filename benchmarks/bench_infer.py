"""End-to-end inference benchmark (image file to label): torch eager, ONNX fp32, ONNX int8.

Thin wrapper of ``malaria-screen bench-infer`` (same arguments), so ``make bench-infer`` and the CLI
print the same table: cells/s end to end, decoding alone and inference alone at batch 1 and 256,
and the share of this machine's float32 matmul ceiling.

Usage::

    python benchmarks/bench_infer.py [DATA_DIR] [--model RUN_DIR] [--int8 FILE.onnx] [--n-files 2048] [--as-png]
"""

from __future__ import annotations

import sys

from malaria_screen.cli import app

if __name__ == "__main__":
    app(["bench-infer", *sys.argv[1:]])
