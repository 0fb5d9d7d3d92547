"""What the harness sees: host, devices, NVML, library versions, provenance."""

from __future__ import annotations

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
