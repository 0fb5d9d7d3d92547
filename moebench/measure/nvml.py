"""NVML (nvidia-ml-py): device memory in use and the energy counter, where it answers.

Every function returns None rather than raising when NVML, the driver or the counter is
absent, so a run on a CPU or on a GPU without energy counters simply gets null columns.
"""

from __future__ import annotations

from typing import Any

_handles: dict[int, Any] = {}
_failed = False


def _handle(index: int) -> Any | None:
    """NVML's handle of torch's `cuda:index` (through CUDA_VISIBLE_DEVICES: a worker
    pinned to GPU 3 sees it as cuda:0, NVML as GPU 3)."""
    global _failed
    if _failed:
        return None
    if index not in _handles:
        try:
            import pynvml

            from moebench.devices import physical_index

            pynvml.nvmlInit()
            physical = physical_index(index)
            _handles[index] = (
                pynvml.nvmlDeviceGetHandleByIndex(physical)
                if isinstance(physical, int)
                else pynvml.nvmlDeviceGetHandleByUUID(physical)
            )
        except Exception:  # no library, no driver, no device: all mean "no NVML"
            _failed = True
            return None
    return _handles[index]


def energy_mj(index: int) -> int | None:
    """Total energy the GPU used since the driver loaded, in millijoules."""
    handle = _handle(index)
    if handle is None:
        return None
    try:
        import pynvml

        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except Exception:
        return None


def memory_used_bytes(index: int) -> int | None:
    """Device memory in use by every process, as the driver sees it."""
    handle = _handle(index)
    if handle is None:
        return None
    try:
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


def compute_processes(index: int) -> list[dict[str, int]] | None:
    """Processes computing on GPU `index`: pid and device memory used (None without NVML)."""
    handle = _handle(index)
    if handle is None:
        return None
    try:
        import pynvml

        running = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return None
    return [{"pid": int(p.pid), "used_bytes": int(p.usedGpuMemory or 0)} for p in running]


def device_info(index: int) -> dict[str, Any]:
    """Name, driver version and total memory of GPU `index` ({} without NVML)."""
    handle = _handle(index)
    if handle is None:
        return {}
    import pynvml

    info: dict[str, Any] = {}
    for key, call in (
        ("nvml_name", lambda: pynvml.nvmlDeviceGetName(handle)),
        ("driver", pynvml.nvmlSystemGetDriverVersion),
        ("total_mem_bytes", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).total),
        ("energy_counter", lambda: energy_mj(index) is not None),
    ):
        try:
            value = call()
            info[key] = value.decode() if isinstance(value, bytes) else value
        except Exception:
            info[key] = None
    return info
