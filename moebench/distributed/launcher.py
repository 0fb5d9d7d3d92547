"""Starting the ranks, handing them cases, and never letting one hang the sweep.

Two ways in, one set of rank processes (`worker.rank_main`) and the same results:

- `moebench run SUITE [--nproc N]`: `SpawnLauncher`. The runner hands it every case with
  world_size > 1 or an expert-parallel impl. It starts N rank processes on this machine
  (N = --nproc, else the largest world_size among the suite's expert-parallel cases; on
  CUDA at most the visible devices, rank r on cuda:r), which join one group (gloo on CPU,
  NCCL on CUDA) through a TCPStore this process hosts on 127.0.0.1 and a free port the OS
  picks (no port race). The ranks are kept for the next case; a case of world size W runs
  on ranks 0 .. W-1.
- `torchrun --nproc-per-node N -m moebench run SUITE` (or --nnodes/--rdzv-*): every torchrun
  worker runs the CLI. Rank 0 runs the sweep and writes the results (`TorchrunLeader`);
  the others only compute (`follow`). Each worker starts its rank as a child process, all
  of them joining one group through torchrun's own store (MASTER_ADDR:MASTER_PORT), and
  rank 0 sends each case to the others through that store.

Timeouts and failures: a case's ranks must all answer within the suite's per-case timeout
(the collectives themselves time out at the same figure). When a rank raises, dies or does
not answer in time, the case's row gets status error / oom / crashed / timeout with that
rank's message, every rank process is killed, and fresh ones (in a fresh group: a new store
prefix) serve the next case. Under torchrun the workers themselves stay up, so the sweep
goes on there too. Starting ranks has its own allowance (START_TIMEOUT_S).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist

from moebench.case import Case
from moebench.distributed.group import (
    LaunchEnv,
    case_problem,
    is_expert_parallel,
    torchrun_env,
)
from moebench.distributed.worker import RankSpec, rank_main
from moebench.interrupt import ctrl_c_held
from moebench.measure.timing import TimingPlan

START_TIMEOUT_S = 180.0
"""Allowance for starting a set of ranks (processes up, group joined), on top of a case's."""
GRACE_S = 10.0
"""Under torchrun: how much longer rank 0 waits for the others' answers than for its own."""
FAILURE_GRACE_S = 2.0
"""After a failure that may be the echo of another rank's, how long to wait for the cause."""
POLL_S = 0.1


@dataclass(frozen=True)
class Failure:
    """Why a case has no row from its ranks: a status of the results table and a message."""

    status: str
    error: str
    primary: bool = True  # False: maybe only the echo of another rank's failure

    def row(self) -> dict[str, Any]:
        return {"status": self.status, "error": self.error}


def root_cause(failures: list[Failure]) -> Failure:
    """The first failure that is not the echo of another (a collective that failed because
    a peer raised or died; a timeout), else the first one."""
    return next((f for f in failures if f.primary), failures[0])


def _context() -> Any:
    """forkserver with the rank code preloaded (torch is imported once, so a set of ranks
    starts in a fraction of a second); spawn where there is no forkserver."""
    if "forkserver" in mp.get_all_start_methods():
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["moebench.distributed.worker"])
        return context
    return mp.get_context("spawn")


