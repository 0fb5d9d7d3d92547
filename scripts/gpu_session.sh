#!/usr/bin/env bash
# The GPU checks and reference runs the open issues still need, one step per call of a
# lent GPU machine (each step is sized to finish inside a 10-minute call):
#
#   scripts/gpu_session.sh STEP
#
#   tests     the CUDA tests: built-ins vs reference on the device, the fused triton layer
#             (forward and gradients on odd shapes), the offload race, the checks' tolerances,
#             profiling on CUDA, the presets against transformers' blocks, the peers plugin
#   triton    suites/triton.toml (the fused layer against grouped, plain and graphed)
#   profile   suites/default.toml --profile, then suites/hierarchical.toml
#   peers-a   suites/peers.toml on Mixtral-8x7B, Qwen3-30B-A3B and OLMoE-1B-7B
#   peers-b   suites/peers.toml on DeepSeek-V3
#   designs   seeds, moepp, dsmoe, topp, merging, offload and deepseek suites (the committed
#             h100-* runs, remade with the fixed counters and definitions)
#
# Wheels that the GPU machine lacks (moe-ops) travel in .whl/ (device tool: carry ".whl");
# the peers plugin is installed from this checkout without network. Results (parquet and
# run.json, no traces) are packed into $OUT/STEP.tar.gz, logs beside them; make the HTML
# reports here afterwards (`moebench report FILE`: plotly is not on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: scripts/gpu_session.sh tests|triton|profile|peers-a|peers-b|designs}"
out="${OUT:-results/gpu}"
root="results/gpu-$step"
mkdir -p "$out" "$root"
export PYTHONUNBUFFERED=1 MOEBENCH_TRITON_CACHE=/tmp/moebench-triton

site=/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
  --no-cache-dir --target "$site" ./plugins/moebench-peers
export PYTHONPATH="$PWD:$site:${PYTHONPATH:-}"

run() {  # a suite into this step's results root, the log beside the packed results
  python3 -m moebench run "$@" --out "$root" --quiet 2>&1 | tee -a "$out/$step.log"
}

case "$step" in
  tests)
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_triton.py \
      tests/test_offload_cuda.py tests/test_check.py tests/test_profiling.py \
      tests/test_presets_hf.py tests/test_peers.py tests/test_bad_input.py \
      2>&1 | tee "$out/$step.log"
    ;;
  triton) run triton --device cuda ;;
  profile)
    run default --device cuda --profile
    run hierarchical --device cuda
    ;;
  peers-a) run peers --device cuda --filter preset=mixtral-8x7b,qwen3-30b-a3b,olmoe-1b-7b ;;
  peers-b) run peers --device cuda --filter preset=deepseek-v3 ;;
  designs)
    for suite in seeds moepp dsmoe topp merging offload deepseek; do
      run "$suite" --device cuda
    done
    ;;
  *)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac

if [ -n "$(ls -A "$root")" ]; then
  tar -czf "$out/$step.tar.gz" --exclude='traces' --exclude='parts' --exclude='*.lock' -C "$root" .
fi
