"""Block sizes for the fused layer's kernels: picked by timing a short list of candidates
once per (device, kernel, weight layout, shape, dtype, token bucket), and cached in a JSON
file per device so that a sweep, or the next run, does not tune again.

A cached choice is only as good as the code it was timed on, so each entry's key ends
with a fingerprint of that code (`code_fingerprint`: Triton's version, the kernels' code
and the candidate list, as Triton's own autotuner keys its disk cache): a changed kernel
or candidate list tunes again instead of reusing a choice made for other code, and the
stale entry is dropped when the new one is saved.

The cache lives in `$MOEBENCH_TRITON_CACHE` if set, else `$XDG_CACHE_HOME/moebench/triton`
(default `~/.cache/moebench/triton`), one file per device name. Delete the file to tune
again. With `$MOEBENCH_TRITON_TUNE_LOG` set to a file, each tuning appends what every
candidate took (or why it failed) to it as one JSON line.

moebench also ships choices tuned on the cards it was measured on (`shipped_dir()`, the
package's `tuned/<device name>.json`, written by `scripts/ship_tuning.py` from a cache or a
tuning log): a key missing from the cache is looked up there before it is tuned, so a
first run on such a card does not spend minutes tuning. Their keys carry the same
fingerprint, so they are taken only for the code, Triton and torch they were timed on.
The cache, tuned on this machine, comes first; `MOEBENCH_TRITON_SHIPPED=0` ignores the
shipped choices (a card run at other clocks or power limits, say).

Token counts are bucketed to the next power of two, since block choices change with the
order of magnitude of the rows per expert, not with every count.

Compiling the candidates is most of a tuning's time (timing one takes milliseconds; on a
fresh machine `tests/test_triton.py`, which compiles every candidate, takes minutes).
The kernels' own tunings compile every candidate at once on one thread per CPU this
process may use (Triton's `AsyncCompileMode`) before timing them one by one;
`$MOEBENCH_TRITON_PARALLEL_COMPILE=N` takes N threads, and 0 or 1 compile each candidate
as it is first timed. On an H200 machine's 16 CPUs, Qwen3-30B-A3B's 8192-token forward
and training step tuned in 15.7 s against 63.1 s one by one, to the same choices
(NOTES.md, version 17; the tuning log records each tuning's `tune_s` and, where
candidates compiled at once, `precompile_s`).

A candidate is timed by triton's `do_bench`, one launch after another from Python, or
with `graphed=True` replayed from a CUDA graph by moebench's own timer, L2 flushed
before each (`graphed_ms`). The forward's GEMMs take the graph: at one token their
kernels run for 8-15 us while a launch from Python takes 20-40, so `do_bench` timed the
host, and under programmatic dependent launch it picked a down kernel for Qwen3-30B-A3B
that ran 20 us in the layer where the one picked before ran 8.4 (NOTES.md, version 13).
The method is part of the fingerprint: a choice timed the other way is tuned again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from moebench import fast_launch
from moebench.env import TRITON_RUNOFF_SWITCH, layer_switch_on, switch_off, usable_cpus
from moebench.measure.graph import graphed_step
from moebench.measure.timing import TimingPlan, time_repeats

# Rows per block of the sorted token list: both GEMMs share it (one alignment).
BLOCK_M_BY_ROWS_PER_EXPERT = ((8, 16), (24, 32), (64, 64))
BLOCK_M_LARGE = 128


def token_bucket(tokens: int) -> int:
    """The next power of two >= tokens."""
    return 1 << max(0, (tokens - 1).bit_length())


def block_m_for(tokens: int, top_k: int, num_experts: int) -> int:
    """Rows per block from the mean rows per expert: small blocks waste less padding and
    give more programs when each expert sees few tokens."""
    rows_per_expert = token_bucket(tokens) * top_k / num_experts
    for limit, block_m in BLOCK_M_BY_ROWS_PER_EXPERT:
        if rows_per_expert <= limit:
            return block_m
    return BLOCK_M_LARGE


def weight_layout(w_EKN: torch.Tensor) -> str:
    """ "kmajor" where a GEMM's E x K x N weight view runs along K (the reduction), else
    "nmajor": the best block sizes differ between the two (NOTES.md, version 6)."""
    return "kmajor" if w_EKN.stride(1) == 1 else "nmajor"


def block_m_choices(tokens: int, top_k: int, num_experts: int) -> list[int]:
    """The row-block sizes the forward races (`block_m_for`'s first): between 32 and 256
    rows per expert on average, both 64 and 128. There an expert spans one or two blocks
    of either size, and which wastes less (128: one read of each weight tile, a tail of
    padding that HALF_TAIL halves; 64: less padding, a second program per weight tile)
    depends on the spread of rows over experts, so it is timed, not guessed."""
    default = block_m_for(tokens, top_k, num_experts)
    rows_per_expert = token_bucket(tokens) * top_k / num_experts
    if not 32 < rows_per_expert <= 256:
        return [default]
    return [default, *(m for m in (64, 128) if m != default)]


def key(
    kernel: str,
    x_TD: torch.Tensor,
    w_down_EFD: torch.Tensor,
    top_k: int,
    layout: str,
    block_m: int | None = None,
) -> str:
    """The cache key of `kernel` for these tokens and this layer shape: kernel, the
    layout of its weights (`weight_layout`), shape, dtype and token bucket, and for the
    forward's GEMMs the row-block size (`block_m`: the forward may race two per bucket,
    `block_m_choices`, and tunes each one's tiles apart)."""
    E, F, D = w_down_EFD.shape
    dtype = str(x_TD.dtype).removeprefix("torch.")
    bucket = token_bucket(x_TD.shape[0])
    rows = "" if block_m is None else f" M{block_m}"
    return f"{kernel} {layout} D{D} F{F} E{E} K{top_k} {dtype} T{bucket}{rows}"


def candidates(kernel: str, block_m: int) -> list[dict]:
    """Configurations worth timing for `kernel` ("gate_up" or "down") at `block_m`.
    gate_up holds two accumulators, so its tiles are half as wide at large blocks. From
    64 rows, each tile also with HALF_TAIL: a block whose second half is padding alone (an
    expert's last block, a few rows into it) computes half its rows."""
    if block_m <= 32:  # weight-read bound: narrow tiles, many programs, deep pipelines
        shapes = [(32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3)]
        shapes += [(32, 256, 4, 3), (128, 64, 4, 5)]
        # 16 columns: a few experts' F columns still fill every SM (Qwen3-30B-A3B's
        # 8 experts x 768 / 32 columns are 192 programs, 1.5 waves on 132 SMs)
        shapes += [(16, 256, 4, 3), (16, 512, 4, 2), (16, 512, 4, 3), (16, 1024, 4, 2)]
    elif kernel == "gate_up":
        # (128 columns, BLOCK_K 32 and 4 warps was one: compiled for sm_90 it spills at
        # 128-row blocks, two 128 x 128 float32 accumulators on 128 threads, and in the
        # 36 tunings of the committed tune logs that raced it, it ran 1.14-5.6x the
        # winner's time; NOTES.md, version 16)
        shapes = [(64, 64, 4, 4), (64, 64, 8, 4), (128, 64, 8, 3), (64, 128, 8, 3)]
        shapes += [(128, 64, 8, 4)]
    else:
        shapes = [(128, 64, 8, 4), (128, 64, 4, 4), (64, 64, 4, 4), (256, 64, 8, 3)]
        shapes += [(128, 128, 8, 3), (256, 64, 8, 4), (256, 32, 8, 6)]
    configs = [
        {
            "BLOCK_M": block_m,
            "BLOCK_N": n,
            "BLOCK_K": k,
            "GROUP_M": 8,
            "num_warps": warps,
            "num_stages": stages,
        }
        for n, k, warps, stages in shapes
    ]
    if block_m >= 64:
        configs += [{**config, "HALF_TAIL": True} for config in configs]
    return configs


def code_fingerprint(
    code: Sequence[object], configs: list[dict], timed_by: str = "do_bench"
) -> str:
    """12 hex digits over the versions of Triton and torch (whose grouped GEMM races
    some kernels), the code of the kernels in `code`, the candidate `configs` and how
    they were timed (`timed_by`: "graph" or "do_bench", either with ", run-off"): what
    a tuned choice depends on besides the key's shape. A JIT function's code is its
    `cache_key` (its source and the JIT functions it calls, and its first line's number:
    moving a kernel within its file tunes it again too); the interpreter's functions,
    which have none, give their source."""
    parts = [_version("triton"), torch.__version__, json.dumps(configs, sort_keys=True)]
    if timed_by != "do_bench":  # (the choices made before by do_bench keep their keys)
        parts.append(f"timed by {timed_by}")
    for kernel in code:
        parts.append(getattr(kernel, "cache_key", None) or _source(kernel))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def _source(kernel: object) -> str:
    return inspect.getsource(getattr(kernel, "fn", kernel))


def _log_trials(
    full_key: str,
    trials: list[tuple[dict, object]],
    chosen: dict | None,
    timed_by: str = "do_bench",
    seconds: dict[str, float] | None = None,
    runoff: list[tuple[dict, list[float]]] | None = None,
) -> None:
    """Append one JSON line per tuning to `$MOEBENCH_TRITON_TUNE_LOG`, if set: the key,
    how the candidates were timed ("graph" or "do_bench"), each candidate's milliseconds
    (or why it failed) and the choice, so a run can show what the choice beat and which
    candidates did not compile; `seconds`: how long the tuning took (`tune_s`) and its
    compiling at once (`precompile_s`), where known; `runoff`: each contender's times in
    the run-off (`race`), where one ran."""
    path = os.environ.get("MOEBENCH_TRITON_TUNE_LOG")
    if not path:
        return
    line = {
        "key": full_key,
        "timed_by": timed_by,
        "trials": [[c, r] for c, r in trials],
        "chosen": chosen,
        **(seconds or {}),
        **({"runoff": [[c, times] for c, times in runoff]} if runoff else {}),
    }
    try:
        with open(path, "a") as log:
            log.write(json.dumps(line) + "\n")
    except OSError:
        pass  # the log is an aid; tuning goes on without it


def read_log(text: str) -> list[tuple[int, dict]]:
    """(line number, tuning) for each line of a log `_log_trials` wrote (`text`), blank
    lines skipped. Raises ValueError naming the first line that is not a tuning (a JSON
    object with its key, trials and choice)."""
    tunings = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            tuning = json.loads(raw)
        except ValueError:
            tuning = None
        if (
            not isinstance(tuning, dict)
            or not {"key", "trials", "chosen"} <= tuning.keys()
            or not isinstance(tuning["key"], str)
        ):
            raise ValueError(f"line {number}: not a tuning line")
        tunings.append((number, tuning))
    return tunings


# A candidate's timing in the graph: a few ms of calls; the median is what is compared.
GRAPHED_PLAN = TimingPlan(budget_ms=20.0, warmup=2, min_repeats=10, max_repeats=100)


def graphed_ms(run: Callable[[], object], device: torch.device) -> float:
    """The median ms of `run()` captured in a CUDA graph and replayed, L2 flushed before
    each replay (moebench's own timer): the GPU's time, however long the host takes to
    launch it. `run` must be capturable (no host sync)."""
    step = graphed_step(lambda _: run(), 1, device, "the Triton tuner")
    return statistics.median(time_repeats(step, device, GRAPHED_PLAN))


# The run-off (on unless `$MOEBENCH_TRITON_RUNOFF=0`, `env.TRITON_RUNOFF_SWITCH`; built in
# NOTES.md's version 31, on by default since 32). One pass times each candidate once, one
# after another, and on an H100 the same tile read 0.706 and 0.780 ms in two tunings of
# one key (the clock moves under the power cap as a tuning goes on), so a choice among
# candidates a few percent apart was the pass's order and noise. The candidates within
# RUNOFF_MARGIN of the pass's best, at most RUNOFF_SIZE, are timed again in RUNOFF_ROUNDS
# turns, the order reversed each turn, and the lowest median of those times wins.
RUNOFF_MARGIN = 1.05
RUNOFF_SIZE = 4
RUNOFF_ROUNDS = 3


def timing_way(graphed: bool, runoff: bool | None = None) -> str:
    """How a tuning times its candidates (`code_fingerprint`'s `timed_by`): replayed
    from a CUDA graph (`graphed`) or by do_bench, with the run-off where `runoff` (None:
    unless `$MOEBENCH_TRITON_RUNOFF=0`)."""
    if runoff is None:
        runoff = layer_switch_on(TRITON_RUNOFF_SWITCH)
    return ("graph" if graphed else "do_bench") + (", run-off" if runoff else "")


def race(
    configs: list[dict], time_one: Callable[[dict], float], runoff: bool = False
) -> tuple[dict | None, list[tuple[dict, object]], list[tuple[dict, list[float]]]]:
    """(the fastest of `configs` by `time_one(config)` ms, or None where none ran; each
    config's ms or its error's first line, for the tuning log; with `runoff`, each
    contender's times in the run-off's turns). A config whose timing raises is dropped."""
    trials: list[tuple[dict, object]] = []
    for config in configs:
        try:
            trials.append((config, time_one(config)))
        except Exception as error:  # any failure only drops the config
            trials.append((config, f"{type(error).__name__}: {str(error)[:200]}"))
    timed = sorted(
        ((ms, index) for index, (_, ms) in enumerate(trials) if isinstance(ms, float | int)),
    )
    if not timed:
        return None, trials, []
    best_ms, best_index = timed[0]
    contenders = [i for ms, i in timed if ms <= best_ms * RUNOFF_MARGIN][:RUNOFF_SIZE]
    if not runoff or len(contenders) < 2:
        return trials[best_index][0], trials, []
    turns: dict[int, list[float]] = {i: [] for i in contenders}
    for turn in range(RUNOFF_ROUNDS):
        for index in contenders if turn % 2 == 0 else contenders[::-1]:
            try:
                turns[index].append(time_one(trials[index][0]))
            except Exception:  # ran once, failed now: out of the run-off
                turns[index].append(float("inf"))
    winner = min(contenders, key=lambda i: statistics.median(turns[i]))
    return trials[winner][0], trials, [(trials[i][0], turns[i]) for i in contenders]


PARALLEL_COMPILE_SWITCH = "MOEBENCH_TRITON_PARALLEL_COMPILE"


def compile_workers() -> int:
    """Threads that compile a tuning's candidates at once: `$MOEBENCH_TRITON_PARALLEL_COMPILE`
    as a count; "auto" or unset, the CPUs this process may use; 1 (each compiled as it
    is first timed) for 0 or anything else."""
    value = os.environ.get(PARALLEL_COMPILE_SWITCH, "").strip().lower()
    if value in ("", "auto"):
        return len(usable_cpus())
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _precompile(configs: list[dict], run: Callable[[dict], object]) -> float | None:
    """Compile the Triton kernels `run(config)` launches for every config at once, on
    `compile_workers()` threads, running nothing (`fast_launch.compile_only` under
    Triton's `AsyncCompileMode`); the seconds it took, or None where it did not run (one
    worker, or a Triton without `AsyncCompileMode`). A config whose compile fails is
    left to fail again when it is timed, where its reason is logged. Configs that name a
    library's GEMM (`"kernel"`) compile nothing of Triton's and are not run."""
    ours = [config for config in configs if "kernel" not in config]
    workers = min(compile_workers(), len(ours))
    if workers < 2:
        return None
    try:
        from triton import AsyncCompileMode
    except ImportError:
        return None
    start = time.perf_counter()
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="moebench-compile") as pool,
        AsyncCompileMode(pool, ignore_errors=True),
        fast_launch.compile_only(),
    ):
        for config in ours:
            # any failure: the timed loop meets it again, and logs it
            with contextlib.suppress(Exception):
                run(config)
    return time.perf_counter() - start