class LocalRanks:
    """Rank processes started by this process: all the ranks of a `moebench run`, or this
    worker's one rank under torchrun. Killed together."""

    def __init__(self, specs: list[RankSpec]):
        context = _context()
        self.ranks = [spec.rank for spec in specs]
        self.processes: list[Any] = []
        self.conns: list[Any] = []
        try:
            for spec in specs:
                parent, child = context.Pipe()
                process = context.Process(
                    target=rank_main,
                    args=(spec, child),
                    daemon=True,
                    name=f"moebench-rank-{spec.rank}",
                )
                # It ignores Ctrl-C from its first instruction; one pressed meanwhile is
                # raised here once it is listed, so `kill` finds it.
                with ctrl_c_held():
                    process.start()
                    self.processes.append(process)
                    self.conns.append(parent)
                child.close()
        except KeyboardInterrupt:  # the ranks started so far would wait for their peers
            self.kill()
            raise

    def send(self, message: tuple[Any, ...]) -> None:
        """Send `message` to every rank (a dead one is reported by the next `gather`)."""
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(message)

    def gather(
        self,
        deadline: float,
        timeout_s: float,
        abort: Callable[[], Failure | None] | None = None,
    ) -> dict[int, tuple[str, Any]] | Failure:
        """One reply per rank, or the root cause of a failure: a rank's error, a dead
        process, the deadline (time.monotonic()) passed, or `abort()` returning a Failure
        (polled). An error raised inside a collective is often the echo of a peer's failure,
        so after one the others get FAILURE_GRACE_S to report the cause. Interrupted, it
        ends the ranks first: they ignore Ctrl-C, and would finish their case."""
        try:
            return self._gather(deadline, timeout_s, abort)
        except KeyboardInterrupt:
            self.kill()
            raise

    def _gather(
        self,
        deadline: float,
        timeout_s: float,
        abort: Callable[[], Failure | None] | None,
    ) -> dict[int, tuple[str, Any]] | Failure:
        pending = {rank: i for i, rank in enumerate(self.ranks)}
        replies: dict[int, tuple[str, Any]] = {}
        failures: list[Failure] = []
        settle_by = math.inf
        while pending:
            now = time.monotonic()
            if failures and (any(f.primary for f in failures) or now >= settle_by):
                return root_cause(failures)
            if now >= deadline:
                failures.append(
                    Failure(
                        "timeout",
                        f"no result within the {timeout_s:g} s timeout (rank(s) "
                        f"{', '.join(map(str, sorted(pending)))} did not answer)",
                        primary=False,
                    )
                )
                return root_cause(failures)
            waitables = [self.conns[i] for i in pending.values()]
            waitables += [self.processes[i].sentinel for i in pending.values()]
            polling = abort is not None or failures
            timeout = min(deadline, settle_by) - now
            ready = wait(waitables, timeout=min(timeout, POLL_S) if polling else timeout)
            for rank, i in list(pending.items()):
                conn, process = self.conns[i], self.processes[i]
                if conn in ready:
                    try:
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        failures.append(self._died(rank, process))
                        del pending[rank]
                        continue
                    if kind in ("error", "oom"):
                        failures.append(Failure(kind, payload))
                    elif kind == "peer-error":
                        failures.append(Failure("error", payload, primary=False))
                    else:
                        replies[rank] = (kind, payload)
                    del pending[rank]
                elif process.sentinel in ready:
                    failures.append(self._died(rank, process))
                    del pending[rank]
            if abort is not None and (failure := abort()) is not None:
                failures.append(failure)
            if failures and settle_by == math.inf:
                settle_by = time.monotonic() + FAILURE_GRACE_S
        return root_cause(failures) if failures else replies

    @staticmethod
    def _died(rank: int, process: Any) -> Failure:
        process.join(timeout=5)
        return Failure("crashed", f"rank {rank}'s process died (exit code {process.exitcode})")

    def kill(self) -> None:
        """End every rank process now (each by its own handle)."""
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(timeout=10)
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []

    def stop(self) -> None:
        """Ask the ranks to leave their group and exit; kill those that do not."""
        try:
            self.send(("stop",))
            for process in self.processes:
                process.join(timeout=10)
        except (OSError, ValueError):
            pass
        self.kill()


def _skip(message: str) -> dict[str, Any]:
    return {"status": "skipped", "error": message}


def _precheck(case: Case, ranks: int, ranks_source: str) -> dict[str, Any] | None:
    """A row for a case the ranks cannot run (bad configuration: error; not enough ranks or
    devices here: skipped), or None."""
    problem = case_problem(case)
    if problem is not None:
        return {"status": "error", "error": problem}
    if torch.device(case.device).type == "cuda":
        visible = torch.cuda.device_count()
        if case.world_size > visible:
            return _skip(f"needs {case.world_size} CUDA devices, {visible} visible")
    if case.world_size > ranks:
        return _skip(f"needs {case.world_size} ranks, {ranks_source} started {ranks}")
    return None


