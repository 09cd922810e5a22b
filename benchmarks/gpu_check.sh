#!/usr/bin/env bash
# The GPU check of issue 24 item 5 (docs/performance.md, "On a GPU"): run on the device machine,
# never in CI. What may travel to that machine is 64 MiB per call, and the packed cells are about
# 57 MiB, so it takes two calls, the second right after the first (the machine keeps files it was
# sent while it stays warm):
#
#   here, once:  python benchmarks/pack_cells.py ../shared/data/nih_cell_images --out .gpu/cells --parts 2
#                cp -r ../shared/data/chula_rbc .gpu/chula_rbc
#   call 1, carry [.gpu/cells/part0]:                   bash benchmarks/gpu_check.sh infer
#   call 2, carry [.gpu/cells/part1, .gpu/chula_rbc]:   bash benchmarks/gpu_check.sh train
#
# Each stage writes its records (bench_gpu_infer; bench_gpu_train_fp32, bench_gpu_train_bf16) and
# logs to $OUT, which the device tool sends back. GPU_CHECK_DRY=1 runs the plumbing on this
# machine's CPU (one epoch, a few thousand cells, records left out) to check the script first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
DRY=${GPU_CHECK_DRY:-0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt" || true

case "${1:-}" in
infer)
  if [ "$DRY" = 1 ]; then
    $PY benchmarks/bench_gpu.py .gpu/cells/part0 --allow-cpu --max-cells 2000 2>&1 | tee "$OUT/infer.log"
  else
    $PY benchmarks/bench_gpu.py .gpu/cells/part0 --record bench_gpu_infer 2>&1 | tee "$OUT/infer.log"
    cp benchmarks/results/bench_gpu_infer.json "$OUT/"
  fi
  ;;
train)
  for p in .gpu/cells/part0 .gpu/cells/part1 .gpu/chula_rbc; do
    [ -d "$p" ] || { echo "$p is missing: carry it (part0 is lost if the machine went back between the calls)" >&2; exit 3; }
  done
  cells=/tmp/nih_cells_64px
  rm -rf "$cells" && mkdir -p "$cells"
  for p in .gpu/cells/part0 .gpu/cells/part1; do cp -rs "$PWD/$p/." "$cells/"; done
  fields=$(sed -n 's/^CHULA_TRAIN_FIELDS *:= *//p' Makefile)
  recipe=(--test-patients src/malaria_screen/assets/samples --color-augment hed --hed-sigma 0.3
          --extra-negatives .gpu/chula_rbc --extra-negative-fields "$fields")
  if [ "$DRY" = 1 ]; then
    $PY benchmarks/bench_train.py "$cells" --epochs 1 -- "${recipe[@]}" --accelerator cpu --limit-train-batches 5 2>&1 | tee "$OUT/train_dry.log"
  else
    $PY benchmarks/bench_train.py "$cells" --record bench_gpu_train_fp32 -- "${recipe[@]}" --accelerator gpu 2>&1 | tee "$OUT/train_fp32.log"
    $PY benchmarks/bench_train.py "$cells" --record bench_gpu_train_bf16 -- "${recipe[@]}" --accelerator gpu --precision bf16-mixed 2>&1 | tee "$OUT/train_bf16.log"
    cp benchmarks/results/bench_gpu_train_fp32.json benchmarks/results/bench_gpu_train_bf16.json "$OUT/"
  fi
  ;;
*)
  echo "usage: bash benchmarks/gpu_check.sh infer|train" >&2
  exit 2
  ;;
esac