def cache_dir() -> Path:
    """Where tuned choices are kept (see the module docstring)."""
    override = os.environ.get("MOEBENCH_TRITON_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moebench" / "triton"


def shipped_dir() -> Path:
    """The choices moebench ships, one file per device name (the module docstring)."""
    return Path(__file__).with_name("tuned")


SHIPPED_SWITCH = "MOEBENCH_TRITON_SHIPPED"


def device_file_name(device: torch.device | str) -> str:
    """The file name of `device` (or of a device name) in the cache and among the shipped
    choices: its name with every run of characters other than letters, digits, '_', '.'
    and '-' as one '_' ("NVIDIA H200" -> "NVIDIA_H200.json"; the interpreter's "cpu.json")."""
    if isinstance(device, str):
        name = device.removesuffix(".json")
    else:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".json"


def _device_file(device: torch.device) -> Path:
    return cache_dir() / device_file_name(device)


def merge_choice(table: dict[str, dict], full_key: str, choice: dict) -> dict[str, dict]:
    """`table` with `choice` under `full_key` (a key and its fingerprint), less the entries
    of the same key made for other code (or before keys had a fingerprint)."""
    key = full_key.rsplit(" ", 1)[0]
    merged = {k: v for k, v in table.items() if key not in (k, k.rsplit(" ", 1)[0])}
    merged[full_key] = choice
    return merged


def read_table(path: Path) -> dict[str, dict]:
    """The choices in a cache or shipped file; {} for a file missing or unreadable (a
    cache is an aid: tuning again is the worst a bad file costs)."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


class Tuner:
    """Choices per key, loaded from and saved to the device's cache file."""

    def __init__(self) -> None:
        self._loaded: dict[Path, dict[str, dict]] = {}
        # (device, key) -> choice: the per-call path skips file and name look-ups.
        self._chosen: dict[tuple[torch.device, str], dict] = {}

    def _table(self, path: Path) -> dict[str, dict]:
        if path not in self._loaded:
            self._loaded[path] = read_table(path)
        return self._loaded[path]

    def choose(
        self,
        device: torch.device,
        key: str,
        configs: Callable[[], list[dict]],
        run: Callable[[dict], object],
        code: Sequence[object] = (),
        graphed: bool = False,
        precompile: bool = False,
    ) -> dict:
        """The cached choice for `key` and this code (`code`: the kernels that `run`
        launches; `code_fingerprint`), else the shipped one (`shipped_dir`), else the
        fastest of `configs()` by `run(config)`
        (timed with triton's do_bench, or replayed from a CUDA graph if `graphed`: the
        module docstring), saved before it is returned. A config that fails to compile
        or launch (too much shared memory, say) is skipped. `precompile`: `run` only
        launches kernels (and allocates), so its candidates may be compiled at once
        first (`_precompile`; never for a `run` that itself tunes)."""
        # the kernels raced and the run-off are in the memo's key: a switch that adds
        # tiles to the race (`MOEBENCH_MERGE_TAIL`), or `MOEBENCH_TRITON_RUNOFF`, tunes
        # again in the same process
        runoff = layer_switch_on(TRITON_RUNOFF_SWITCH)
        memo = (device, key, tuple(map(id, code)), runoff)
        chosen = self._chosen.get(memo)
        if chosen is None:
            chosen = self._chosen[memo] = self._lookup_or_tune(
                device, key, configs, run, code, graphed, runoff, precompile
            )
        return chosen

    def _lookup_or_tune(
        self,
        device: torch.device,
        key: str,
        configs_fn: Callable[[], list[dict]],
        run: Callable[[dict], object],
        code: Sequence[object],
        graphed: bool,
        runoff: bool,
        precompile: bool = False,
    ) -> dict:
        configs = configs_fn()
        if fast_launch.compiling_offline():  # compiling for another card: every candidate
            for config in configs:
                run(config)
            return configs[0]  # (nothing timed, nothing cached)
        if fast_launch.compiling_only():  # a `run` passed as precompilable tunes: say so
            raise RuntimeError(f"tuning {key!r} inside a compile-only pass")
        timed_by = timing_way(graphed, runoff)  # (a run-off's choices are its own)
        full_key = f"{key} {code_fingerprint(code, configs, timed_by)}"
        path = _device_file(device)
        table = self._table(path)
        if full_key in table:
            return table[full_key]
        if not switch_off(SHIPPED_SWITCH):
            shipped = self._table(shipped_dir() / device_file_name(device))
            if full_key in shipped:
                return shipped[full_key]
        if device.type != "cuda":  # Triton's interpreter (tests): nothing worth timing
            return configs[0]
        from triton.testing import do_bench

        start = time.perf_counter()
        seconds = {}
        if precompile and (precompile_s := _precompile(configs, run)) is not None:
            seconds["precompile_s"] = round(precompile_s, 3)

        def time_one(config: dict) -> float:
            if graphed:
                return graphed_ms(lambda: run(config), device)
            return do_bench(lambda: run(config), warmup=5, rep=20)

        best, trials, turns = race(configs, time_one, runoff)
        seconds["tune_s"] = round(time.perf_counter() - start, 3)
        _log_trials(full_key, trials, best, timed_by, seconds, turns)
        if best is None:
            raise RuntimeError(f"no Triton config ran for {key}; tried {configs}")
        table[full_key] = best
        self._save(path, full_key, best)
        return best

    def _save(self, path: Path, full_key: str, choice: dict) -> None:
        """Add one choice to the file, keeping what other processes wrote meanwhile and
        dropping the entries of the same key made for other code (or before keys had a
        fingerprint)."""
        on_disk = merge_choice(read_table(path), full_key, choice)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(on_disk, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError:
            pass  # a read-only cache only costs tuning again next time


TUNER = Tuner()
