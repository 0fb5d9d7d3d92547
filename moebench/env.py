"""What the harness sees: host, devices, NVML, library versions, provenance."""

from __future__ import annotations

import importlib
import os
import platform
import socket
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from moebench.measure import nvml
from moebench.measure.timing import L2Flush


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def switch_off(variable: str) -> bool:
    """Whether the environment variable `variable` turns a switch off ("0", "off",
    "false" or "no", any case; unset or anything else: on)."""
    return os.environ.get(variable, "").strip().lower() in ("0", "off", "false", "no")


def switch_on(variable: str) -> bool:
    """Whether the environment variable `variable` turns a switch that is off by default
    on ("1", "on", "true" or "yes", any case; unset or anything else: off)."""
    return os.environ.get(variable, "").strip().lower() in ("1", "on", "true", "yes")


# Off ("0"): the `triton` layer's GEMMs leave the warp-specialised Gluon kernels
# (moebench/impls/triton/gluon_down.py, gluon_gate_up.py) out of their race. On by
# default since version 31 (triton/NOTES.md): on an H100 they took 3-5% off the down
# GEMM in the layer, same bits as the TMA tiles'.
GLUON_WS_SWITCH = "MOEBENCH_GLUON_WS"

# Off ("0"): the `triton` layer's GEMMs leave the merged-tail TMA tiles out of their race
# (moebench/impls/triton/merge_tail.py: an expert's short last block computed with its
# previous block, from one read of the weight tile). On by default since version 31:
# DeepSeek-V3's down 2% faster in the layer on an H100, 10% alone in version 29.
MERGE_TAIL_SWITCH = "MOEBENCH_MERGE_TAIL"

# Off ("0"): the `triton` layer's tuner takes the fastest candidate of one pass, where
# by default it times the candidates within 5% of that pass's best again, in turns, and
# takes the lowest median (moebench/impls/triton/tuning.py, `race`). On by default since
# version 32 (triton/NOTES.md): on an H100 one pass took a candidate whose lucky first
# reading (0.900 ms) was 0.973 in the run-off, beside one at 0.911.
TRITON_RUNOFF_SWITCH = "MOEBENCH_TRITON_RUNOFF"

# Off ("0"): the `triton` layer runs its shared experts (DeepSeek-V3's, say) after its
# routed experts, where by default calls of at most 64 tokens at inference run them on a
# side CUDA stream beside the Router and the routed experts (`MoELayer.overlaps_shared`).
# On since version 42 (triton/NOTES.md): on an H100, DeepSeek-V3's graphed one-token call
# 7% faster, same bits; at 1024 tokens no faster, and at 8192 27% slower (the shared
# GEMMs hold multiprocessors the persistent routed tiles wait for), so not past 64.
SHARED_STREAM_SWITCH = "MOEBENCH_SHARED_STREAM"

# Switches of the `triton` layer that are on unless turned off (the others are off
# unless turned on).
ON_BY_DEFAULT = (GLUON_WS_SWITCH, MERGE_TAIL_SWITCH, TRITON_RUNOFF_SWITCH, SHARED_STREAM_SWITCH)


def layer_switch_on(variable: str) -> bool:
    """Whether the `triton` layer's switch `variable` is on: unless turned off for those
    `ON_BY_DEFAULT`, only when turned on for the others."""
    if variable in ON_BY_DEFAULT:
        return not switch_off(variable)
    return switch_on(variable)


def _switch_state(variable: str) -> str | None:
    """The `triton` layer's switch `variable` as "on" or "off" (`layer_switch_on`) where
    CUDA and Triton are present, else None; the Gluon race "off" where it cannot run."""
    if not _kernels_present():
        return None
    if not layer_switch_on(variable):
        return "off"
    if variable == GLUON_WS_SWITCH and not _gluon_races():
        return "off"  # on by default, but this Triton or card cannot race Gluon kernels
    return "on"


def _gluon_races() -> bool:
    """Whether the Gluon kernels can race on the first card: this Triton has Gluon (3.4
    and later) and `gluon_common.available` takes the card (the layer's own rule)."""
    import torch

    try:
        from moebench.impls.triton import gluon_common
    except ImportError:  # no Triton, or one without Gluon
        return False
    return gluon_common.available(torch.device("cuda", 0))


def _kernels_present() -> bool:
    """Whether moebench's Triton kernels can run here: CUDA and Triton present."""
    from moebench.routing import route_kernels

    return torch.cuda.is_available() and route_kernels() is not None


def _launch_state(module: str) -> str | None:
    """How moebench's Triton kernels launch, as `moebench.<module>.state()` records it
    ("on"/"off"): `dependent_launch` (PDL) or `fast_launch` (past the JIT's per-call
    dispatch), where CUDA and Triton are present; else None."""
    if not _kernels_present():
        return None
    # imported here: the module imports Triton, which route_kernels found
    return importlib.import_module(f"moebench.{module}").state()


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use: hyper-threads of one core
    count once (Linux topology files; else every usable CPU counts)."""
    cores = set()
    for cpu in usable_cpus():
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(usable_cpus())
        cores.add((package, core))
    return max(1, len(cores))


def machine_load() -> dict[str, Any]:
    """What else the machine is doing now: load averages (runnable processes over 1, 5,
    15 minutes, next to the usable CPUs) and the other processes on each GPU (NVML)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        one = five = fifteen = None
    load: dict[str, Any] = {
        "loadavg_1m": one,
        "loadavg_5m": five,
        "loadavg_15m": fifteen,
        "usable_cpus": len(usable_cpus()),
        "gpu_processes": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            for process in nvml.compute_processes(index) or []:
                if process["pid"] != os.getpid():
                    load["gpu_processes"].append({"gpu": index, **process})
    return load


def collect_environment(plugins: Iterable[str] = ()) -> dict[str, Any]:
    """Run-level facts stored in run.json and the parquet metadata. plugins: the run's
    `--plugin` specs, for the provenance (moebench.provenance)."""
    from moebench import __version__
    from moebench.provenance import collect_provenance

    provenance = collect_provenance(plugins)

    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "physical_cores": physical_cores(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "moebench": __version__,
        "git_sha": provenance["moebench"]["commit"],  # moebench's own commit
        "command": " ".join(sys.argv),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
        "provenance": provenance,
        "l2_flush": L2Flush.method,  # how each timed CUDA repeat is preceded
        "dependent_launch": _launch_state("dependent_launch"),
        "fast_launch": _launch_state("fast_launch"),
        "gluon_ws": _switch_state(GLUON_WS_SWITCH),
        "merge_tail": _switch_state(MERGE_TAIL_SWITCH),
        "triton_runoff": _switch_state(TRITON_RUNOFF_SWITCH),
        "shared_stream": _switch_state(SHARED_STREAM_SWITCH),
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpu = {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "total_mem_bytes": props.total_memory,
                "bf16": torch.cuda.is_bf16_supported(),
            }
            gpu.update(nvml.device_info(index))
            env["gpus"].append(gpu)
        env["driver"] = env["gpus"][0].get("driver")
    return env
