#!/usr/bin/env bash
# The checks that only a GPU can run, in one go, each step writing under OUT and none stopping the others.
#
#   scripts/gpu_check.sh [OUT]        (default OUT: gpu_check)
#
# 1. `reasonknee3d bench --real-size --steps 3`: both real presets (3D-native and slice baseline) end to end at
#    Qwen2.5-VL-3B's shapes with random weights, bfloat16, SDPA or flash-attn: step times, peak GPU memory,
#    tokens per sample, FLOPs; a family that fails leaves the other's numbers in the JSON, marked partial.
# 2. `reasonknee3d bench`: the headline ratios; on a GPU the vit3d / swin3d encoder step is timed at real size
#    in bfloat16 (`encoder_step_ratio`).
# 3. `reasonknee3d demo --quick`: every stage of the package on CUDA at tiny size (encoder pretraining, 3D and
#    slice training with the trainer's pinned-memory loader, predict, the direct classifier, score).
# Each step's log and JSON land in OUT; the summary at the end gives each step's exit status and seconds.
# On an H200 steps 1 and 3 took a few minutes each (docs/results.md, "The real sizes on an H200"); the real-size
# checkpoint (7.5 GB) is built once into the user cache.
set -uo pipefail
out=${1:-gpu_check}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 2
mkdir -p "$out"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"

summary=()
step() {
    local name=$1; shift
    local t0=$SECONDS
    "$py" -m reasonknee3d "$@" >"$out/$name.log" 2>&1
    local rc=$?
    summary+=("$name: exit $rc in $((SECONDS - t0)) s")
    echo "${summary[-1]}"
}
step real_size bench --real-size --steps 3 --out "$out/real_size.json"
step bench bench --out "$out/bench.json"
step demo_quick demo --quick --out "$out/demo_quick"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
! grep -q "exit [1-9]" "$out/summary.txt"
