#!/usr/bin/env bash
# GPU checks in one short call on a machine with an NVIDIA GPU (see the device tool's README for its limits):
#   1. CPU-vs-GPU logits of the same tiny and rn50 checkpoints (fp32, and bf16 autocast);
#   2. a tiny and an rn50 (random weights, 224 px) training smoke test on Ray Train with NCCL and bf16, images/s.
# Sets up .venv when missing (PyTorch from PyPI there). Prints a summary; exits non-zero on a failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
[ -x .venv/bin/sarl ] || make setup
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
.venv/bin/python scripts/gpu_check.py "$@"
