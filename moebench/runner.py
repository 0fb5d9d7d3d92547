"""Run cases: one row per case, on disk before the next case starts, whatever happens.

Each case runs in a worker process (spawned once, reused while it is healthy) so that a
per-case timeout can be enforced and a crash (a segfault, the kernel's OOM killer) costs
one row, not the sweep: the worker is replaced and the sweep goes on. `isolate=False` runs
cases in this process (faster to start, easier to debug; no hard timeout).

Statuses: ok, mismatch (failed the correctness check; not timed), error (an exception,
message in `error`), oom, timeout, crashed (the worker died), skipped (the implementation
refused the case: `registry.Unsupported`, or too few ranks).
"""

from __future__ import annotations

import fnmatch
import gc
import multiprocessing as mp
import os
import re
import signal
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from moebench import registry
from moebench.case import Case
from moebench.interrupt import ctrl_c_held, ignore_ctrl_c, interrupt_name
from moebench.measure.case_run import WeightCache, measure_case
from moebench.measure.ceilings import measure_ceilings
from moebench.measure.estimate import estimate_case, fit_problem, oom_kills
from moebench.measure.phases import named_range
from moebench.measure.profile import NO_PROFILE, ProfileOptions, save_profile
from moebench.measure.timing import TimingPlan
from moebench.resume import open_for_resume
from moebench.store import ResultStore, StoreError, new_run_id

WORKER_START_TIMEOUT_S = 180.0
# A CPU case whose one call does less work than this runs on one thread: waking a thread
# pool costs more than it saves there, and on a busy machine a descheduled pool thread
# stalls the call for a scheduler tick (1000x a tiny case's latency).
ONE_THREAD_BELOW_FLOP = 2e7


def case_threads(case: Case, threads: int) -> int:
    """Intra-op threads for `case`: `threads`, or 1 for a tiny CPU call (see above)."""
    s = case.shape
    experts_per_token = s.top_k + s.shared_experts
    flop = 6 * case.tokens * s.hidden * s.ffn * experts_per_token * case.workload.layers
    if case.workload.mode == "train":
        flop *= 3
    return 1 if flop < ONE_THREAD_BELOW_FLOP else threads


class FilterError(ValueError):
    """A --filter expression that does not parse."""


