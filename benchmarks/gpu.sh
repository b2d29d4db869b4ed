#!/usr/bin/env bash
# The GPU check, unattended, in under 8 minutes on one H100 or H200 (stopped at LIMIT_S whatever happens):
# 1. the Office-Home smoke at full shapes: `SMOKE=1 examples/officehome.sh` on DEVICE in PRECISION (bf16) at
#    the paper's batch (BATCH, 16 images per task): a random-weight CLIP ViT-B/16 and generated Office-Home
#    images through grouping, training, evaluation, every method of Table 1 (`bench`, one step each) and the
#    comparison with the paper, in at most SMOKE_LIMIT_S (OUT/smoke-officehome/, its output in
#    OUT/smoke-officehome.log);
# 2. one `peft-mmap perf` run in bf16 at the same batch, in the time left: training step time, forward and
#    backward FLOPs and MFU of MmAP next to VPT-deep, CoOp, MaPLe, full fine-tuning and MmAP computing the
#    discarded prompt rows, timed round-robin; serving images/s of zero-shot CLIP and MmAP (task switching
#    every call, and 4-task batches) at batches 1, 16 and 256; the text-tower padding check. Everything goes
#    to OUT/perf.json (the same tables in OUT/perf.md; torch.profiler summaries of batch-1 serving and of one
#    MmAP and one full fine-tuning training step in OUT/profile.md; nvidia-smi's view in OUT/gpu.txt).
# OUT/gpu_check.json records each step's exit status and wall seconds; the script fails if either step did.
#
# Usage:   benchmarks/gpu.sh [OUT]                      (default: perf-gpu)
# Env:     PEAK_TFLOPS    dense bf16 peak of the GPU in TFLOP/s (default 989: H100/H200 SXM)
#          BATCH          training batch (default 16); INFER_BATCHES (default 1,16,256)
#          ROUNDS/WARMUP  timed / untimed round-robin rounds (default 30 / 5)
#          ARCH (vit-b16), DEVICE (cuda), PRECISION (bf16), METHODS (perf: all six), LIMIT_S (480)
#          SMOKE_LIMIT_S  (240), SMOKE_METHODS (the smoke's bench: every column of Table 1),
#          RUN_SMOKE      (1; 0 skips the smoke)
#          PYTHON         the interpreter with torch and peft_mmap (default python3; e.g. venv/bin/python)
# CPU test of the same code paths (tests/test_perf.py runs it; the tiny CLIP has 2 layers, too few for the
# preset's MaPLe depth of 12):
#          DEVICE=cpu ARCH=tiny PRECISION=fp32 BATCH=2 INFER_BATCHES=1,2 ROUNDS=1 WARMUP=0 \
#          SMOKE_METHODS="zeroshot coop_mt mmap" benchmarks/gpu.sh /tmp/x
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
SMOKE_LIMIT_S=${SMOKE_LIMIT_S:-240}
PYTHON=${PYTHON:-python3}

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >"$OUT/gpu.txt" || true
fi
start=$SECONDS
smoke_status=null smoke_s=0  # null: skipped
if [ "${RUN_SMOKE:-1}" != 0 ]; then
    smoke_status=0
    SMOKE=1 OUT="$OUT/smoke-officehome" DEVICE="$DEVICE" PRECISION="$PRECISION" BATCH_SIZE="$BATCH" \
        ARCH="$ARCH" METHODS="${SMOKE_METHODS:-}" PYTHON="$PYTHON" PYTHONUNBUFFERED=1 \
        timeout "$(( SMOKE_LIMIT_S < LIMIT_S ? SMOKE_LIMIT_S : LIMIT_S ))" bash examples/officehome.sh \
        >"$OUT/smoke-officehome.log" 2>&1 || smoke_status=$?
    smoke_s=$((SECONDS - start))
    echo "officehome smoke: exit $smoke_status in $smoke_s s (log: $OUT/smoke-officehome.log)"
fi
perf_status=0
left=$((LIMIT_S - (SECONDS - start)))
if [ "$left" -gt 0 ]; then
    PYTHONUNBUFFERED=1 timeout "$left" "$PYTHON" -m peft_mmap.apps.cli perf --arch "$ARCH" --device "$DEVICE" \
        --precision "$PRECISION" --batch "$BATCH" --infer-batches "$INFER_BATCHES" --rounds "$ROUNDS" \
        --warmup "$WARMUP" --methods "$METHODS" --peak-tflops "$PEAK_TFLOPS" --profile --output "$OUT" \
        || perf_status=$?
else
    perf_status=124
fi
perf_s=$((SECONDS - start - smoke_s))
printf '{"smoke": {"exit": %s, "seconds": %d}, "perf": {"exit": %s, "seconds": %d}, "limit_s": %d}\n' \
    "$smoke_status" "$smoke_s" "$perf_status" "$perf_s" "$LIMIT_S" >"$OUT/gpu_check.json"
echo "results: $OUT/perf.json, $OUT/smoke-officehome/paper_comparison.md, $OUT/gpu_check.json"
[ "$smoke_status" = 0 ] || [ "$smoke_status" = null ] || exit 1
exit "$perf_status"
