#!/usr/bin/env bash
# The paper's Office-Home protocol end to end (Table 1): task grouping, MmAP training and evaluation, every
# method of Table 1 (`peft-mmap bench`), then our numbers beside the paper's (examples/paper_protocol.sh).
#   DATA=/data/OfficeHome examples/officehome.sh   # <DATA>/{Art,Clipart,Product,Real World}/<Class>/*.jpg
#   SMOKE=1 examples/officehome.sh                 # the same commands at ViT-B/16 shapes on generated inputs
# A real run loads the checkpoint (Hub access, or a local folder in MODEL); a GPU is advised.
# SMOKE=1: a random-weight CLIP ViT-B/16 and a generated Office-Home folder (2 classes of 2 images per domain,
# in a temporary folder removed at the end); 1 shot, 1 seed, MAX_STEPS (1) steps per run at BATCH_SIZE (1)
# images per task, fp32; offline, on CPU; the accuracies mean nothing.
# Env:  MODEL (openai/clip-vit-base-patch16), DATA, OUT (officehome-run; SMOKE: officehome-smoke),
#       SHOTS (6: the paper's 10 %; 12: its 20 %) or FRACTION (0.1: 10 % of each class),
#       SEED (grouping and MmAP training, 1), SEEDS (bench: the paper's 1 2 3),
#       METHODS (bench: every column of Table 1),
#       DEVICE (default: cuda if available), PRECISION (bf16), BATCH_SIZE (the paper's 16), MAX_STEPS,
#       PYTHON (the interpreter with torch and peft_mmap, default python3; e.g. venv/bin/python).
# Multi-GPU training: `"$PYTHON" -m torch.distributed.run --nproc_per_node N -m peft_mmap.apps.cli train ...`.
DATASET=officehome LAYOUT=officehome PAPER_SHOTS=6 SMOKE_SPLIT=10%
# shellcheck source=examples/paper_protocol.sh
. "$(dirname "$0")/paper_protocol.sh"