def handles(case: Case) -> bool:
    """True for the cases the ranks run: world_size > 1 or an expert-parallel impl."""
    return case.world_size > 1 or is_expert_parallel(case.impl)


class SpawnLauncher:
    """`moebench run`: the ranks are processes of this machine, started and killed here."""

    def __init__(
        self, plan: TimingPlan, plugins: tuple[str, ...], nproc: int | None, cases: list[Case]
    ):
        self.plan = plan
        self.plugins = plugins
        self.nproc = nproc
        self.world_size = nproc or max((c.world_size for c in cases if handles(c)), default=1)
        self._store: dist.TCPStore | None = None
        self._ranks: LocalRanks | None = None
        self._key: tuple[str, int] | None = None
        self._generation = 0

    handles = staticmethod(handles)

    def run(self, case: Case, timeout_s: float) -> dict[str, Any]:
        """The row of `case` from rank 0, or a Failure's status and message."""
        source = f"--nproc {self.nproc}" if self.nproc else "this run (the suite's largest)"
        skipped = _precheck(case, self.world_size, source)
        if skipped is not None:
            return skipped
        device_type = torch.device(case.device).type
        world = self.world_size
        if device_type == "cuda":
            world = min(world, torch.cuda.device_count())
        if self._ranks is None or self._key != (device_type, world):
            self.close()
            failure = self._start(device_type, world, timeout_s)
            if failure is not None:
                return failure.row()
        assert self._ranks is not None
        self._ranks.send(("case", case, self.plan))
        replies = self._ranks.gather(time.monotonic() + timeout_s, timeout_s)
        if isinstance(replies, Failure):
            self._kill()
            return replies.row()
        kind, row = replies[0]
        return row if kind == "row" else Failure("error", f"rank 0 answered {kind!r}").row()

    def _start(self, device_type: str, world: int, timeout_s: float) -> Failure | None:
        if self._store is None:
            self._store = dist.TCPStore(
                "127.0.0.1",
                0,
                is_master=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=START_TIMEOUT_S),
            )
        self._generation += 1
        specs = [
            RankSpec(
                rank=rank,
                world_size=world,
                local_rank=rank,
                local_world_size=world,
                store_host="127.0.0.1",
                store_port=self._store.port,
                store_prefix=f"moebench/pg/{self._generation}",
                device_type=device_type,
                timeout_s=timeout_s,
                plugins=self.plugins,
            )
            for rank in range(world)
        ]
        self._ranks = LocalRanks(specs)
        self._key = (device_type, world)
        ready = self._ranks.gather(time.monotonic() + START_TIMEOUT_S, START_TIMEOUT_S)
        if isinstance(ready, Failure):
            self._kill()
            return Failure(ready.status, f"ranks did not start: {ready.error}")
        return None

    def _kill(self) -> None:
        if self._ranks is not None:
            self._ranks.kill()
        self._ranks, self._key = None, None

    def close(self) -> None:
        if self._ranks is not None:
            self._ranks.stop()
        self._ranks, self._key = None, None


# ------------------------------------------------------------------------------ torchrun


def _control_store(env: LaunchEnv) -> dist.TCPStore:
    """A client of torchrun's store (hosted by its agent), or, for a launcher that only
    sets the env:// variables, the store rank 0 hosts at MASTER_ADDR:MASTER_PORT."""
    import os

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return dist.TCPStore(
        env.master_addr,
        env.master_port,
        is_master=env.rank == 0 and not agent_store,
        wait_for_workers=False,
        timeout=timedelta(seconds=START_TIMEOUT_S),
    )


def _load(store: dist.TCPStore, key: str) -> Any:
    return pickle.loads(store.get(key))


