#!/usr/bin/env bash
# MmAP cost on one CUDA GPU, in one run of a few minutes: for each batch size, a ViT-B/16 MmAP training
# step in bf16 (images/s, FLOPs counted by torch's FlopCounterMode, MFU against PEAK_TFLOPS) next to the
# baselines, plus zero-shot / cached / mixed-task inference throughput and the text-tower padding check.
#
# Usage:   benchmarks/gpu.sh [OUTPUT_DIR]            (default: perf-gpu)
# Env:     PEAK_TFLOPS  dense bf16 peak of the GPU in TFLOP/s (default 989, H100/H200 SXM)
#          BATCHES      batch sizes (default "64 128 256 512")
#          ARCH         CLIP shapes (default vit-b16); DEVICE (default cuda); STEPS / WARMUP (default 10 / 3)
#          METHODS      training methods per batch (default: all five; "mmap" alone is quickest)
# CPU smoke test of the same code path:  DEVICE=cpu ARCH=tiny BATCHES="4 8" PEAK_TFLOPS=1 benchmarks/gpu.sh /tmp/x
# Results: OUTPUT_DIR/b<batch>/perf.json and perf.md per batch size, and OUTPUT_DIR/summary.md.
set -euo pipefail

OUT=${1:-perf-gpu}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
BATCHES=${BATCHES:-"64 128 256 512"}
ARCH=${ARCH:-vit-b16}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
METHODS=${METHODS:-mmap,vpt_deep,coop,maple,full_ft}
PRECISION=bf16
[ "$DEVICE" = cpu ] && PRECISION=${PRECISION_CPU:-fp32}

cd "$(dirname "$0")/.."
if [ "$DEVICE" = cuda ]; then
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
fi
mkdir -p "$OUT"
for batch in $BATCHES; do
    echo "=== batch $batch ==="
    python -m peft_mmap.perf --arch "$ARCH" --device "$DEVICE" --precision "$PRECISION" --batch "$batch" \
        --steps "$STEPS" --warmup "$WARMUP" --methods "$METHODS" --peak-tflops "$PEAK_TFLOPS" \
        --output "$OUT/b$batch"
done
python - "$OUT" $BATCHES <<'PY'
import json, sys
from pathlib import Path

out, batches = Path(sys.argv[1]), sys.argv[2:]
lines = ["| batch | MmAP train img/s | MFU | VPT-deep img/s | full FT img/s | zero-shot infer img/s | "
         "MmAP infer img/s | mixed infer img/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
for b in batches:
    r = json.loads((out / f"b{b}" / "perf.json").read_text())
    train, infer = r["train_img_per_s"], r["infer_img_per_s"]
    mfu = r.get("mfu", {}).get("mmap")
    lines.append(
        f"| {b} | {train['mmap']:.0f} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
        f"{train.get('vpt_deep', float('nan')):.0f} | {train.get('full_ft', float('nan')):.0f} | "
        f"{infer['zeroshot']:.0f} | {infer['mmap_cached']:.0f} | {infer['mmap_mixed']:.0f} |"
    )
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
PY
