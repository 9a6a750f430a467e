#!/usr/bin/env bash
# GPU checks in one short call on a machine with an NVIDIA GPU (see the device tool's README for its limits):
#   1. CPU-vs-GPU logits of the same tiny and rn50 checkpoints (fp32, and bf16 autocast);
#   1b. the Serve GPU replica path: checkpoints loaded with map_location=cuda scored as a replica scores (bf16
#      autocast, fp32 cosines), and a Serve app with one GPU replica answering over HTTP, both against the CPU;
#   2. a 2-worker run killed once in epoch 2 and resumed on the GPU (raw history, both ranks' RNG with CUDA's),
#      then its best checkpoint evaluated on GPU workers;
#   3. a tiny and an rn50 (random weights, 224 px) training smoke test on Ray Train with NCCL and bf16, images/s.
# `scripts/gpu_check.sh --dry-run` runs the Ray checks on CPU workers instead (no GPU needed): the script's own check.
# Sets up .venv when missing (PyTorch from PyPI there). Prints a summary; exits non-zero on a failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
[ -x .venv/bin/sarl ] || make setup
[ "${1:-}" = "--dry-run" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
.venv/bin/python scripts/gpu_check.py "$@"