class _TorchrunRank:
    """This worker's one rank process, restarted whenever the group changes generation."""

    def __init__(self, env: LaunchEnv, plugins: tuple[str, ...]):
        self.env = env
        self.plugins = plugins
        self.ranks: LocalRanks | None = None
        self.generation = -1

    def run(
        self,
        message: tuple[Any, ...],
        abort: Callable[[], Failure | None],
    ) -> tuple[str, Any] | Failure:
        """Run one case message ("case", case, plan, timeout_s, generation): this rank's
        reply, or a Failure."""
        _, case, plan, timeout_s, generation = message
        device_type = torch.device(case.device).type
        if self.ranks is None or self.generation != generation:
            self.kill()
            spec = RankSpec(
                rank=self.env.rank,
                world_size=self.env.world_size,
                local_rank=self.env.local_rank,
                local_world_size=self.env.local_world_size,
                store_host=self.env.master_addr,
                store_port=self.env.master_port,
                store_prefix=f"{self.env.key_prefix}/pg/{generation}/{device_type}",
                device_type=device_type,
                timeout_s=timeout_s,
                plugins=self.plugins,
            )
            self.ranks, self.generation = LocalRanks([spec]), generation
            ready = self.ranks.gather(time.monotonic() + START_TIMEOUT_S, START_TIMEOUT_S, abort)
            if isinstance(ready, Failure):
                return ready
        assert self.ranks is not None
        self.ranks.send(("case", case, plan))
        replies = self.ranks.gather(time.monotonic() + timeout_s, timeout_s, abort)
        return replies if isinstance(replies, Failure) else replies[self.env.rank]

    def kill(self) -> None:
        if self.ranks is not None:
            self.ranks.kill()
        self.ranks = None

    def stop(self) -> None:
        if self.ranks is not None:
            self.ranks.stop()
        self.ranks = None


class TorchrunLeader:
    """Rank 0 under torchrun: sends each case to the other workers through torchrun's
    store, runs its own rank, and gathers the others' outcomes."""

    def __init__(self, plan: TimingPlan, plugins: tuple[str, ...], env: LaunchEnv):
        self.plan = plan
        self.env = env
        self.store = _control_store(env)
        self.rank = _TorchrunRank(env, plugins)
        self.seq = 0
        self.generation = 0
        self.device_type: str | None = None

    handles = staticmethod(handles)

    def _key(self, *parts: object) -> str:
        return "/".join([self.env.key_prefix, *map(str, parts)])

    def _reports(self, seq: int, answered: dict[int, tuple[Any, ...]]) -> Failure | None:
        """Read the other workers' new reports of case `seq` into `answered`; the first new
        failure among them, or None."""
        found = None
        for rank in range(1, self.env.world_size):
            key = self._key("res", seq, rank)
            if rank not in answered and self.store.check([key]):
                answered[rank] = _load(self.store, key)
                if answered[rank][0] != "ok" and found is None:
                    found = Failure(*answered[rank])
        return found

    def run(self, case: Case, timeout_s: float) -> dict[str, Any]:
        """The row of `case`, measured by every worker's rank."""
        skipped = _precheck(case, self.env.world_size, "torchrun")
        if skipped is not None:
            return skipped
        device_type = torch.device(case.device).type
        if device_type == "cuda" and torch.cuda.device_count() < self.env.local_world_size:
            return _skip(
                f"needs {self.env.local_world_size} CUDA devices per node, "
                f"{torch.cuda.device_count()} visible"
            )
        if device_type != self.device_type:  # a new backend: a new group
            self.generation += 1
            self.device_type = device_type
        self.seq += 1
        seq = self.seq
        message = ("case", case, self.plan, timeout_s, self.generation)
        self.store.set(self._key("ctl", seq), pickle.dumps(message))
        answered: dict[int, tuple[Any, ...]] = {}
        starting = self.rank.ranks is None or self.rank.generation != self.generation
        deadline = time.monotonic() + timeout_s + GRACE_S + (START_TIMEOUT_S if starting else 0)
        outcome = self.rank.run(message, lambda: self._reports(seq, answered))
        # The others' reports: all of them, or until the deadline; once anything failed,
        # only FAILURE_GRACE_S more (for the cause, or the others' view of a timeout).
        settle_by = deadline
        while len(answered) < self.env.world_size - 1 and time.monotonic() < settle_by:
            reported = self._reports(seq, answered)
            if (isinstance(outcome, Failure) or reported is not None) and settle_by == deadline:
                settle_by = min(deadline, time.monotonic() + FAILURE_GRACE_S)
            time.sleep(POLL_S)
        failures = [outcome] if isinstance(outcome, Failure) else []
        failures += [Failure(*report) for report in answered.values() if report[0] != "ok"]
        silent = [
            r
            for r in range(1, self.env.world_size)
            if answered.get(r, ("timeout",))[0] == "timeout"
        ]
        if silent:  # one message naming every rank that did not answer in time
            mine = [0] if isinstance(outcome, Failure) and outcome.status == "timeout" else []
            failures = [f for f in failures if f.status != "timeout"] + [
                Failure(
                    "timeout",
                    f"no result within the {timeout_s:g} s timeout (rank(s) "
                    f"{', '.join(map(str, mine + silent))} did not answer)",
                    primary=False,
                )
            ]
        self.store.set(self._key("end", seq), b"abort" if failures else b"ok")
        if failures:
            self.rank.kill()
            self.generation += 1
            return root_cause(failures).row()
        kind, row = outcome
        return row if kind == "row" else Failure("error", f"rank 0 answered {kind!r}").row()

    def close(self) -> None:
        self.store.set(self._key("ctl", self.seq + 1), pickle.dumps(("stop",)))
        self.rank.stop()


