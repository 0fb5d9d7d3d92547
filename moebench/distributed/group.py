"""Where a process stands in a distributed run: torchrun's environment, each rank's backend
and device, the process group an expert-parallel layer is built on, and the facts shared
by the launcher and the ranks (which implementations are expert-parallel, which cases
they can run).

A case runs on the first `case.world_size` ranks of the launched world: the whole world,
or a subgroup of it (so a run of 4 ranks also measures the world-size-2 cases, exactly as
`torchrun --nproc-per-node 4` would).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moebench import registry
from moebench.case import Case

EP_FAMILY = "expert-parallel"
"""The registry family of the expert-parallel implementations (moebench.impls.expert_parallel)."""

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnv:
    """The env:// variables torchrun (or any launcher of that convention) sets per rank."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    run_id: str = ""

    @property
    def key_prefix(self) -> str:
        """Prefix of moebench's keys in torchrun's store, unique per job and restart."""
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return f"moebench/{self.run_id or 'job'}/{restart}"


def torchrun_env() -> LaunchEnv | None:
    """This process's place in a torchrun launch, or None when it was not started so."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return LaunchEnv(
        rank=rank,
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", rank)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        master_addr=os.environ["MASTER_ADDR"],
        master_port=int(os.environ["MASTER_PORT"]),
        run_id=os.environ.get("TORCHELASTIC_RUN_ID", ""),
    )


def backend_for(device_type: str) -> str:
    """NCCL between CUDA devices, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """The device of the rank whose index on its machine is `local_rank`."""
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def is_expert_parallel(impl: str) -> bool:
    """True if `impl` is registered in the expert-parallel family."""
    try:
        return registry.get(impl).family == EP_FAMILY
    except registry.RegistryError:
        return False


def ep_problem(num_experts: int, world_size: int) -> str | None:
    """Why `num_experts` experts cannot be sharded over `world_size` ranks, or None."""
    if world_size < 1:
        return f"world_size must be >= 1, got {world_size}"
    if num_experts % world_size:
        return (
            f"num_experts={num_experts} is not divisible by world_size={world_size}: each "
            f"rank holds num_experts / world_size experts; pick a world size among "
            f"{[w for w in range(1, num_experts + 1) if num_experts % w == 0]}"
        )
    return None


def case_problem(case: Case) -> str | None:
    """Why `case` cannot run on ranks (checked by the launcher before it starts any)."""
    if not is_expert_parallel(case.impl):
        ep = sorted(n for n, info in registry.available().items() if info.family == EP_FAMILY)
        return (
            f"impl {case.impl!r} runs on one device, but world_size={case.world_size}; "
            f"multi-rank cases need an expert-parallel impl ({', '.join(ep) or 'none registered'})"
        )
    if case.workload.mode != "forward":
        return f"mode={case.workload.mode!r}: expert-parallel cases time the forward only"
    if case.workload.layers != 1:
        return (
            f"layers={case.workload.layers}: expert-parallel cases measure one layer "
            "(stacks run on one device)"
        )
    return ep_problem(case.shape.num_experts, case.world_size)


def token_bounds(tokens: int, world_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each rank's slice of the batch: contiguous, sizes differing by at
    most one (the first `tokens % world_size` ranks take one more), like data parallel."""
    base, extra = divmod(tokens, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        stop = start + base + (1 if rank < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


_current_group: dist.ProcessGroup | None = None


@contextmanager
def use_group(group: dist.ProcessGroup) -> Iterator[None]:
    """Within the block, expert-parallel layers are built on `group`."""
    global _current_group
    previous, _current_group = _current_group, group
    try:
        yield
    finally:
        _current_group = previous


def current_group() -> dist.ProcessGroup:
    """The group set by `use_group`, else the default (world) group; an error saying how
    to launch ranks when there is no process group at all."""
    if _current_group is not None:
        return _current_group
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "expert-parallel layers need an initialised torch.distributed process group: run "
            "them through `moebench run` (which starts the ranks: --nproc N) or `torchrun "
            "-m moebench run`, or call torch.distributed.init_process_group() first"
        )
    assert dist.group.WORLD is not None
    return dist.group.WORLD