def _filter_text(value: Any) -> str:
    """A case field as --filter matches it: booleans as TOML writes them (true, false)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _matches(text: str, value: str) -> bool:
    """Whether a case field's `text` is the --filter `value`: equal, or, where the value
    holds `*` or `?`, matched by it as a shell-style wildcard (`[` stays literal)."""
    if "*" not in value and "?" not in value:
        return text == value
    return fnmatch.fnmatchcase(text, value.replace("[", "[[]"))


def filter_cases(
    cases: Iterable[Case], expressions: list[str], unmatched: list[str] | None = None
) -> list[Case]:
    """Keep cases matching every expression: `key=v1,v2` on a case field (booleans as
    TOML writes them: true, false; any case; a value with `*` or `?` is a shell-style
    wildcard, `impl=hf-*:grouped_mm`), or a regular expression searched in the case's
    label. `unmatched`, where given, gets one line for each `key=` value that no case
    left by the expressions before it has (a typo keeps the others' cases, silently
    otherwise)."""
    kept = list(cases)
    for expr in expressions:
        if "=" in expr:
            key, _, values = expr.partition("=")
            wanted = {v.strip() for v in values.split(",")}
            if kept and isinstance(kept[0].fields().get(key), bool):
                wanted = {v.lower() for v in wanted}
            if kept and key not in kept[0].fields():
                fields = ", ".join(sorted(kept[0].fields()))
                raise FilterError(f"--filter {expr!r}: unknown field {key!r}; fields: {fields}")
            present = {_filter_text(c.fields()[key]) for c in kept}
            missing = sorted(v for v in wanted if not any(_matches(t, v) for t in present))
            if missing and unmatched is not None and kept:
                unmatched.append(
                    f"--filter {expr}: no case has {key} {', '.join(map(repr, missing))} "
                    f"(those left have: {', '.join(sorted(present))})"
                )
            kept = [
                c for c in kept if any(_matches(_filter_text(c.fields()[key]), v) for v in wanted)
            ]
        else:
            try:
                pattern = re.compile(expr)
            except re.error as exc:
                raise FilterError(f"--filter {expr!r}: {exc}") from exc
            kept = [c for c in kept if pattern.search(c.label())]
    return kept


def base_row(case: Case, run_id: str, suite: str) -> dict[str, Any]:
    """Identity and case columns of a row."""
    row = case.fields()
    row.update(run_id=run_id, case_id=case.case_id, suite=suite)
    row["started_at"] = datetime.now(UTC).isoformat()
    return row


def _describe(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _release_memory(case: Case) -> None:
    """Free what a case left behind before the next one runs. Its layer and tensors may
    live on in reference cycles (a layer's closures, hooks and CUDA graphs that hold it;
    a failed case's traceback frames) until the collector runs, which device memory does
    not prompt: in one worker, `suites/peers.toml` on an 80 GB H100 ran 8 DeepSeek-V3
    cases out of memory with 40-50 GB still held by the cases before them."""
    gc.collect()
    if case.device.startswith("cuda"):
        torch.cuda.empty_cache()


class InProcessExecutor:
    """Measures cases in this process; exceptions become rows."""

    def __init__(
        self,
        plan: TimingPlan,
        plugins: tuple[str, ...] = (),
        profile: ProfileOptions = NO_PROFILE,
        threads: int = 1,
    ):
        from moebench.plugins import import_plugin

        for spec in plugins:
            import_plugin(spec)
        self.plan = plan
        self.profile = profile
        self.threads = threads
        self.cache = WeightCache()
        self.ceilings: dict[str, float] | None = None

    def measure_ceilings(self, device: str, dtypes: list[str]) -> dict[str, float]:
        self.ceilings = measure_ceilings(device, dtypes)
        return self.ceilings

    def run(self, case: Case, timeout_s: float) -> dict[str, Any]:
        if fit_problem(case) is not None:  # retry without the cached weights first
            self.cache = WeightCache()
            _release_memory(case)
            if problem := fit_problem(case):
                return {"status": "oom", "error": problem}
        threads = case_threads(case, self.threads) if case.device == "cpu" else None
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            with named_range(f"case {case.label()}", nvtx=self.profile.nvtx):
                row = measure_case(case, self.plan, self.cache, self.ceilings, self.profile)
            row = {"threads": threads, **row}
        except registry.Unsupported as exc:
            row = {"status": "skipped", "error": str(exc)}
        except (torch.OutOfMemoryError, MemoryError) as exc:
            self.cache = WeightCache()
            row = {"status": "oom", "error": _describe(exc)}
        except Exception as exc:
            row = {"status": "error", "error": _describe(exc)}
        _release_memory(case)
        return row

    def close(self) -> None:
        self.cache = WeightCache()


class IsolatedExecutor:
    """Measures cases in a spawned worker process; timeouts and crashes become rows."""

    def __init__(
        self,
        plan: TimingPlan,
        plugins: tuple[str, ...] = (),
        gpu: int | None = None,
        profile: ProfileOptions = NO_PROFILE,
        threads: int = 1,
    ):
        """gpu: pin the worker to this GPU (it then sees only that one, as cuda:0)."""
        self.plan = plan
        self.plugins = plugins
        self.gpu = gpu
        self.profile = profile
        self.threads = threads
        self._ceilings_request: tuple[str, list[str]] | None = None
        self.ceilings: dict[str, float] | None = None
        self._process: Any = None
        self._conn: Any = None
        self._exitcode: int | None = None

    def _start(self) -> None:
        context = mp.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=_worker_main,
            args=(child, self.plan, self.plugins, self.gpu, self.profile, self.threads),
            daemon=True,
        )
        with ctrl_c_held():  # a press meanwhile is raised once `_kill` can find it
            process.start()
            self._process = process
        child.close()
        self._conn = parent
        kind, reply = self._receive(WORKER_START_TIMEOUT_S)
        if kind != "ready":
            raise RuntimeError(f"worker process failed to start ({kind}: {reply})")
        if self.ceilings is not None:  # a replacement worker: give it the run's ceilings
            self._conn.send(("set_ceilings", self.ceilings))

    def _receive(self, timeout_s: float) -> tuple[str, Any]:
        """("row"/"ready"/"ceilings", payload), or ("timeout"/"died", exit code); a
        worker that timed out or died is gone afterwards."""
        try:
            if self._conn.poll(timeout_s):
                return self._conn.recv()
            outcome = "timeout"
        except (EOFError, OSError):
            outcome = "died"
        self._kill()
        return outcome, self._exitcode

    def _kill(self) -> None:
        self._exitcode = None
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=10)
            self._exitcode = self._process.exitcode
        self._process, self._conn = None, None

    def measure_ceilings(self, device: str, dtypes: list[str]) -> dict[str, float]:
        if self._process is None:
            self._start()
        self._conn.send(("ceilings", (device, dtypes)))
        kind, reply = self._receive(WORKER_START_TIMEOUT_S)
        self.ceilings = reply if kind == "ceilings" else {}
        return self.ceilings

    def run(self, case: Case, timeout_s: float) -> dict[str, Any]:
        if self._process is None:
            self._start()
        kills_before = oom_kills()
        self._conn.send(("case", case, timeout_s))
        try:
            kind, reply = self._receive(timeout_s)
        except KeyboardInterrupt:  # the case in progress is lost anyway: do not wait for it
            self._kill()
            raise
        if kind == "row":
            return reply
        if kind == "timeout":
            return {"status": "timeout", "error": f"no result within the {timeout_s:g} s timeout"}
        return _death_row(reply, kills_before, oom_kills(), case)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(("stop", None))
                self._process.join(timeout=10)
            except OSError:
                pass
        self._kill()


def _death_row(
    exitcode: int | None, kills_before: int | None, kills_after: int | None, case: Case
) -> dict[str, Any]:
    """The row of a case whose worker died: `oom` when the kernel's OOM killer ended it
    (its kill count went up, or, where that count cannot be read, a SIGKILL we did not
    send), else `crashed`."""
    killed = exitcode == -signal.SIGKILL
    counted = kills_before is not None and kills_after is not None
    if killed and (kills_after > kills_before if counted else True):  # type: ignore[operator]
        how = "the kernel's OOM killer ended it" if counted else "SIGKILL: likely the OOM killer"
        return {
            "status": "oom",
            "error": f"worker process killed (exit code {exitcode}: {how}); the case needs at "
            f"least {estimate_case(case).describe()}",
        }
    return {"status": "crashed", "error": f"worker process died (exit code {exitcode})"}


def _worker_main(
    conn: Any,
    plan: TimingPlan,
    plugins: tuple[str, ...],
    gpu: int | None = None,
    profile: ProfileOptions = NO_PROFILE,
    threads: int = 1,
) -> None:
    if gpu is not None:
        # Before anything initialises CUDA: this process sees only that GPU, as cuda:0.
        from moebench.devices import physical_index

        os.environ["CUDA_VISIBLE_DEVICES"] = str(physical_index(gpu))
    # Ctrl-C reaches the whole process group: the parent decides (it stops this worker),
    # so the worker neither prints a traceback nor dies mid-row on its own.
    ignore_ctrl_c()
    try:
        _serve(conn, plan, plugins, profile, threads)
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the parent is gone (killed, or interrupted): nothing left to answer


def _serve(
    conn: Any, plan: TimingPlan, plugins: tuple[str, ...], profile: ProfileOptions, threads: int
) -> None:
    executor = InProcessExecutor(plan, plugins, profile, threads)
    registry.load_all()
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message[0] == "stop":
            return
        if message[0] == "ceilings":
            conn.send(("ceilings", executor.measure_ceilings(*message[1])))
        elif message[0] == "set_ceilings":
            executor.ceilings = message[1]
        elif message[0] == "case":
            conn.send(("row", executor.run(message[1], message[2])))


@dataclass
class RunOutcome:
    """What a run left on disk and in memory."""

    run_id: str
    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    interrupted: bool = False
    interrupted_by: str | None = None  # "Ctrl-C", "SIGTERM" or "SIGHUP"
    results_path: Path | None = None
    # Why the run stopped before its last case: its results could not be written (a full
    # disk); the cases written before are kept, and a resume finishes the run.
    write_failure: str | None = None


def run_cases(
    cases: list[Case],
    *,
    suite_name: str,
    plan: TimingPlan,
    timeout_s: float,
    out_root: Path | str = "results",
    resume: str | None = None,
    isolate: bool = True,
    plugins: tuple[str, ...] = (),
    meta: dict[str, Any] | None = None,
    progress: Any = None,
    nproc: int | None = None,
    gpus: list[int] | None = None,
    profile: ProfileOptions = NO_PROFILE,
    threads: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Run `cases` into a new run folder (or finish run `resume`), one part per case.

    progress: an object with `start(total)`, `begin(case)`, `advance(case, row)` and
    `stop()` (the CLI passes a rich progress bar), or None.
    nproc: ranks for the multi-rank and expert-parallel cases (moebench.distributed); None:
    the largest world_size among them.
    gpus: with two or more, single-device cases run concurrently, one worker pinned to
    each of these GPUs (moebench.pool); multi-rank cases run after them.
    profile: the profiler pass (traces/, kernels.parquet) and NVTX ranges of the
    single-device cases (moebench.measure.profile).
    threads: intra-op threads of CPU cases (tiny ones use 1: `case_threads`); None: the
    physical cores this process may use. Recorded in run.json (`cpu_threads`) with the
    machine's load at the start and end (`load_start`, `load_end`).
    warn: told about what is repaired on the way (unreadable parts, stale temporaries).
    `plan` is recorded in run.json (`timing`), and a resume must time as the run did.
    Raises StoreError when the run folder cannot be made, or `resume` cannot be resumed
    with `cases` and `plan` (another suite, another timing, a run in use, an unreadable
    run.json).
    """
    from moebench.env import collect_environment, machine_load, physical_cores

    threads = threads or physical_cores()

    out_root = Path(out_root)
    if resume:
        store, done, meta_all = open_for_resume(
            out_root, resume, cases, suite_name, warn, asdict(plan)
        )
        meta_all.setdefault("resumed_at", []).append(datetime.now(UTC).isoformat())
    else:
        store = ResultStore.create(out_root, new_run_id(suite_name))
        store.lock()
        store.write_cases([(case.case_id, case.label()) for case in cases])
        done = set()
        meta_all = {
            "run_id": store.run_id,
            "suite": suite_name,
            "started_at": datetime.now(UTC).isoformat(),
            "environment": collect_environment(plugins),
            "timing": asdict(plan),
            **(meta or {}),
        }
    todo = [c for c in cases if c.case_id not in done]
    outcome = RunOutcome(store.run_id, store.run_dir, skipped=len(cases) - len(todo))
    meta_all["cases_total"] = len(cases)
    meta_all["cpu_threads"] = threads
    meta_all.setdefault("load_start", machine_load())
    store.write_meta(meta_all)

    try:
        single_gpu = gpus[0] if gpus is not None and len(gpus) == 1 else None
        executor = (
            IsolatedExecutor(plan, plugins, gpu=single_gpu, profile=profile, threads=threads)
            if isolate
            else InProcessExecutor(plan, plugins, profile, threads)
        )
        # Multi-rank and expert-parallel cases run on ranks of moebench.distributed (started
        # on first use, or torchrun's); every other case on the executor.
        from moebench.distributed import make_launcher

        ranks = make_launcher(plan, plugins, nproc, todo)
    except BaseException:
        store.unlock()
        raise
    if progress is not None:
        progress.start(len(todo))
    try:
        if "ceilings" in meta_all:
            executor.ceilings = meta_all["ceilings"]
        elif todo:
            devices = sorted({c.device for c in todo})
            dtypes = sorted({c.dtype for c in todo})
            meta_all["ceilings"] = executor.measure_ceilings(devices[0], dtypes)
            store.write_meta(meta_all)

        def run_one(case: Case, runner: Any, gpu: int | None) -> dict[str, Any]:
            row = base_row(case, store.run_id, suite_name)
            started = time.perf_counter()
            measured = runner.run(case, timeout_s)
            save_profile(store, case.case_id, measured)
            row.update(measured)
            row["wall_s"] = time.perf_counter() - started
            row.setdefault("family", _family(case.impl))
            row.setdefault("exact", _exact(case.impl))
            if gpu is not None:
                from moebench.devices import physical_index

                row["gpu_index"] = physical_index(gpu)
            return row

        def emit(case: Case, row: dict[str, Any]) -> None:
            store.write_row(row)
            outcome.rows.append(row)
            if progress is not None:
                progress.advance(case, row)

        sequential = todo
        if gpus is not None and len(gpus) > 1:
            from moebench.pool import run_on_gpus

            pooled = [c for c in todo if not ranks.handles(c)]
            sequential = [c for c in todo if ranks.handles(c)]

            def pinned(gpu: int) -> IsolatedExecutor:
                worker = IsolatedExecutor(plan, plugins, gpu=gpu, profile=profile, threads=threads)
                worker.ceilings = meta_all.get("ceilings")
                return worker

            if run_on_gpus(pooled, gpus, pinned, run_one, emit):
                raise KeyboardInterrupt
        for case in sequential:
            if progress is not None:
                progress.begin(case)
            runner = ranks if ranks.handles(case) else executor
            emit(case, run_one(case, runner, None))
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (moebench.interrupt)
        outcome.interrupted = True
        outcome.interrupted_by = interrupt_name(exc)
    except StoreError as exc:  # a case's row could not be written: stop, keep the rest
        outcome.write_failure = str(exc)
    finally:
        ranks.close()
        executor.close()
        if progress is not None:
            progress.stop()
        meta_all["finished_at"] = datetime.now(UTC).isoformat()
        meta_all["load_end"] = machine_load()
        meta_all["interrupted"] = outcome.interrupted
        try:
            store.write_meta(meta_all)
            outcome.results_path = store.consolidate(warn)
        except StoreError as exc:  # the parts written are the results: a resume joins them
            outcome.write_failure = outcome.write_failure or str(exc)
        finally:
            store.unlock()
    return outcome


def _family(impl: str) -> str | None:
    try:
        return registry.get(impl).family
    except registry.RegistryError:
        return None


def _exact(impl: str) -> bool | None:
    try:
        return registry.get(impl).exact
    except registry.RegistryError:
        return None