def follow(plugins: tuple[str, ...]) -> int:
    """A torchrun worker other than rank 0: run each case rank 0 sends, report, repeat
    until rank 0 says stop. Writes nothing. Returns the process exit code."""
    env = torchrun_env()
    if env is None:
        raise RuntimeError("follow() is for the workers of a torchrun launch")
    store = _control_store(env)
    rank = _TorchrunRank(env, plugins)

    def key(*parts: object) -> str:
        return "/".join([env.key_prefix, *map(str, parts)])

    seq = 0
    try:
        while True:
            seq += 1
            message = _wait_load(store, key("ctl", seq))
            if message[0] == "stop":
                return 0
            end_key = key("end", seq)

            def aborted(end_key: str = end_key) -> Failure | None:
                if store.check([end_key]) and store.get(end_key) == b"abort":
                    return Failure("error", "rank 0 ended the case", primary=False)
                return None

            outcome = rank.run(message, aborted)
            report = (
                ("ok", None)
                if not isinstance(outcome, Failure)
                else (outcome.status, outcome.error, outcome.primary)
            )
            store.set(key("res", seq, env.rank), pickle.dumps(report))
            if _wait_load(store, end_key, raw=True) != b"ok" or isinstance(outcome, Failure):
                rank.kill()
    finally:
        rank.stop()


def _wait_load(store: dist.TCPStore, key: str, raw: bool = False) -> Any:
    """The value at `key`, waiting as long as it takes (rank 0 may run single-device cases
    for hours meanwhile); torchrun ends this worker if rank 0 fails."""
    while True:
        try:
            store.wait([key], timedelta(seconds=60))
            break
        except dist.DistStoreError:
            continue
    value = store.get(key)
    return value if raw else pickle.loads(value)


# ------------------------------------------------------------------------------ entry


def make_launcher(
    plan: TimingPlan, plugins: tuple[str, ...], nproc: int | None, cases: list[Case]
) -> SpawnLauncher | TorchrunLeader:
    """The launcher of this process: rank 0's under torchrun, else one that starts ranks."""
    env = torchrun_env()
    if env is not None:
        return TorchrunLeader(plan, plugins, env)
    return SpawnLauncher(plan, plugins, nproc, cases)


def is_follower() -> bool:
    """True in a torchrun worker other than rank 0 (it computes; rank 0 writes results)."""
    env = torchrun_env()
    return env is not None and env.rank != 0


def nproc_problem(nproc: int | None) -> str | None:
    """What is wrong with `--nproc nproc` here, or None."""
    if nproc is None:
        return None
    if nproc < 1:
        return f"--nproc must be >= 1, got {nproc}"
    env = torchrun_env()
    if env is not None and nproc != env.world_size:
        return (
            f"--nproc {nproc} under torchrun, whose world has {env.world_size} ranks: leave "
            "--nproc out (torchrun's --nproc-per-node and --nnodes set the ranks)"
        )
    return None
