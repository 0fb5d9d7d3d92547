"""One rank's process: it joins the process group through a TCPStore, then measures the
cases its parent sends over a pipe, until told to stop.

Messages in: ("case", case, plan) or ("stop",). Replies: ("ready", None) once joined;
per case ("row", row) from rank 0, ("done", None) from the group's other ranks, ("idle",
None) from ranks outside the case's group (a case of world size 2 in a world of 4), or
("error" | "oom" | "peer-error", "rank R: what went wrong"), peer-error being an error
raised inside torch.distributed (most often the echo of a peer's failure). A rank that
raises goes on serving, but its peers may be stuck in a collective: the parent kills the
whole set after any failure.

The process is started by `moebench.distributed.launcher` (forkserver: moebench and torch
are imported once, so a rank starts in a fraction of a second).
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moebench import registry
from moebench.distributed.group import backend_for, rank_device
from moebench.distributed.measure import measure_on_rank
from moebench.interrupt import ignore_ctrl_c
from moebench.measure.timing import TimingPlan

JOIN_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class RankSpec:
    """What one rank process needs to join its group."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    store_host: str
    store_port: int
    store_prefix: str  # a fresh prefix per set of ranks, so stale keys are never read
    device_type: str  # "cpu" (gloo) or "cuda" (NCCL)
    timeout_s: float  # of every collective (init_process_group's timeout)
    plugins: tuple[str, ...] = ()


def describe(exc: BaseException) -> str:
    """`Type: message (at file:line)` of the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _cpu_threads(local_world_size: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // local_world_size)


def join_group(spec: RankSpec) -> torch.device:
    """Import the plugins, pick the device, join the process group; returns the device."""
    from moebench.plugins import import_plugin

    for plugin in spec.plugins:
        import_plugin(plugin)
    registry.load_all()
    os.environ.update(MASTER_ADDR=spec.store_host, MASTER_PORT=str(spec.store_port))
    device = rank_device(spec.device_type, spec.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the machine's cores shared among its ranks, as torchrun's OMP_NUM_THREADS does
        torch.set_num_threads(_cpu_threads(spec.local_world_size))
    store = dist.TCPStore(
        spec.store_host,
        spec.store_port,
        is_master=False,
        timeout=timedelta(seconds=JOIN_TIMEOUT_S),
    )
    extra: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend_for(spec.device_type),
        store=dist.PrefixStore(spec.store_prefix, store),
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=timedelta(seconds=spec.timeout_s),
        **extra,
    )
    return device


def rank_main(spec: RankSpec, conn: Connection) -> None:
    """Entry point of a rank process."""
    ignore_ctrl_c()  # the run stops its ranks itself (`LocalRanks.kill`)
    try:
        _serve(spec, conn)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return  # the run is gone (interrupted, killed): nothing left to answer


def _serve(spec: RankSpec, conn: Connection) -> None:
    try:
        device = join_group(spec)
    except Exception as exc:
        conn.send(("error", f"rank {spec.rank} could not join the group: {describe(exc)}"))
        return
    conn.send(("ready", None))
    groups: dict[int, dist.ProcessGroup] = {}
    while True:
        message = conn.recv()
        if message[0] == "stop":
            break
        _, case, plan = message
        conn.send(_run_case(spec, case, plan, groups, device))
    dist.destroy_process_group()


def _group_for(world_size: int, spec: RankSpec, groups: dict[int, dist.ProcessGroup]):
    """The group of ranks 0 .. world_size-1 (created once, by every rank of the world)."""
    if world_size not in groups:
        if world_size == spec.world_size:
            assert dist.group.WORLD is not None
            groups[world_size] = dist.group.WORLD
        else:
            groups[world_size] = dist.new_group(list(range(world_size)))
    return groups[world_size]


def _run_case(
    spec: RankSpec,
    case: Any,
    plan: TimingPlan,
    groups: dict[int, dist.ProcessGroup],
    device: torch.device,
) -> tuple[str, Any]:
    try:
        if case.world_size > spec.world_size:
            raise ValueError(f"case needs {case.world_size} ranks, the world has {spec.world_size}")
        group = _group_for(case.world_size, spec, groups)
        if spec.rank >= case.world_size:
            return ("idle", None)
        row = measure_on_rank(case, plan, group, device)
        return ("row", row) if row is not None else ("done", None)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return ("oom", f"rank {spec.rank}: {describe(exc)}")
    except Exception as exc:
        return (_error_kind(exc), f"rank {spec.rank}: {describe(exc)}")


def _error_kind(exc: BaseException) -> str:
    """The reply kind of `exc`: "peer-error" if it was raised inside torch.distributed (a
    collective that broke, most often because a peer raised or died: the launcher then
    looks for that cause), else "error"."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = bool(frames) and f"torch{os.sep}distributed{os.sep}" in frames[-1].filename
    return "peer-error" if inside or isinstance(exc, dist.DistError) else "error"
