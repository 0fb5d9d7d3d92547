"""Will a case fit? The least memory it needs, against what the device has free.

The estimate is a floor, not a forecast: every term is memory the case cannot run
without, so a case refused here could never have run, and a case let through may still
run out (the runner then records `oom` as it happens). Terms, in bytes, for `layers`
MoE layers of E experts, D hidden, F ffn, k experts per token, T tokens, element size s:

- weights: layers x (E + shared) x 3DF x s + the float32 router, D x E x 4
- activations: the input and output (T x D x s each), the routed hidden states
  (2 x T x k x F x s: gate and up), and in train mode the weights' gradients as well
- reference: the float32 input and golden output (2 x T x D x 4), plus, when the case's
  dtype is not float32, a float32 copy of one routed expert and the shared experts
  (the reference upcasts one expert at a time)
- workspace: router logits and probabilities (2 x T x E x 4) and the expert order
  (T x k x 8)

Free memory: CUDA, `torch.cuda.mem_get_info` plus what torch's caching allocator holds
unused; CPU, the smaller of /proc/meminfo's MemAvailable and the cgroup's memory.max
minus memory.current. Where neither can be read, every case fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moebench.case import Case

ELEMENT_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """The least memory one case needs, by what holds it (bytes)."""

    weight_bytes: int
    activation_bytes: int
    reference_bytes: int
    workspace_bytes: int

    @property
    def total_bytes(self) -> int:
        held = self.weight_bytes + self.activation_bytes
        return held + self.reference_bytes + self.workspace_bytes

    def describe(self) -> str:
        return (
            f"{_size(self.total_bytes)} (weights {_size(self.weight_bytes)}, activations "
            f"{_size(self.activation_bytes)}, reference {_size(self.reference_bytes)}, "
            f"workspace {_size(self.workspace_bytes)})"
        )


def estimate_case(case: Case) -> MemoryEstimate:
    """The floor of `case`'s memory on its device (module docstring)."""
    s = ELEMENT_BYTES.get(case.dtype, 4)
    shape, tokens, layers = case.shape, case.tokens, case.workload.layers
    D, F, E, k = shape.hidden, shape.ffn, shape.num_experts, shape.top_k
    expert_elements = (E + shape.shared_experts) * 3 * D * F
    weights = layers * (expert_elements * s + D * E * 4)
    activations = 2 * tokens * D * s + 2 * tokens * k * F * s
    if case.workload.mode == "train":
        activations += weights
    # the reference upcasts one routed expert at a time (and the shared ones) to float32
    upcast_elements = (1 + shape.shared_experts) * 3 * D * F
    reference = 2 * tokens * D * 4 + (0 if s == 4 else upcast_elements * 4)
    workspace = 2 * tokens * E * 4 + tokens * k * 8
    return MemoryEstimate(weights, activations, reference, workspace)


def free_bytes(device: str) -> int | None:
    """Bytes `device` can still give a case, or None where that cannot be read."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        held_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + held_unused)
    limits = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    return min(limits) if limits else None


def fit_problem(case: Case) -> str | None:
    """Why `case` cannot fit on its device, with the estimate; None when it may."""
    estimate = estimate_case(case)
    free = free_bytes(case.device)
    if free is None or estimate.total_bytes <= free:
        return None
    return f"needs at least {estimate.describe()} but {case.device} has {_size(free)} free; not run"


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has ended so far: the host's count
    (/proc/vmstat) plus this cgroup's (memory.events); None where neither is readable."""
    counts = [v for v in (_vmstat_oom_kills(), _cgroup_oom_kills()) if v is not None]
    return sum(counts) if counts else None


def _size(n_bytes: int) -> str:
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _meminfo_available() -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_dir() -> Path | None:
    """This process's cgroup v2 folder, or None (cgroup v1 or none)."""
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    return None


def _cgroup_headroom() -> int | None:
    folder = _cgroup_dir()
    if folder is None:
        return None
    limit, used = _read(folder / "memory.max"), _read(folder / "memory.current")
    if not limit or not used or limit.strip() == "max":
        return None
    try:
        return max(0, int(limit) - int(used))
    except ValueError:
        return None


def _vmstat_oom_kills() -> int | None:
    for line in (_read("/proc/vmstat") or "").splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return None


def _cgroup_oom_kills() -> int | None:
    folder = _cgroup_dir()
    if folder is None:
        return None
    for line in (_read(folder / "memory.events") or "").splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return None
