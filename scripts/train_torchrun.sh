#!/usr/bin/env bash
# Multi-GPU (or multi-process CPU) training with torchrun: DDP, one process per GPU.
#
#   scripts/train_torchrun.sh NPROC --config rk3d_qwen2.5vl_3b --data /data/3DReasonKnee [key=value ...]
#
# Everything after NPROC goes to `reasonknee3d train` unchanged. The per-device batch size is
# train.per_device_batch_size; the global batch is NPROC x that x train.gradient_accumulation_steps.
# Without GPUs the processes talk over gloo. Rerunning the same command resumes from the last checkpoint.
# Multi-node: set NNODES, NODE_RANK and MASTER_ADDR (and MASTER_PORT) in the environment of every node.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 NPROC --config CONFIG [--data DIR] [--output-dir DIR] [key=value ...]" >&2
    exit 2
fi
nproc=$1
shift
if [[ ${NNODES:-1} -gt 1 ]]; then
    rdzv=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}"
          --master_port "${MASTER_PORT:-29500}")
else
    rdzv=(--standalone)
fi
# One intra-op thread per process unless told otherwise: NPROC processes share the node's cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun "${rdzv[@]}" --nproc_per_node "$nproc" -m reasonknee3d train "$@"
