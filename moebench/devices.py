"""Which GPUs a run may use: `--devices cuda:0,cuda:2` or `--devices all`, and the mapping
from the index a process sees to the physical GPU (NVML counts physical GPUs and ignores
CUDA_VISIBLE_DEVICES, torch counts the visible ones)."""

from __future__ import annotations

import os


class DevicesError(ValueError):
    """A --devices value that names no usable GPU; the message names the bad entry."""


def visible_gpu_count() -> int:
    """GPUs torch can see in this process (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(spec: str, available: int | None = None) -> list[int]:
    """GPU indices (as this process numbers them) from `all` or `cuda:0,cuda:1` (`0,1`
    is accepted too), in the order given, each once."""
    available = visible_gpu_count() if available is None else available
    if available == 0:
        raise DevicesError(f"--devices {spec!r}: no CUDA device is visible to this process")
    if spec.strip() == "all":
        return list(range(available))
    indices: list[int] = []
    for entry in (part.strip() for part in spec.split(",")):
        number = entry.removeprefix("cuda:")
        if not number.isdigit():
            raise DevicesError(
                f"--devices: {entry!r} is not a GPU; use 'all' or a list like cuda:0,cuda:1"
            )
        index = int(number)
        if index >= available:
            raise DevicesError(
                f"--devices: {entry!r} does not exist; this process sees {available} GPU(s), "
                f"cuda:0 to cuda:{available - 1}"
            )
        if index in indices:
            raise DevicesError(f"--devices: {entry!r} is named twice")
        indices.append(index)
    return indices


def physical_index(index: int) -> int | str:
    """The physical GPU behind torch's `cuda:index`: CUDA_VISIBLE_DEVICES renumbers the
    GPUs a process sees; NVML does not. A UUID entry ("GPU-...") is returned as such."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index >= len(entries):
        return index
    entry = entries[index]
    return int(entry) if entry.isdigit() else entry
