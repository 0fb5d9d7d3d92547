"""Peak memory of one call.

CUDA: the caching allocator's peak is reset before the call and read after it (exact
for tensors torch allocates). CPU, best effort: Linux's peak resident set size (VmHWM) is
reset through /proc/self/clear_refs and read after the call; the growth over the resident
size before the call is reported as the activation peak. The allocator reuses freed
pages, so this can under-count; where /proc is missing the result is None.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def peak_during(fn: Callable[[], object], device: torch.device) -> tuple[int | None, int | None]:
    """(peak bytes held during `fn`, bytes added over what was held before), or Nones."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak, peak - before
    return _cpu_peak(fn)


def _read_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_peak(fn: Callable[[], object]) -> tuple[int | None, int | None]:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        fn()
        return None, None
    before = _read_status_kib("VmRSS")
    fn()
    peak = _read_status_kib("VmHWM")
    if before is None or peak is None:
        return None, None
    return peak * 1024, max(0, peak - before) * 1024
