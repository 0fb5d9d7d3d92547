#!/usr/bin/env bash
# Noise benchmark (not a test): how moebench's timings and `moebench compare` behave on
# a quiet machine and beside a CPU hog, and the smallest slowdown compare still catches.
#
#   benchmarks/noise.sh [OUT_DIR]      (default: results/noise; about 10-20 minutes)
#
# 1. the smoke suite twice as the machine is (A1, A2), then twice beside a CPU hog (one
#    busy-looping process per usable CPU: B1, B2); per run: noisy cases, the load at start
#    and end (run.json). Then `moebench compare A1 A2` and `B1 B2` with the defaults:
#    same code, so both must exit 0.
# 2. the smoke suite with `grouped` slowed by 10%, 25%, 50% and 100%
#    (benchmarks/slowdown_plugin.py), each compared with A1: which are caught, per case
#    (the default gate) and per implementation (--gate impl).
# CPU threads: 1 (--threads 1), as the CI perf gate runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/noise}
MB=${MOEBENCH:-.venv/bin/moebench}
PY=${PYTHON:-.venv/bin/python}
SUITE=suites/smoke.toml
rm -rf "$OUT"
mkdir -p "$OUT"

run() {  # run NAME [extra args...]: the smoke suite into $OUT/NAME; prints its summary
  local name=$1
  shift
  "$MB" run "$SUITE" --out "$OUT/$name" --quiet --threads 1 "$@" >"$OUT/$name.log" 2>&1
  "$PY" - "$OUT/$name" "$name" <<'PY'
import json, sys
from pathlib import Path
from moebench.store import read_run
folder, name = Path(sys.argv[1]), sys.argv[2]
run_dir = next(folder.iterdir())
frame = read_run(run_dir)
meta = json.loads((run_dir / "run.json").read_text())
ok = frame[frame["status"] == "ok"]
start, end = meta.get("load_start", {}), meta.get("load_end", {})
print(
    f"{name}: {len(ok)}/{len(frame)} ok, {int(ok['noisy'].sum())} noisy, spread (p90/p10) "
    f"median x{ok['spread'].median():.2f} max x{ok['spread'].max():.1f}; load average "
    f"{start.get('loadavg_1m', float('nan')):.1f} -> {end.get('loadavg_1m', float('nan')):.1f} "
    f"on {start.get('usable_cpus')} CPUs; threads {meta.get('cpu_threads')}"
)
PY
}

compare() {  # compare BASE CAND [args...]: exit code and summary line
  local base=$1 cand=$2
  shift 2
  "$MB" compare "$OUT/$base/$(ls "$OUT/$base")" "$OUT/$cand/$(ls "$OUT/$cand")" --quiet "$@" \
    >"$OUT/compare-$base-$cand$(echo "$@" | tr -d ' -').log" 2>&1
  local code=$?
  local log="$OUT/compare-$base-$cand$(echo "$@" | tr -d ' -').log"
  echo "compare $base $cand $*: exit $code"
  grep -E "^run-to-run drift|^warning" "$log" | sed 's/^/  /'
  tail -n 1 "$log" | sed 's/^/  /'
  echo
}

echo "== machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) =="
echo "== 1. same code: as the machine is, then beside a CPU hog =="
run A1
run A2
compare A1 A2
compare A1 A2 --gate impl
HOGS=()
for _ in $(seq "$(nproc)"); do
  "$PY" -c "while True: pass" &
  HOGS+=($!)
done
trap 'kill "${HOGS[@]}" 2>/dev/null' EXIT
run B1
run B2
compare B1 B2
compare B1 B2 --gate impl
kill "${HOGS[@]}" 2>/dev/null
wait "${HOGS[@]}" 2>/dev/null
HOGS=()

echo "== 2. grouped slowed on purpose, compared with A1 =="
for fraction in 0.10 0.25 0.50 1.00; do
  name="slow${fraction/./}"
  MOEBENCH_SLOWDOWN=$fraction run "$name" --plugin benchmarks/slowdown_plugin.py
  compare A1 "$name"
  "$PY" - "$OUT/compare-A1-$name.log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
grouped = len(re.findall(r"^regressed.* grouped ", text, re.M))
others = len(re.findall(r"^regressed.* (reference|capacity|dense) ", text, re.M))
print(f"  grouped cases flagged regressed: {grouped}; other implementations' cases: {others}")
PY
  compare A1 "$name" --gate impl
done
