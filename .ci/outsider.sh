#!/usr/bin/env bash
# moebench used from someone else's repository, as the README tells them to:
#   the wheel built from this checkout, installed into a fresh venv outside it;
#   an empty git repository; `moebench init`; the scaffolded plugin package installed
#   (found through its entry point); a broken plugin fails the check step;
#   the scaffolded suite run twice and compared (exit 0), then with the plugin's experts
#   20x slower (exit 1); pytest-benchmark against an export of the first run (passes,
#   then fails on the slowed plugin); the runs' provenance names the repository commit
#   and the plugin.
# The injected slowdown is large (the plugin computes its experts 20 times) and the
# thresholds generous (100% for the compare gate, 150% for pytest-benchmark's median),
# so a noisy 2-core CI machine passes the unchanged code and fails the slowed one. (Five
# times was too little: at these tiny shapes the router and harness are half the call,
# and one CI run measured the slowed layer at only 2.3x, under pytest-benchmark's 2.5x.)
# About two minutes. PYTHON picks the interpreter (default python3).
set -euo pipefail
checkout=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1 MOEBENCH_THRESHOLD=100% PIP_DISABLE_PIP_VERSION_CHECK=1
impl=outsider-moe
step() { echo "== outsider: $*"; }
fail() { echo "outsider: FAILED: $*" >&2; exit 1; }
expect_exit() {  # expect_exit CODE COMMAND...: run it, fail unless it exits CODE
  local want=$1 got=0
  shift
  "$@" >"$work/last.log" 2>&1 || got=$?
  if [ "$got" != "$want" ]; then
    tail -n 40 "$work/last.log"
    fail "'$*' exited $got, expected $want"
  fi
}

step "build the wheel, install it into a fresh venv outside the checkout"
cd "$work"  # nothing of the checkout on sys.path from here on
# From a copy of the files git would commit: no stale build/ or .venv/ of the checkout.
mkdir "$work/src"
(cd "$checkout" && git ls-files -z --cached --others --exclude-standard \
  | xargs -0 cp --parents -t "$work/src" 2>/dev/null || true)
