#!/usr/bin/env bash
# Everything issue 15 asks of a machine with several GPUs, in one call:
#   1. suites/ep.toml over NCCL at every world size the machine allows (2, 4, 8), uniform
#      and skewed routing, plain and overlapped all-to-all;
#   2. the EP outputs checked against the single-device reference on the GPU
#      (tests/test_cuda.py and tests/test_distributed.py on CUDA);
#   3. the default suite on one GPU, then over all of them (--devices all): wall time of
#      each, and `moebench compare` of the two (same medians within the noise);
#   4. a report of each run.
# Usage: scripts/multi_gpu.sh [OUT_DIR]   (default: results/multi-gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/multi-gpu}"
mkdir -p "$out"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "GPUs visible: $gpus" | tee "$out/summary.txt"
if [ "$gpus" -lt 2 ]; then
  echo "needs 2 or more GPUs" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1

# 1. expert parallelism: ranks = the GPUs (cases that need more report "skipped")
python3 -m moebench run suites/ep.toml --device cuda --nproc "$gpus" --out "$out/root" \
  2>&1 | tee "$out/ep.log"

# 2. correctness of the EP layer against the reference, on the GPUs
python3 -m pytest -q tests/test_cuda.py tests/test_distributed.py 2>&1 | tee "$out/tests.log"

# 3. one GPU, then all GPUs: the same cases, timed both ways
start=$(date +%s)
python3 -m moebench run suites/default.toml --device cuda --devices cuda:0 --out "$out/root" \
  2>&1 | tee "$out/one.log"
one_s=$(( $(date +%s) - start ))
start=$(date +%s)
python3 -m moebench run suites/default.toml --device cuda --devices all --out "$out/root" \
  2>&1 | tee "$out/all.log"
all_s=$(( $(date +%s) - start ))
echo "default suite: one GPU ${one_s} s, ${gpus} GPUs ${all_s} s" | tee -a "$out/summary.txt"
runs=$(ls -t "$out/root" | grep '^default-' | head -2 | tac)
# shellcheck disable=SC2086
python3 -m moebench compare $runs --root "$out/root" --markdown "$out/compare.md" \
  | tee "$out/compare.log" || true

# 4. reports (plotly may be absent: then the parquet files are what comes back)
for run in $(ls "$out/root"); do
  python3 -m moebench report "$run" --root "$out/root" -o "$out/$run.html" || true
done
