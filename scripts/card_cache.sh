#!/usr/bin/env bash
# The fused layer's kernels compiled on this host for the lent card's Triton, packed for
# the device tool to carry, so that the card's JIT loads them instead of compiling
# (triton/NOTES.md, version 30):
#
#   scripts/card_cache.sh [PRESET:TOKENS[,TOKENS...][:train] ... | peers]
#
# (default: the points issue 14 misses at large batches; `:train` compiles the training
# step's kernels too; `peers`: every point of suites/peers.toml, forward and training,
# about 15 minutes and 15 MB compressed)
#
# Triton's cache key hashes its libtriton binary, which differs between Pythons' wheels;
# the card's Python is 3.12, so this compiles in a Python 3.12 venv ($CARD_VENV, default
# /tmp/moebench-py312; made here from $PYTHON312 if missing) with Triton 3.6.0, the card's.
# Every candidate of both GEMMs is compiled, those the Gluon and merged-tail switches race
# too. Writes .triton-cache/ (taken up again by a later run) and .triton-cache.tar.gz
# (device tool: carry ".triton-cache.tar.gz"; gpu_session.sh says on the card whether it
# was loadable). About 2 minutes a point on 2 CPUs, 1-2 MB a point compressed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CARD_VENV:-/tmp/moebench-py312}"
# (a pyenv shim named python3.12 may exist and refuse to run: ask it to run, not whether it is there)
python312="${PYTHON312:-$(python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null \
  || echo /root/.pyenv/versions/3.12.1/bin/python)}"
if [ ! -x "$venv/bin/python" ]; then
  "$python312" -m venv "$venv"
  # any torch for Python 3.12 (meta tensors only); it may pull another Triton, replaced
  "$venv/bin/pip" install -q torch pandas pyarrow rich nvidia-ml-py "numpy<2.3"
  "$venv/bin/pip" install -q --no-deps "triton==3.6.0"
fi
"$venv/bin/python" -c "import sys, triton; assert sys.version_info[:2] == (3, 12), sys.version; \
assert triton.__version__ == '3.6.0', triton.__version__"
points=("$@")
[ ${#points[@]} -gt 0 ] || points=(deepseek-v3:8192 mixtral-8x7b:8192 qwen3-30b-a3b:8192
  olmoe-1b-7b:8192 mixtral-8x7b:1024)
if [ "${points[*]}" = peers ]; then
  points=()
  for preset in mixtral-8x7b qwen3-30b-a3b olmoe-1b-7b deepseek-v3; do
    points+=("$preset:1,64,1024,8192" "$preset:1,64,1024,8192:train")
  done
fi
for point in "${points[@]}"; do
  echo "== $point"
  preset=${point%%:*} rest=${point#*:}
  tokens=${rest%%:*} train=()
  case "$rest" in
    *:train) train=(--train) ;;
    *:*) echo "bad point $point: PRESET:TOKENS[,TOKENS...][:train]" >&2; exit 2 ;;
  esac
  # (both switches are on by default; set here so that a shell's =0 does not leave them out)
  # shellcheck disable=SC2086
  MOEBENCH_GLUON_WS=1 MOEBENCH_MERGE_TAIL=1 PYTHONPATH="$PWD" "$venv/bin/python" \
    scripts/offline_compile.py --preset "$preset" --tokens ${tokens//,/ } "${train[@]}" \
    --cache .triton-cache | tail -2
done
tar -czf .triton-cache.tar.gz -C .triton-cache .
echo "$(du -h .triton-cache.tar.gz | cut -f1) in .triton-cache.tar.gz: carry it"
