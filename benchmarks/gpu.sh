#!/usr/bin/env bash
# MmAP cost on one CUDA GPU, unattended (a few minutes; stopped at LIMIT_S, 8 minutes, whatever happens): one
# `peft-mmap perf` run in bf16 at the paper's training batch (16, Office-Home): training step time, forward and
# backward FLOPs and MFU of MmAP next to VPT-deep, CoOp, MaPLe, full fine-tuning and MmAP computing the
# discarded prompt rows, timed round-robin; serving images/s of zero-shot CLIP and MmAP (task switching every
# call, and 4-task batches) at batches 1, 16 and 256;
# the text-tower padding check. Everything goes to one JSON file, OUT/perf.json (the same tables in
# OUT/perf.md; torch.profiler summaries of batch-1 serving and of one MmAP and one full fine-tuning training
# step in OUT/profile.md; nvidia-smi's view in OUT/gpu.txt).
#
# Usage:   benchmarks/gpu.sh [OUT]                      (default: perf-gpu)
# Env:     PEAK_TFLOPS    dense bf16 peak of the GPU in TFLOP/s (default 989: H100/H200 SXM)
#          BATCH          training batch (default 16); INFER_BATCHES (default 1,16,256)
#          ROUNDS/WARMUP  timed / untimed round-robin rounds (default 30 / 5)
#          ARCH (vit-b16), DEVICE (cuda), PRECISION (bf16), METHODS (all six), LIMIT_S (480)
#          PYTHON         the interpreter with torch and peft_mmap (default python3; e.g. venv/bin/python)
# CPU smoke test of the same code path (tests/test_perf.py runs it):
#          DEVICE=cpu ARCH=tiny PRECISION=fp32 BATCH=2 INFER_BATCHES=1,2 ROUNDS=1 WARMUP=0 benchmarks/gpu.sh /tmp/x
set -euo pipefail

OUT=${1:-perf-gpu}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
BATCH=${BATCH:-16}
INFER_BATCHES=${INFER_BATCHES:-1,16,256}
ROUNDS=${ROUNDS:-30}
WARMUP=${WARMUP:-5}
ARCH=${ARCH:-vit-b16}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
METHODS=${METHODS:-mmap,vpt_deep,coop,maple,full_ft,mmap_all_rows}
LIMIT_S=${LIMIT_S:-480}
PYTHON=${PYTHON:-python3}

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >"$OUT/gpu.txt" || true
fi
PYTHONUNBUFFERED=1 timeout "$LIMIT_S" "$PYTHON" -m peft_mmap.apps.cli perf --arch "$ARCH" --device "$DEVICE" \
    --precision "$PRECISION" --batch "$BATCH" --infer-batches "$INFER_BATCHES" --rounds "$ROUNDS" \
    --warmup "$WARMUP" --methods "$METHODS" --peak-tflops "$PEAK_TFLOPS" --profile --output "$OUT"
echo "results: $OUT/perf.json"
