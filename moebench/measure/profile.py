"""The profiler pass of `moebench run --profile`: a few calls of a case under
torch.profiler, after timing (the timed latency is untouched), giving a Chrome/Perfetto
trace with the phases as named ranges, a per-case kernel table and three columns.

What counts as a kernel: on CUDA the device activities of the trace (kernels, memcpy,
memset), on the CPU the top-level aten operators (an operator not inside another one).
Only what happens inside the profiled calls (the `moebench call` ranges) is counted, so
the harness's own synchronisation at the end is not.

Columns:
- kernel_launches: device kernels (CPU: top-level aten ops) per call.
- device_busy_frac: the time per call that at least one kernel runs / latency: the union
  of the kernels' intervals, so kernels side by side (on two streams, or one started
  under its predecessor's tail by dependent launch) count once (runs before 2026-12-06
  summed them, and read over 1 where they overlapped). On CUDA the latency is the
  timed `latency_ms` (kernels run at the same speed under the profiler; the host does
  not); on the CPU it is the profiled calls' own duration (the operators are slowed by the
  profiler as much as the call is). Near 1: the device computes all the time; low: it
  waits for launches (launch-bound) or for the host (sync-bound).
- host_sync_count: device-to-host synchronisations per call, CUDA only: the runtime calls
  that block the host on the device inside a call (cudaStreamSynchronize,
  cudaDeviceSynchronize, cudaEventSynchronize, synchronous cudaMemcpy); `.item()`,
  `.tolist()` or a bool of a CUDA tensor each make one. Null on the CPU (nothing to wait
  for).

Kernel table (kernels.parquet, one row per case and kernel name): case_id, kernel, kind
(kernel, memcpy, memset or cpu_op), calls_per_call, device_ms (per layer call), share (of
the case's summed kernel time).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moebench.measure.phases import RangeTimer, named_range, use_timer

CALL_RANGE = "moebench call"
PROFILED_CALLS = 5
DEVICE_KINDS = {"kernel": "kernel", "gpu_memcpy": "memcpy", "gpu_memset": "memset"}
SYNC_CALLS = frozenset(
    {
        "cudaStreamSynchronize",
        "cudaDeviceSynchronize",
        "cudaEventSynchronize",
        "cudaMemcpy",
        "cuStreamSynchronize",
        "cuCtxSynchronize",
        "cuEventSynchronize",
        "cuMemcpyDtoH_v2",
    }
)
# Keys of a measured row that carry the profile to the runner (never stored as columns).
TRACE_KEY = "_profile_trace_json_gz"
KERNELS_KEY = "_profile_kernels"


@dataclass(frozen=True)
class ProfileOptions:
    """What `moebench run` adds to each case: `trace` a torch.profiler pass (--profile),
    `nvtx` NVTX ranges for the case and its phases (--nvtx)."""

    trace: bool = False
    nvtx: bool = False


NO_PROFILE = ProfileOptions()


@dataclass
class KernelSummary:
    """What one profiled pass says: the columns of the row and the kernel table."""

    columns: dict[str, Any]
    kernels: list[dict[str, Any]] = field(default_factory=list)


def profile_calls(
    layer: torch.nn.Module,
    step: Callable[[int], object],
    device: torch.device,
    calls: int = PROFILED_CALLS,
    nvtx: bool = False,
) -> dict[str, Any]:
    """Run `calls` calls of `step(i)` under torch.profiler, the phases of `layer` marked as
    named ranges and each call as a `moebench call` range. Returns the trace as a dict
    (Chrome trace format: {"traceEvents": [...], ...})."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    timer = RangeTimer(profiler=True, nvtx=nvtx)
    with (
        named_range("moebench profile", nvtx=nvtx),
        use_timer(layer, timer),
        profile(activities=activities) as prof,
    ):
        for i in range(calls):
            with named_range(CALL_RANGE, profiler=True):
                step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    handle, path = tempfile.mkstemp(suffix=".json", prefix="moebench-trace-")
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    finally:
        os.unlink(path)


