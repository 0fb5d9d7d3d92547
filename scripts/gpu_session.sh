#!/usr/bin/env bash
# The GPU checks and reference runs, several steps per call of a lent GPU machine:
#
#   GPU_DEADLINE_S=570 [GPU_TESTS="pytest args"] scripts/gpu_session.sh STEP [STEP...]
#
#   tests     the CUDA tests: built-ins vs reference on the device, the fused triton layer
#             (forward and gradients on odd shapes, its backward's kernels, dependent launch,
#             fast launch),
#             the Router's kernels, the ceilings, the offload race, the checks' tolerances,
#             profiling on CUDA, the presets against transformers' blocks, the peers plugin
#             (one call with GPU_TEST_WORKERS=8: the suite on 8 pytest-xdist workers,
#             each test named as it ends, then apart the tests that time the card or need
#             all of it; 361 s and 20 s on a fresh H100 in version 35, most of it
#             compiling the tests' odd shapes on the CPU: results/reference/h100-tests-v35;
#             without it, one process needs two calls; carry .whl for the moe-ops tests;
#             GPU_TESTS="-v tests/... tests/test_x.py::name ...": a subset)
#   triton    suites/triton.toml with --profile (the fused layer against grouped, plain and
#             graphed, and where its time goes)
#   default   suites/default.toml --profile
#   hierarchical  suites/hierarchical.toml
#   peers     suites/peers.toml (every preset)
#   weight-grad  scripts/weight_grad_bench.py: the backward's weight gradients, grouped GEMM
#             against the few-rows Triton kernel (GPU_PRESETS: which presets; GPU_TOKENS:
#             which token counts, default 1 64 1024 8192)
#   designs   seeds, moepp, dsmoe, topp, merging, offload and deepseek suites (GPU_DESIGNS:
#             a subset, by name)
#   compile-ab  the fused layer's tuning with its candidates compiled one by one, then all
#             at once (MOEBENCH_TRITON_PARALLEL_COMPILE=auto), each from empty caches (no
#             shipped choices): Qwen3-30B-A3B's forward and training step at 8192 tokens
#             (GPU_PRESETS: others); scripts/tune_log.py sums each side's tuning time
#   host      scripts/host_profile.py, one-token forwards of Qwen3-30B-A3B and OLMoE-1B-7B
#             in one process (GPU_PRESETS, GPU_TOKENS: others), with dependent launch off
#             and on (GPU_AB: another switch of its --ab, forward-plan say) and the layers
#             in turns, and cProfile's top functions
#   ncu       Nsight Compute's counters on the fused layer's GEMM kernels, one forward each
#             (scripts/ncu_layer.py; GPU_NCU_CASES: PRESET:TOKENS list, default Qwen3-30B-A3B at
#             8192 tokens and OLMoE-1B-7B at 64 and 1024); the report is $OUT/ncu.txt
#   tail      the merged-tail tiles (merge_tail.py): their tests (the TMA tiles' bits at
#             128-row blocks), then scripts/tail_probe.py: what an expert's tail block costs
#             in gate_up and in down, per kind of tile, HALF_TAIL and MERGE_TAIL, on
#             DeepSeek-V3's shape (GPU_PRESETS: one other preset);
#             $OUT/tail_probe_gate_up.json and tail_probe_down.json (the layer races
#             them by default since version 31; MOEBENCH_MERGE_TAIL=0: not)
#   tail-ncu  Nsight Compute's counters on scripts/tail_probe.py's gate_up tiles (the TMA
#             one and the Gluon one, every expert given 256 rows and then 288: a tail of
#             32), on Mixtral-8x7B's shape (GPU_PRESETS: other presets, space-separated):
#             what bounds a full tile and what a tail's costs; $OUT/tail_ncu_PRESET.txt
#             (triton/NOTES.md, version 39)
#   stages    scripts/stage_probe.py: what each stage of the fused layer (Router, alignment,
#             each GEMM, the sum over slots) adds to a graphed call's critical path
#             (GPU_POINTS: PRESET:TOKENS list; default the points issue 14 misses; GPU_AB:
#             switches to time the call with (=1) and without (=0), in turns:
#             MOEBENCH_MERGE_TAIL, say, or A,B);
#             $OUT/stage_probe.json
#   gluon     the warp-specialised Gluon kernels (gluon_down.py, gluon_gate_up.py): their
#             tests, then scripts/gluon_probe.py for each GEMM (GPU_GEMMS, default
#             "gate_up down": each config under a watchdog, its bits against the TMA
#             tile's, timed against the shipped choice; GPU_POINTS: PRESET:TOKENS list);
#             $OUT/gluon_probe_GEMM.json (the layer races them by default since
#             version 31; MOEBENCH_GLUON_WS=0: not)
#
# GPU_FILTER="KEY=V1,V2" (or a label regex) keeps only matching cases of every suite step,
# e.g. GPU_FILTER=cuda_graph=true scripts/gpu_session.sh peers (the graphed decode rows);
# several filters, all of which a case must match, are separated by ";"
# (GPU_FILTER="preset=deepseek-v3;mode=train;impl=triton,moe-ops"); a value may be a
# wildcard (GPU_FILTER="impl=grouped,moe-ops,hf-*:grouped_mm,hf-*:batched_mm": the peers
# but `reference` and the transformers blocks' slow `eager` loops). GPU_PROFILE=1 adds
# --profile (where each case's time goes) to every suite step; GPU_BUDGET_MS=MS and
# GPU_MAX_REPEATS=N time each case for longer than the suite says (--budget-ms,
# --max-repeats: two layers a few percent apart, GPU_BUDGET_MS=3000 GPU_MAX_REPEATS=400).
#
# Steps run in the order given, all inside GPU_DEADLINE_S seconds (default 570, under the
# device tool's 10-minute call): a step still running at the deadline gets SIGTERM, which
# keeps its finished cases (moebench consolidates the run; `--resume` finishes it later).
# Each step's results (parquet, run.json and the per-case parts, no traces) are packed
# into $OUT/STEP.tar.gz as soon as it ends, so what finished comes back even if a later
# step is cut; one log, $OUT/session.log, holds every step's output. (The device tool
# returns at most 8 files from $OUT: a run folder written there directly, with its parts
# and kernels, loses its results.parquet past that count; the tarballs keep each step to
# one file.) Make the HTML reports afterwards, off the GPU machine (`moebench report
# FILE`: plotly is not installed there).
#
# One run longer than a call (the whole peers suite, about 11 minutes): GPU_RESUME=RUN_ID
# continues that run in the step's results root. Unpack the cut call's tarball there
# first and let it travel (mkdir -p results/gpu-peers && tar -xzf peers.tar.gz -C
# results/gpu-peers; device tool: carry "results/gpu-peers"), then run the same step with
# the same GPU_FILTER and GPU_RESUME set: only the missing cases run, into the same run.
#
# Wheels that the GPU machine lacks (moe-ops) travel in .whl/ (device tool: carry ".whl");
# the peers plugin is installed from this checkout without network.
#
# The fused layer's tuned block sizes travel too, so a fresh machine does not tune again
# (entries tuned for other code than this checkout's are ignored, and replaced):
# .tune-cache/*.json (git-ignored; device tool: carry ".tune-cache") seeds the tuning
# cache, and the cache comes back as $OUT/tune-cache/ (copy it over .tune-cache/). It
# holds choices of block sizes, no measurements. Kernels compiled ahead on a host without
# a card travel as .triton-cache/ or, a quarter of its size, .triton-cache.tar.gz (both
# git-ignored; `python scripts/offline_compile.py --preset P --cache .triton-cache`, then
# `tar -czf .triton-cache.tar.gz -C .triton-cache .`; device tool: carry
# ".triton-cache.tar.gz"): unpacked as Triton's cache, the JIT loads them instead of
# compiling, where its key comes out the same there. Triton's key hashes its libtriton
# binary, which differs between Pythons' wheels (the card's Python is 3.12: a 3.11 host's
# cache compiled every kernel again on version 17's card), so compile from a Python 3.12
# venv with the card's Triton (`scripts/card_cache.sh` does it all); the log's first lines
# say whether the cache was made by the card's compiler, its last how many kernels were
# compiled there all the same.
# .tune-cache does not outlive a fresh
# checkout: fold what came back into the choices moebench ships, and commit them
# (`python scripts/ship_tuning.py $OUT/tune-cache/NVIDIA_H200.json`; every key of the
# package's tuned/ files is taken without tuning). What each tuning timed (every candidate's
# milliseconds, or why it failed to compile) is logged to $OUT/tune-log.jsonl
# (`python scripts/tune_log.py FILE` prints a line per tuning).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: scripts/gpu_session.sh STEP [STEP...]" >&2; exit 2; }
out="${OUT:-results/gpu}"
log="$out/session.log"
deadline=$((SECONDS + ${GPU_DEADLINE_S:-570}))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MOEBENCH_TRITON_CACHE=/tmp/moebench-triton
export MOEBENCH_TRITON_TUNE_LOG="$out/tune-log.jsonl"
if compgen -G ".tune-cache/*.json" >/dev/null; then
  mkdir -p "$MOEBENCH_TRITON_CACHE" && cp .tune-cache/*.json "$MOEBENCH_TRITON_CACHE/"
fi
kernels_carried=
if [ -f .triton-cache.tar.gz ] || [ -d .triton-cache ]; then
  export TRITON_CACHE_DIR=/tmp/triton-cache
  mkdir -p "$TRITON_CACHE_DIR"
  if [ -f .triton-cache.tar.gz ]; then
    tar -xzf .triton-cache.tar.gz -C "$TRITON_CACHE_DIR"
  else
    cp -r .triton-cache/. "$TRITON_CACHE_DIR/"
  fi
  python3 -c "import sys; from pathlib import Path; from moebench.offline_compile import \
unpack_cache; print(unpack_cache(Path(sys.argv[1])))" "$TRITON_CACHE_DIR" | tee -a "$log"
  kernels_carried=$(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l)
fi

site=/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
  --no-cache-dir --target "$site" ./plugins/moebench-peers
export PYTHONPATH="$PWD:$site:${PYTHONPATH:-}"

left() { echo $((deadline - SECONDS)); }

timed() {  # a command cut at the deadline, its output appended to the log
  local seconds
  seconds=$(left)
  if [ "$seconds" -le 5 ]; then
    echo "== skipped (deadline): $*" | tee -a "$log"
    return 124
  fi
  echo "== $(date -u +%T) ($seconds s left): $*" | tee -a "$log"
  timeout --signal=TERM --kill-after=20 "$seconds" "$@" 2>&1 | tee -a "$log"
}

suite() {  # a suite into this step's results root (GPU_FILTER: --filter for every suite)
  local filters=() filter
  IFS=';' read -ra parts <<< "${GPU_FILTER:-}"
  for filter in "${parts[@]}"; do filters+=(--filter "$filter"); done
  local options=()
  [ -n "${GPU_RESUME:-}" ] && options+=(--resume "$GPU_RESUME")
  [ -n "${GPU_PROFILE:-}" ] && options+=(--profile)
  [ -n "${GPU_BUDGET_MS:-}" ] && options+=(--budget-ms "$GPU_BUDGET_MS")
  [ -n "${GPU_MAX_REPEATS:-}" ] && options+=(--max-repeats "$GPU_MAX_REPEATS")
  timed python3 -m moebench run "$@" "${filters[@]}" --out "$root" --quiet "${options[@]}"
}

for step in "$@"; do
  root="results/gpu-$step"
  mkdir -p "$root"
  case "$step" in
    tests)
      # GPU_TESTS: other pytest arguments (a subset, say) in place of the default list.
      # GPU_TEST_WORKERS=N (with pytest-xdist there): the default list on N workers, each
      # test named as it ends, then one at a time the tests that time the card or need
      # all of its memory (workers beside them slow the card or fill its memory)
      cuda_tests="tests/test_cuda.py tests/test_triton.py tests/test_tma.py
        tests/test_triton_backward_rows.py tests/test_route_kernel.py
        tests/test_router_logits.py tests/test_dependent_launch.py tests/test_fast_launch.py
        tests/test_gluon_down.py tests/test_gluon_gate_up.py tests/test_forward_plan.py
        tests/test_merge_tail.py tests/test_ceilings.py tests/test_offload_cuda.py
        tests/test_check.py tests/test_profiling.py tests/test_presets_hf.py
        tests/test_peers.py tests/test_shared_stream.py"
      whole_card="tests/test_cuda.py::test_latency_agrees_with_independent_timers
        tests/test_cuda.py::test_timed_warm_up_takes_every_sample_at_the_clock_the_card_keeps
        tests/test_ceilings.py::test_cuda_matrix_rate_is_read_after_a_second_of_products
        tests/test_presets_hf.py::test_full_size_presets_equal_transformers_blocks_on_cuda"
      if [ -n "${GPU_TESTS:-}" ]; then
        # shellcheck disable=SC2086
        timed python3 -m pytest -q -p no:cacheprovider -rs $GPU_TESTS
      elif [ -n "${GPU_TEST_WORKERS:-}" ] && python3 -c "import xdist" 2>/dev/null; then
        deselect=()
        for test in $whole_card; do deselect+=(--deselect "$test"); done
        # shellcheck disable=SC2086
        timed python3 -m pytest -v -p no:cacheprovider -rs -n "$GPU_TEST_WORKERS" \
          --dist loadfile $cuda_tests "${deselect[@]}"
        # shellcheck disable=SC2086
        timed python3 -m pytest -v -p no:cacheprovider -rs $whole_card
      else
        # shellcheck disable=SC2086
        timed python3 -m pytest -q -p no:cacheprovider -rs $cuda_tests
      fi
      ;;
    triton) suite suites/triton.toml --device cuda --profile ;;
    default) suite suites/default.toml --device cuda --profile ;;
    hierarchical) suite suites/hierarchical.toml --device cuda ;;
    gluon)
      timed python3 -m pytest -q -p no:cacheprovider -rs tests/test_gluon_down.py tests/test_gluon_gate_up.py
      for gemm in ${GPU_GEMMS:-gate_up down}; do
        # shellcheck disable=SC2086
        timed python3 scripts/gluon_probe.py --gemm "$gemm" \
          --json "$out/gluon_probe_$gemm.json" ${GPU_POINTS:+--points $GPU_POINTS}
      done
      ;;
    stages)
      # shellcheck disable=SC2086
      timed python3 scripts/stage_probe.py --json "$out/stage_probe.json" \
        ${GPU_POINTS:+--points $GPU_POINTS} ${GPU_AB:+--ab $GPU_AB}
      ;;
    peers) suite suites/peers.toml --device cuda ;;
    weight-grad)
      # shellcheck disable=SC2086
      timed python3 scripts/weight_grad_bench.py \
        --preset ${GPU_PRESETS:-deepseek-v3 qwen3-30b-a3b olmoe-1b-7b} \
        --tokens ${GPU_TOKENS:-1 64 1024 8192}
      ;;
    compile-ab)
      for workers in 1 auto; do
        rm -rf "/tmp/ab-$workers" && mkdir -p "/tmp/ab-$workers"
        # shellcheck disable=SC2086
        MOEBENCH_TRITON_PARALLEL_COMPILE=$workers MOEBENCH_TRITON_SHIPPED=0 \
          MOEBENCH_TRITON_CACHE="/tmp/ab-$workers/tune" TRITON_CACHE_DIR="/tmp/ab-$workers/triton" \
          MOEBENCH_TRITON_TUNE_LOG="$out/tune-$workers.jsonl" \
          timed python3 -m moebench run suites/triton.toml --device cuda --filter impl=triton \
          --filter cuda_graph=false --filter batch=8192 \
          --filter "preset=$(echo ${GPU_PRESETS:-qwen3-30b-a3b} | tr ' ' ',')" \
          --out "$root" --quiet
        timed python3 scripts/tune_log.py "$out/tune-$workers.jsonl"
      done
      ;;
    host)
      # shellcheck disable=SC2086
      timed python3 scripts/host_profile.py --preset ${GPU_PRESETS:-qwen3-30b-a3b olmoe-1b-7b} \
        --tokens ${GPU_TOKENS:-1} --ab ${GPU_AB:-pdl} --top 30
      ;;
    ncu)
      # shellcheck disable=SC2086
      timed ncu --clock-control none --profile-from-start off -k 'regex:gate_up|down' \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section Occupancy --section LaunchStats -o "$out/ncu" -f \
        python3 scripts/ncu_layer.py \
        ${GPU_NCU_CASES:-qwen3-30b-a3b:8192 olmoe-1b-7b:64 olmoe-1b-7b:1024}
      ncu --import "$out/ncu.ncu-rep" --page details > "$out/ncu.txt" 2>&1
      ;;
    tail-ncu)
      # the first launch of each, profiled: the TMA tile and the Gluon one at 256 rows an
      # expert (two full blocks) and at 288 (a tail of 32); one report a preset
      for preset in ${GPU_PRESETS:-mixtral-8x7b}; do
        timed ncu --clock-control none \
          -k 'regex:gate_up_tma_kernel|gate_up_ws_kernel' -c 4 \
          --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
          --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
          --section SchedulerStats --section InstructionStats --section SourceCounters \
          -o "$out/tail_ncu_$preset" -f python3 scripts/tail_probe.py \
          --preset "$preset" --rows 256 288 \
          --only "TMA, GATHER_A, HALF_TAIL" Gluon --warm-s 0.1 --rounds 1
        ncu --import "$out/tail_ncu_$preset.ncu-rep" --page details \
          > "$out/tail_ncu_$preset.txt" 2>&1
        rm -f "$out/tail_ncu_$preset.ncu-rep"  # (the text holds what it says)
      done
      ;;
    tail)
      timed python3 -m pytest -q -p no:cacheprovider -rs tests/test_merge_tail.py
      for gemm in gate_up down; do
        timed python3 scripts/tail_probe.py --preset "${GPU_PRESETS:-deepseek-v3}" \
          --gemm "$gemm" --json "$out/tail_probe_$gemm.json"
      done
      ;;
    designs)
      # GPU_DESIGNS: a subset of the design suites, by name
      for name in ${GPU_DESIGNS:-seeds moepp dsmoe topp merging offload deepseek}; do
        suite "suites/$name.toml" --device cuda
      done
      ;;
    *) echo "unknown step $step" | tee -a "$log" ;;
  esac
  if [ -n "$(ls -A "$root")" ]; then
    tar -czf "$out/$step.tar.gz" --exclude='traces' --exclude='*.lock' \
      -C "$root" .
  fi
done
if compgen -G "$MOEBENCH_TRITON_CACHE/*.json" >/dev/null; then
  mkdir -p "$out/tune-cache" && cp "$MOEBENCH_TRITON_CACHE"/*.json "$out/tune-cache/"
fi
if [ -n "$kernels_carried" ]; then
  kernels_now=$(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l)
  echo "== Triton's cache: $kernels_carried kernels carried," \
    "$((kernels_now - kernels_carried)) compiled here" | tee -a "$log"
fi
echo "== $(date -u +%T) done, $(left) s to spare" | tee -a "$log"
