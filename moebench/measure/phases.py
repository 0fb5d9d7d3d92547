"""Where one call's time goes: named phases marked in a layer's forward, timed by CUDA
events on CUDA (so the asynchronous device work is what is timed) and perf_counter_ns on
the CPU, or shown as named ranges in a torch.profiler trace or an NVTX timeline.

The phase API. A layer marks its phases with its `timer` attribute:

    with self.timer.phase("expert"):
        out_AD = ...

`MoELayer` has `timer = NULL_TIMER` (marks the router and the shared experts itself; its
subclasses mark permute / expert / unpermute in `routed`); any other module can take part
by giving itself a `timer = NULL_TIMER` class attribute. The measurement swaps the timer
of every module that has one (`use_timer`) for the length of a pass: in the timed latency
loop it is `NULL_TIMER`, whose phases cost one no-op context manager each. Phases must not
nest (the time would be counted twice): a nested phase raises.

Phases, in the order of a step: router (scores, top-k), permute (sort by expert, capacity
mask, gather rows; on expert-parallel ranks also the regrouping of received rows),
dispatch (expert parallel: counts exchange and token all-to-all), expert (the expert
GEMMs), combine (the all-to-all back), unpermute (weights applied, rows scatter-added
back into tokens), shared (shared experts), exposed (expert parallel, overlapped schedule:
time a rank sat in `wait()` on an all-to-all), backward (train mode: the backward call).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

EP_PHASES: tuple[str, ...] = (
    "router",
    "permute",
    "dispatch",
    "expert",
    "combine",
    "unpermute",
    "shared",
    "exposed",
)
PHASES: tuple[str, ...] = (*EP_PHASES, "backward")
# The phase columns of a single-device row (backward_ms only in train mode).
SINGLE_DEVICE_PHASES: tuple[str, ...] = ("router", "permute", "expert", "unpermute", "shared")
BREAKDOWN_REPEATS = 20
"""Instrumented calls of a phase breakdown (fewer if the latency loop ran fewer)."""
_NULL = nullcontext()


def _check(name: str) -> None:
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; phases: {PHASES}")


class NullTimer:
    """Times nothing: the layer's timer outside the breakdown and profile passes."""

    def phase(self, name: str) -> AbstractContextManager[None]:
        return _NULL


NULL_TIMER = NullTimer()


def nvtx_available() -> bool:
    """True when torch can emit NVTX ranges (a CUDA build of torch)."""
    try:
        torch.cuda.nvtx.range_push("moebench")
        torch.cuda.nvtx.range_pop()
    except (RuntimeError, AttributeError):
        return False
    return True


@contextmanager
def named_range(name: str, *, profiler: bool = False, nvtx: bool = False) -> Iterator[None]:
    """`name` as a range in a torch.profiler trace (record_function) and/or on the NVTX
    timeline (nsys); nothing when both are off."""
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        if profiler:
            with torch.profiler.record_function(name):
                yield
        else:
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


class RangeTimer:
    """Marks each phase as a named range (profiler and/or NVTX) without timing it."""

    def __init__(self, *, profiler: bool = False, nvtx: bool = False):
        self.profiler, self.nvtx = profiler, nvtx

    def phase(self, name: str) -> AbstractContextManager[None]:
        _check(name)
        return named_range(name, profiler=self.profiler, nvtx=self.nvtx)


