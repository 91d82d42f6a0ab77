#!/usr/bin/env bash
# One command for a GPU machine (H100 / H200): every CUDA-only and Triton kernel test at full size on the device,
# the kernel benchmark against eager, torch.compile, TRL, Liger (fused-linear CE, fused-linear GRPO) and CCE's
# `cce`, the Triton resource table, and rollout / reward / training step of a random model at Janus-Pro-1B's
# shapes against transformers generate and the official reward loop; results and a log in bench/results/ with the GPU name and versions, a summary
# last.
#
#   scripts/gpu_check.sh             # on a CUDA machine (needs: pip install -e .[bench], a CUDA torch build)
#   scripts/gpu_check.sh --dry-run   # tiny shapes on CPU, the same steps (what runs when there is no CUDA);
#                                    # tests/bench/test_bench_quick.py runs it so the script cannot rot
#
# GVU_GPU_CHECK_OUT=DIR writes results there instead of bench/results/ (the dry run defaults to a temp dir).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's kernels, even without pip install -e
export TRITON_DEFAULT_FP_FUSION=1  # Triton 3.9's default, stated to silence its warning

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ $DRY == 0 ]] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "# no CUDA device: running the dry run instead (tiny shapes on CPU)"
  DRY=1
fi
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [[ $DRY == 1 ]]; then OUT=${GVU_GPU_CHECK_OUT:-$(mktemp -d)}; else OUT=${GVU_GPU_CHECK_OUT:-bench/results}; fi
mkdir -p "$OUT"
LOG="$OUT/gpu_check_$STAMP.log"
SUMMARY=()
FAILED=0

step() {  # step NAME COMMAND...: run, tee into the log, remember the outcome for the summary
  local name=$1 t0=$SECONDS rc
  shift
  echo "=== $name: $*" | tee -a "$LOG"
  "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-26s %-6s %4ds  %s' "$name" "$([[ $rc == 0 ]] && echo ok || echo FAIL)" $((SECONDS - t0)) "$*")")
  [[ $rc == 0 ]] || FAILED=1
}

# --- machine and versions (also in every CSV row through bench/_common.machine_info)
python - <<'EOF' | tee "$OUT/gpu_check_$STAMP.env" | tee -a "$LOG"
import importlib.metadata as md, platform, torch
def v(p):
    try: return md.version(p)
    except md.PackageNotFoundError: return "missing"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (dry run)"
print(f"gpu: {gpu}")
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {v('triton')}")
print(f"trl {v('trl')}, liger-kernel {v('liger-kernel')}, cut-cross-entropy {v('cut-cross-entropy')}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$LOG"

if [[ $DRY == 0 ]]; then
  # Triton kernels on the GPU (GVU_TEST_CUDA=1: no interpreter), CUDA-only and full-size tests included.
  step "kernel tests (CUDA, full)" env GVU_TEST_CUDA=1 GVU_TEST_FULL=1 python -m pytest tests/kernels -q -p no:cacheprovider \
    --junitxml="$OUT/gpu_check_${STAMP}_tests.xml"
  step "kernel bench (CUDA)" python bench/kernel_ops.py --device cuda --csv "$OUT/kernel_ops_gpu.csv"
else
  step "kernel tests (interpreter)" python -m pytest tests/kernels/test_token_logprobs.py -q -p no:cacheprovider \
    -k "matches_reference and 3-7 and triton"
  step "kernel bench (dry run)" python bench/kernel_ops.py --dry-run --csv "$OUT/kernel_ops_dry.csv"
fi
if [[ $DRY == 0 ]]; then
  step "triton resources" python bench/triton_resources.py --csv "$OUT/triton_resources.csv"
else  # one small kernel file for one arch: the plumbing, not the 712 compilations (cold: ~20 min on 2 cores)
  step "triton resources (one file)" python bench/triton_resources.py --arch 90 --modules group_advantages \
    --csv "$OUT/triton_resources.csv"
fi

# --- model level: a random model at Janus-Pro-1B's published shapes (bf16; flash-attn when installed, else SDPA):
# rollout images/s vs transformers generate with CFG 5 (as shipped, and static cache + compiled forward), the reward
# vs the official per-token loop, an eager full-logits pass and a bare forward, one training step's phases and peak
# memory. The dry run: the same scripts on the tiny random Janus on CPU.
if [[ $DRY == 0 ]]; then
  step "rollout (Janus-Pro-1B shapes)" python bench/rollout.py --shapes 1b --device cuda --configs 4x8 --repeats 2 \
    --out "$OUT/rollout_gpu.csv"
  step "reward (Janus-Pro-1B shapes)" python bench/reward.py --shapes 1b --device cuda --sizes 32 --repeats 3 \
    --out "$OUT/reward_gpu.csv"
  step "step (Janus-Pro-1B shapes)" python bench/step.py --model janus --shapes 1b --device cuda --steps 2 \
    --baseline-steps 1 --out "$OUT/step_gpu.csv"
else
  step "rollout (dry run)" python bench/rollout.py --model janus --quick --out "$OUT/rollout_dry.csv"
  step "reward (dry run)" python bench/reward.py --model janus --quick --out "$OUT/reward_dry.csv"
  step "step (dry run)" python bench/step.py --model janus --shapes tiny --quick --out "$OUT/step_dry.csv"
fi

echo
echo "# gpu_check summary ($([[ $DRY == 1 ]] && echo "dry run, CPU" || head -1 "$OUT/gpu_check_$STAMP.env"), $STAMP)"
printf '%s\n' "${SUMMARY[@]}"
echo "# log: $LOG; results: $OUT"
exit $FAILED
