#!/usr/bin/env bash
# The moebench steps of CI, the same on a laptop (the workflow calls this script):
#   bench/ci.sh check                     exit 1 when a moebench plugin fails to import
#   bench/ci.sh run RESULTS.parquet       run the suite (--strict: every case must be ok)
#   bench/ci.sh compare BASE.parquet CANDIDATE.parquet
#                                         exit 1 when an implementation got slower
# MOEBENCH_SUITE (default bench/moebench.toml) and MOEBENCH_THRESHOLD (default 25%) override.
set -euo pipefail
suite=${MOEBENCH_SUITE:-bench/moebench.toml}
threshold=${MOEBENCH_THRESHOLD:-25%}

case "${1:-}" in
  check)
    moebench list
    ;;
  run)
    out=$(mktemp -d)
    moebench run "$suite" --out "$out" --strict
    cp "$out"/*/results.parquet "$2"
    ;;
  compare)
    # Normalized by the reference on the same case of the same run: a runner uniformly
    # faster or slower than the baseline's flags nothing. Gated on each implementation's
    # geometric mean over its cases: single tiny CPU cases move tens of percent.
    moebench compare "$2" "$3" --normalize reference --gate impl \
      --threshold "$threshold" --markdown compare.md --json compare.json
    ;;
  *)
    sed -n '2,7p' "$0"
    exit 2
    ;;
esac