"$python" -m pip wheel --quiet --no-deps -w "$work/dist" "$work/src"
# --system-site-packages: this Python's torch is used; a missing one is installed pinned
# (never a plain `torch`: that is a multi-GB CUDA build).
"$python" -m venv --system-site-packages "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
# torch first: the wheel's `torch>=2.4` would otherwise pull the newest (CUDA) build
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet "$work"/dist/moebench-*.whl
python -c "import pytest_benchmark" 2>/dev/null || python -m pip install --quiet "pytest-benchmark>=4"
case "$(python -c 'import moebench; print(moebench.__file__)')" in
  "$checkout"/*) fail "moebench imported from the checkout, not the wheel" ;;
esac
moebench suites >/dev/null || fail "moebench suites"
# the tuned block sizes shipped per device (moebench/impls/triton/tuned/) are in the wheel
shipped=$(python -c 'from moebench.impls.triton import tuning; d = tuning.shipped_dir()
print(" ".join(sorted(p.name for p in d.glob("*.json"))))')
[ "$shipped" = "$(cd "$checkout/moebench/impls/triton" && ls tuned/*.json 2>/dev/null \
  | xargs -rn1 basename | sort | xargs)" ] || fail "shipped tuning files: '$shipped'"

step "an empty git repository: moebench init, the plugin installed as a package"
repo="$work/their-repo"
mkdir "$repo" && cd "$repo"
git init --quiet
git config user.email ci@example.com && git config user.name ci
moebench init --impl "$impl" >/dev/null
git add -A && git commit --quiet -m "moebench init"
python -m pip install --quiet ./bench/plugin
# (into a file first: `grep -q` closing the pipe early would fail the listing under pipefail)
moebench list >"$work/list.txt" || fail "moebench list exited $?"
grep -q "$impl" "$work/list.txt" || fail "moebench list does not show $impl"
bench/ci.sh check >/dev/null

step "a broken plugin fails the check step and is named"
mkdir -p "$work/broken/broken_plugin"
printf 'raise ImportError("broken on purpose")\n' >"$work/broken/broken_plugin/__init__.py"
cat >"$work/broken/pyproject.toml" <<'EOF'
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"
[project]
name = "broken-plugin"
version = "0.0.1"
[project.entry-points."moebench.implementations"]
broken-moe = "broken_plugin"
EOF
python -m pip install --quiet "$work/broken"
expect_exit 1 bench/ci.sh check
grep -q "broken on purpose" "$work/last.log" || fail "moebench list did not name the error"
python -m pip uninstall --quiet --yes broken-plugin

step "the suite twice, compared: exit 0"
bench/ci.sh run base.parquet >/dev/null
bench/ci.sh run again.parquet >/dev/null
expect_exit 0 bench/ci.sh compare base.parquet again.parquet
python - <<'EOF'
import subprocess
from moebench.store import read_metadata
provenance = read_metadata("base.parquet")["environment"]["provenance"]
head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
assert provenance["repository"]["commit"] == head.strip(), provenance["repository"]
assert provenance["repository"]["dirty"] is False, provenance["repository"]
assert provenance["moebench"]["source"] == "wheel", provenance["moebench"]
plugins = {p["entry_point"]: p for p in provenance["plugins"]}
assert plugins["outsider-moe"]["distribution"] == "outsider-moe-moebench", plugins
assert plugins["outsider-moe"]["version"] == "0.1.0", plugins
EOF

step "the suite timed longer than it says (--budget-ms, --max-repeats), a bad value refused"
expect_exit 0 moebench run bench/moebench.toml --budget-ms 40 --max-repeats 60 --out longer --quiet
python - <<'EOF'
import json, pathlib
(run_json,) = pathlib.Path("longer").glob("*/run.json")
timing = json.loads(run_json.read_text())["timing"]
assert timing["budget_ms"] == 40 and timing["max_repeats"] == 60, timing
EOF
expect_exit 2 moebench run bench/moebench.toml --budget-ms 0 --out longer
grep -q "must be a positive number of milliseconds" "$work/last.log" || fail "--budget-ms 0 not named"

step "pytest-benchmark against the exported run: passes"
moebench export base.parquet --format pytest-benchmark --storage .benchmarks >/dev/null
pytest_compare=(python -m pytest bench -q -p no:cacheprovider -k "$impl"
  --benchmark-compare --benchmark-compare-fail=median:150%)
expect_exit 0 "${pytest_compare[@]}"
grep -q "Comparing against benchmarks from" "$work/last.log" || fail "pytest compared nothing"

step "the plugin's experts 20x slower (version 0.1.1): compare exits 1, pytest-benchmark fails"
cat >>"bench/plugin/${impl//-/_}_moebench/moe.py" <<'EOF'


# Injected by moebench's CI: the experts computed twenty times over.
_routed_once = __CLASS__.routed


def _routed_twenty_times(self, *args):
    for _ in range(19):
        _routed_once(self, *args)
    return _routed_once(self, *args)


__CLASS__.routed = _routed_twenty_times
EOF
sed -i "s/__CLASS__/OutsiderMoeMoE/g; " "bench/plugin/${impl//-/_}_moebench/moe.py"
sed -i 's/^version = "0.1.0"/version = "0.1.1"/' bench/plugin/pyproject.toml
python -m pip install --quiet --no-deps --force-reinstall ./bench/plugin
bench/ci.sh run slow.parquet >/dev/null
expect_exit 1 bench/ci.sh compare base.parquet slow.parquet
grep -q "regressed" "$work/last.log" || fail "compare did not say what regressed"
grep -q "plugin outsider-moe-moebench differs" "$work/last.log" \
  || fail "compare did not print the plugin's version change"
expect_exit 1 "${pytest_compare[@]}"
grep -q "Performance has regressed" "$work/last.log" || fail "pytest failed for another reason"
grep -q "$impl" "$work/last.log" || fail "pytest-benchmark did not name $impl"
step "ok (${SECONDS} s)"
