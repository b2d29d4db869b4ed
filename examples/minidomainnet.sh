#!/usr/bin/env bash
# The paper's MiniDomainNet protocol end to end (Table 2): task grouping, MmAP training and evaluation, every
# method of Table 2 (`peft-mmap bench`), then our numbers beside the paper's (examples/paper_protocol.sh).
#   DATA=/data/domainnet examples/minidomainnet.sh  # <DATA>/{clipart,painting,real,sketch}/<class>/*.jpg
#                                                   # (DomainNet) and <DATA>/splits_mini/*.txt (MiniDomainNet)
#   SMOKE=1 examples/minidomainnet.sh               # the same commands at ViT-B/16 shapes on generated inputs
# A real run loads the checkpoint (Hub access, or a local folder in MODEL); a GPU is advised.
# SMOKE=1: a random-weight CLIP ViT-B/16 and a generated MiniDomainNet folder (2 classes of 2 images per
# domain and their split files, in a temporary folder removed at the end); 1 shot, 1 seed, MAX_STEPS (1)
# steps per run at BATCH_SIZE (1) images per task, fp32; offline, on CPU; the accuracies mean nothing.
# Env:  MODEL (openai/clip-vit-base-patch16), DATA, SPLIT_DIR (DATA/splits_mini),
#       OUT (minidomainnet-run; SMOKE: minidomainnet-smoke),
#       SHOTS (3: the paper's 1 %; 6: its 2 %) or FRACTION (0.01: 1 % of each class),
#       SEED (grouping and MmAP training, 1), SEEDS (bench: the paper's 1 2 3),
#       METHODS (bench: every column of Table 2),
#       DEVICE (default: cuda if available), PRECISION (bf16), BATCH_SIZE (the paper's 4), MAX_STEPS,
#       PYTHON (the interpreter with torch and peft_mmap, default python3; e.g. venv/bin/python).
DATASET=minidomainnet LAYOUT=domainnet PAPER_SHOTS=3 SMOKE_SPLIT=1%
# shellcheck source=examples/paper_protocol.sh
. "$(dirname "$0")/paper_protocol.sh"
