#!/usr/bin/env bash
# Training through `accelerate launch`, e.g. FSDP for the real-size models (configs/accelerate_fsdp.yaml).
#
#   scripts/train_accelerate.sh configs/accelerate_fsdp.yaml --config rk3d_qwen2.5vl_3b --data DIR [key=value ...]
#
# The first argument is an accelerate config file (num_processes there = GPUs used); the rest goes to
# `reasonknee3d train` unchanged. transformers' Trainer picks up the FSDP / DeepSpeed settings accelerate
# passes in the environment; mixed precision comes from train.bf16 (auto: bf16 where supported).
set -euo pipefail
if [[ $# -lt 1 || ! -f $1 ]]; then
    echo "usage: $0 ACCELERATE_CONFIG.yaml --config CONFIG [--data DIR] [--output-dir DIR] [key=value ...]" >&2
    exit 2
fi
accelerate_config=$1
shift
exec accelerate launch --config_file "$accelerate_config" -m reasonknee3d train "$@"