class PhaseTimer:
    """Sums the duration of each named phase over one step; `collect()` returns the sums.
    `ranges`: also mark each phase as a named range (NVTX for nsys, say)."""

    def __init__(self, device: torch.device, ranges: RangeTimer | None = None):
        self.cuda = device.type == "cuda"
        self.ranges = ranges
        self._open: str | None = None
        self._spans: list[tuple[str, object, object]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        _check(name)
        if self._open is not None:
            raise ValueError(f"phase {name!r} opened inside phase {self._open!r}: phases nest")
        self._open = name
        marked = self.ranges.phase(name) if self.ranges is not None else _NULL
        try:
            with marked:
                if self.cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    yield
                    end.record()
                else:
                    start = time.perf_counter_ns()
                    yield
                    end = time.perf_counter_ns()
            self._spans.append((name, start, end))
        finally:
            self._open = None

    def collect(self) -> dict[str, float]:
        """Milliseconds per phase since the last collect (every phase present, 0 if unseen);
        synchronises the device on CUDA."""
        if self.cuda and self._spans:
            torch.cuda.synchronize()
        totals = dict.fromkeys(PHASES, 0.0)
        for name, start, end in self._spans:
            if self.cuda:
                totals[name] += start.elapsed_time(end)  # type: ignore[attr-defined]
            else:
                totals[name] += (end - start) / 1e6  # type: ignore[operator]
        self._spans = []
        return totals


Timer = NullTimer | RangeTimer | PhaseTimer


@contextmanager
def use_timer(layer: torch.nn.Module, timer: Timer) -> Iterator[None]:
    """Give every module of `layer` that has a `timer` attribute this `timer`; restore
    theirs afterwards."""
    marked = [m for m in layer.modules() if hasattr(m, "timer")]
    saved = [m.timer for m in marked]
    for module in marked:
        module.timer = timer
    try:
        yield
    finally:
        for module, old in zip(marked, saved):
            module.timer = old


def timer_of(layer: torch.nn.Module) -> Timer:
    """The timer `layer` marks its phases with (NULL_TIMER if it has none)."""
    return getattr(layer, "timer", NULL_TIMER)


def phase_breakdown(
    layer: torch.nn.Module,
    step: Callable[[int], object],
    device: torch.device,
    repeats: int,
    *,
    phases: tuple[str, ...] = SINGLE_DEVICE_PHASES,
    flush: Callable[[], None] | None = None,
    nvtx: bool = False,
) -> dict[str, float]:
    """Where the time of one call of `step(i)` goes, over `repeats` instrumented calls:
    each phase's time (`<phase>_ms`), the whole call's (`phase_latency_ms`) and what no
    phase covers (`other_ms`: launch gaps, host work, synchronisation; the call's time
    minus its phases). Each is the mean over the middle half of the calls ranked by their
    whole time (an interquartile mean: the outliers of a noisy host are left out, and the
    phases plus other_ms add up to phase_latency_ms, as per-column medians would not).
    `flush` (CUDA): called before each call to flush the L2 cache, as the timed loop
    does (`moebench.measure.timing.L2Flush`). The device is synchronised after every call."""
    timer = PhaseTimer(device, RangeTimer(nvtx=True) if nvtx else None)
    cuda = device.type == "cuda"
    rows: list[dict[str, float]] = []
    with use_timer(layer, timer), named_range("moebench phases", nvtx=nvtx):
        timer.collect()  # nothing left from before
        for i in range(repeats):
            if flush is not None:
                flush()
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                step(i)
                end.record()
                # collect() synchronises only when a phase was marked: a layer without
                # phases (a plugin's, a graph replay) must still finish before reading.
                end.synchronize()
                per_phase = timer.collect()
                total_ms = start.elapsed_time(end)
            else:
                started = time.perf_counter_ns()
                step(i)
                total_ms = (time.perf_counter_ns() - started) / 1e6
                per_phase = timer.collect()
            row = {f"{name}_ms": per_phase[name] for name in phases}
            row["other_ms"] = total_ms - sum(row.values())
            row["phase_latency_ms"] = total_ms
            rows.append(row)
    return interquartile_mean(rows, "phase_latency_ms")


def interquartile_mean(rows: list[dict[str, float]], rank_by: str) -> dict[str, float]:
    """Mean of every column over the rows whose `rank_by` lies in the middle half (all
    rows when there are fewer than four): additive columns stay additive."""
    ranked = sorted(rows, key=lambda r: r[rank_by])
    n = len(ranked)
    kept = ranked[n // 4 : n - n // 4] if n >= 4 else ranked
    return {key: statistics.fmean(r[key] for r in kept) for key in ranked[0]}
