# The steps of examples/officehome.sh and examples/minidomainnet.sh (sourced by them, which set DATASET,
# LAYOUT, PAPER_SHOTS and SMOKE_SPLIT): gradient-based task grouping, MmAP training and evaluation, every
# method of the paper's table (`peft-mmap bench`), then our numbers beside the paper's. Every training command
# runs with `--preset paper` (the paper's protocol and sizes, docs/reproduction.md); options next to it win.
set -euo pipefail
PYTHON=${PYTHON:-python3}
cli=("$PYTHON" -m peft_mmap.apps.cli)
table="zeroshot full_ft coop vpt maple full_ft_mt clip_adapter bitfit coop_mt vpt_mt maple_mt mmap"
METHODS=${METHODS:-$table}
compare=()
if [ -n "${SMOKE:-}" ]; then
    inputs=$(mktemp -d)
    trap 'rm -rf "$inputs"' EXIT
    "${cli[@]}" smoke-inputs --layout "$LAYOUT" --output "$inputs" --arch "${ARCH:-vit-b16}"
    MODEL=$inputs/model DATA=$inputs/data OUT=${OUT:-$DATASET-smoke} SHOTS=1 FRACTION= SEEDS=${SEEDS:-1}
    PRECISION=${PRECISION:-fp32} BATCH_SIZE=${BATCH_SIZE:-1} MAX_STEPS=${MAX_STEPS:-1}
    compare=(--split "$SMOKE_SPLIT")  # 1 shot is none of the paper's splits
    echo "SMOKE: random weights and generated images in $inputs; the accuracies below mean nothing."
fi
MODEL=${MODEL:-openai/clip-vit-base-patch16}
DATA=${DATA:?set DATA to the dataset root (or SMOKE=1)}
OUT=${OUT:-$DATASET-run}
SEED=${SEED:-1}
amount=(--shots "${SHOTS:-$PAPER_SHOTS}")
[ -n "${FRACTION:-}" ] && amount=(--fraction "$FRACTION")
data=(--data "$DATA" --layout "$LAYOUT")
[ "$LAYOUT" = domainnet ] && data+=(--split-dir "${SPLIT_DIR:-$DATA/splits_mini}")
# The paper's protocol (SGD, lr 0.0035, 5 epochs, batch 16 per task on Office-Home and 4 on MiniDomainNet, the
# Table 1 sizes); the knobs below replace its values and results.json records them as overrides.
recipe=(--preset paper --precision "${PRECISION:-bf16}")
[ -n "${BATCH_SIZE:-}" ] && recipe+=(--batch-size "$BATCH_SIZE")
[ -n "${MAX_STEPS:-}" ] && recipe+=(--max-steps "$MAX_STEPS")
[ -n "${DEVICE:-}" ] && recipe+=(--device "$DEVICE")
common=(--model "$MODEL" "${data[@]}" "${amount[@]}" "${recipe[@]}")
one_run=(--seed "$SEED" --split-file "$OUT/split.json")
seeds=()
# shellcheck disable=SC2206  # SEEDS is a list
[ -n "${SEEDS:-}" ] && seeds=(--seeds $SEEDS)

# 1. gradient-based task grouping on a global shared MmAP (paper Eq. 8) -> OUT/groups.json, affinity.png
"${cli[@]}" group "${common[@]}" "${one_run[@]}" --num-groups 2 --output "$OUT"
# 2. group-shared + task-specific MmAP -> OUT/adapters
"${cli[@]}" train "${common[@]}" "${one_run[@]}" --groups "$OUT/groups.json" --output "$OUT"
# 3. top-1 accuracy per task on the held-out images, next to zero-shot CLIP -> OUT/adapters/results.json
"${cli[@]}" eval "${data[@]}" --split-file "$OUT/split.json" --adapters "$OUT" ${DEVICE:+--device "$DEVICE"}
# 4. every method of the table, 3 seeds, same settings (resumable: a rerun reuses finished runs) -> OUT/bench
# shellcheck disable=SC2086  # METHODS is a list
"${cli[@]}" bench "${common[@]}" --methods $METHODS "${seeds[@]}" --output "$OUT/bench"
# 5. our numbers beside the paper's -> OUT/paper_comparison.md
"${cli[@]}" compare --results "$OUT/bench/results.json" --dataset "$DATASET" "${compare[@]}" \
    --output "$OUT/paper_comparison.md"