def _spans(events: list[dict[str, Any]], name: str) -> list[tuple[Any, float, float]]:
    """(thread, start, end) of the host ranges called `name` (on CUDA each range also has
    a `gpu_user_annotation` twin on the device's timeline: not counted)."""
    return [
        (e.get("tid"), float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events
        if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e.get("name") == name
    ]


def _inside(event: dict[str, Any], calls: list[tuple[Any, float, float]]) -> bool:
    ts = float(event["ts"])
    return any(tid == event.get("tid") and start <= ts <= end for tid, start, end in calls)


def _top_level_ops(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """cpu_op events not nested inside another cpu_op of the same thread."""
    ops = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"),
        key=lambda e: (e.get("tid"), float(e["ts"]), -float(e.get("dur", 0))),
    )
    top, open_until, thread = [], -1.0, object()
    for op in ops:
        start = float(op["ts"])
        if op.get("tid") != thread:
            thread, open_until = op.get("tid"), -1.0
        if start >= open_until:
            top.append(op)
            open_until = start + float(op.get("dur", 0))
    return top


def _covered_us(events: list[dict[str, Any]]) -> float:
    """Microseconds covered by at least one of the events' [ts, ts + dur) intervals."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events
    ):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def summarize_trace(
    trace: dict[str, Any], on_cuda: bool, latency_ms: float | None
) -> KernelSummary:
    """The kernel table and the kernel_launches / device_busy_frac / host_sync_count
    columns of a trace made by `profile_calls` (module docstring)."""
    events = trace.get("traceEvents", [])
    calls = _spans(events, CALL_RANGE)
    if not calls:
        raise ValueError(f"the trace has no {CALL_RANGE!r} range: nothing to count")
    n = len(calls)
    if on_cuda:
        device_events = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_KINDS]
        kinds = {e["name"]: DEVICE_KINDS[e["cat"]] for e in device_events}
        launches = sum(1 for e in device_events if e.get("cat") == "kernel")
        syncs = sum(
            1
            for e in events
            if e.get("ph") == "X"
            and e.get("cat") in ("cuda_runtime", "cuda_driver")
            and e.get("name") in SYNC_CALLS
            and _inside(e, calls)
        )
        busy_of_ms = latency_ms
    else:
        device_events = [e for e in _top_level_ops(events) if _inside(e, calls)]
        kinds = {e["name"]: "cpu_op" for e in device_events}
        launches = len(device_events)
        syncs = None
        busy_of_ms = sum(end - start for _, start, end in calls) / 1e3 / n
    count: dict[str, int] = defaultdict(int)
    time_us: dict[str, float] = defaultdict(float)
    for event in device_events:
        count[event["name"]] += 1
        time_us[event["name"]] += float(event.get("dur", 0))
    total_us = sum(time_us.values())
    kernels = [
        {
            "kernel": name,
            "kind": kinds[name],
            "calls_per_call": count[name] / n,
            "device_ms": time_us[name] / 1e3 / n,
            "share": time_us[name] / total_us if total_us else 0.0,
        }
        for name in sorted(time_us, key=lambda k: -time_us[k])
    ]
    busy_ms = _covered_us(device_events) / 1e3 / n
    columns = {
        "kernel_launches": launches / n,
        "device_busy_frac": busy_ms / busy_of_ms if busy_of_ms else None,
        "host_sync_count": None if syncs is None else syncs / n,
        "profile_calls": n,
    }
    return KernelSummary(columns, kernels)


def profile_case(
    layer: torch.nn.Module,
    step: Callable[[int], object],
    device: torch.device,
    latency_ms: float,
    nvtx: bool = False,
) -> dict[str, Any]:
    """The profiler pass of one case: its columns, plus the gzipped trace and the kernel
    rows under TRACE_KEY and KERNELS_KEY for the runner to store (`save_profile`)."""
    trace = profile_calls(layer, step, device, nvtx=nvtx)
    summary = summarize_trace(trace, device.type == "cuda", latency_ms)
    columns = dict(summary.columns)
    columns[TRACE_KEY] = gzip.compress(json.dumps(trace).encode("utf-8"), compresslevel=6)
    columns[KERNELS_KEY] = summary.kernels
    return columns


def save_profile(store: Any, case_id: str, row: dict[str, Any]) -> None:
    """Move a measured row's trace and kernel rows (if any) into the run folder
    (`ResultStore.write_trace` / `write_kernels`), leaving only columns in the row."""
    trace = row.pop(TRACE_KEY, None)
    kernels = row.pop(KERNELS_KEY, None)
    if trace is not None:
        store.write_trace(case_id, trace)
    if kernels is not None:
        store.write_kernels(case_id, kernels)


def where_time_goes(
    case_mode: str,
    layer: torch.nn.Module,
    step: Callable[[int], object],
    device: torch.device,
    samples_ms: list[float],
    options: ProfileOptions,
    flush_l2: bool = True,
) -> dict[str, Any]:
    """The columns measured after timing, in passes of their own: the phase breakdown
    (always; `moebench.measure.phases.phase_breakdown`), then with `options.trace` the
    profiler pass (`profile_case`)."""
    import statistics

    from moebench.measure.phases import BREAKDOWN_REPEATS, SINGLE_DEVICE_PHASES, phase_breakdown
    from moebench.measure.timing import L2Flush

    phases = SINGLE_DEVICE_PHASES + (("backward",) if case_mode == "train" else ())
    flush = L2Flush(device) if device.type == "cuda" and flush_l2 else None
    repeats = max(1, min(BREAKDOWN_REPEATS, len(samples_ms)))
    columns = phase_breakdown(
        layer, step, device, repeats, phases=phases, flush=flush, nvtx=options.nvtx
    )
    columns["phase_repeats"] = repeats
    del flush
    if options.trace:
        latency_ms = statistics.median(samples_ms)
        columns.update(profile_case(layer, step, device, latency_ms, nvtx=options.nvtx))
    return columns
