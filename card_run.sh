#!/usr/bin/env bash
# one card call: the swapped gate_up against the shipped tiles on random routing
set -u
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv
mkdir -p "$OUT"
timeout -s KILL 120 python3 scripts/tail_probe.py --preset mixtral-8x7b --rows 256 --tokens 1024 8192 \
  --only "TMA, GATHER_A, HALF_TAIL" Gluon "Gluon rows, K32" --warm-s 1 --rounds 8 \
  --json "$OUT/tail_rows_random_mixtral.json" 2>&1 | tail -25 | tee "$OUT/tail_rows_random_mixtral.txt"
