"""Timing: CUDA events on GPU, perf_counter_ns on CPU; every sample is returned.

Recipe (after Triton's do_bench): warm up, then repeat in growing batches until the
median is stable, the time budget is spent or max_repeats is reached. On CUDA each repeat
is bracketed by its own pair of events, the L2 cache is flushed before each repeat
(outside the events, by reading a buffer larger than it: `L2Flush`) so small cases are not
flattered by a warm cache, and the device is synchronised once per batch.

On CUDA the warm-up also runs for a time (`TimingPlan.warmup_ms`), not only a count of
calls: under back-to-back tensor-core work a card lowers its clock to stay inside its
power limit within a fraction of a second (an H200: 819 TFLOP/s for the first ~50 ms of
8192^3 products, 686 after), so without it a compute-bound case's first samples run at a
clock its later ones do not keep, and its median lands partway down that ramp (Qwen3-30B-
A3B at 8192 tokens: 1.26 ms at first, 1.47 at the end of 160 samples). After the timed
warm-up every sample is taken in the state `measure.ceilings`' sustained rate is read in.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moebench.measure.stats import is_stable

L2_FLUSH_BYTES = 256 * 1024 * 1024


class L2Flush:
    """Evicts the L2 cache, before a timed call, by reading a buffer larger than it.

    Read, not written (triton's do_bench zeroes its buffer): a write leaves the cache full
    of dirty lines, which the timed call's own loads evict and write back to memory inside
    the timed window. On an H200 that cost a graphed decode step 6-8 us (Qwen3-30B-A3B,
    one token: 42.3 us after a zeroing flush, 36.0 after a reading one, 34.4 after none),
    a cost no layer pays in a model, where the ops before it leave clean lines behind."""

    # run.json's `l2_flush` on CUDA machines: `moebench compare` warns where two runs differ
    method = "read"

    def __init__(self, device: torch.device):
        self.buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        torch.amax(self.buffer)  # any reduction reads every line; its result is dropped


@dataclass(frozen=True)
class TimingPlan:
    """How long and how often to time one case."""

    budget_ms: float = 2000.0
    warmup: int = 3
    min_repeats: int = 5
    max_repeats: int = 200
    flush_l2: bool = True
    # CUDA only: after the warm-up calls, calls back to back until this many ms have passed
    # since the first one returned (module docstring); a suite's default is 500
    # (`suite_schema.MEASUREMENT_DEFAULTS`), the ceilings' own wait for the sustained rate
    warmup_ms: float = 0.0


def time_repeats(
    fn: Callable[[int], object], device: torch.device, plan: TimingPlan
) -> list[float]:
    """Call `fn(i)` repeatedly (i = repeat index, for rotating inputs) and return the
    duration of each timed call in milliseconds."""
    warm_up(fn, device, plan)
    if device.type == "cuda":
        flush = L2Flush(device) if plan.flush_l2 else None
        run_batch: Callable[[int, int], list[float]] = lambda start, n: _cuda_batch(  # noqa: E731
            fn, start, n, device, flush
        )
    else:
        run_batch = lambda start, n: _cpu_batch(fn, start, n)  # noqa: E731

    started = time.perf_counter()

    def timed(start: int, n: int) -> tuple[list[float], float]:
        return run_batch(start, n), (time.perf_counter() - started) * 1e3

    return repeat_in_batches(timed, plan)


def warm_up(
    fn: Callable[[int], object],
    device: torch.device,
    plan: TimingPlan,
    agree: Callable[[float], float] = lambda spent_ms: spent_ms,
) -> int:
    """Call `fn(i)` `plan.warmup` times and then, on CUDA, back to back in synchronised
    batches until `plan.warmup_ms` have passed since the first call returned (that call
    compiles, tunes and allocates: it is not the card's load). Returns the calls made.

    agree: maps this process's milliseconds spent to the figure every rank acts on (the
    max over ranks), so ranks whose calls hold collectives make the same number of calls."""
    cuda = device.type == "cuda"
    calls = 0
    if plan.warmup > 0:
        fn(calls)
        calls += 1
    if cuda:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    while calls < plan.warmup:
        fn(calls)
        calls += 1
    if cuda:
        torch.cuda.synchronize(device)
    if not cuda or plan.warmup_ms <= 0:
        return calls
    timed_calls = max(calls - 1, 0)
    spent_ms = agree((time.perf_counter() - started) * 1e3)
    while spent_ms < plan.warmup_ms:
        # A batch as long as the time left at the rate so far: the warm-up overshoots its
        # time by about a call, and the host reads the clock only a few times.
        per_call_ms = spent_ms / timed_calls if timed_calls else 0.0
        batch = max(1, int((plan.warmup_ms - spent_ms) / per_call_ms)) if per_call_ms else 1
        for _ in range(batch):
            fn(calls)
            calls += 1
        timed_calls += batch
        torch.cuda.synchronize(device)
        spent_ms = agree((time.perf_counter() - started) * 1e3)
    return calls


def repeat_in_batches(
    run_batch: Callable[[int, int], tuple[list[float], float]], plan: TimingPlan
) -> list[float]:
    """The adaptive-repeat loop: `run_batch(start, n)` times n calls and returns their
    samples and the milliseconds spent so far; batches grow until the median is stable,
    the budget is spent or max_repeats is reached."""
    samples: list[float] = []
    batch = max(1, plan.min_repeats)
    while True:
        batch = min(batch, plan.max_repeats - len(samples))
        new, spent_ms = run_batch(len(samples), batch)
        samples.extend(new)
        if len(samples) >= plan.max_repeats:
            break
        if len(samples) >= plan.min_repeats and (spent_ms >= plan.budget_ms or is_stable(samples)):
            break
        # Size the next batch to at most the budget left, judged by the time so far.
        per_call_ms = spent_ms / len(samples)
        left = max(1, int((plan.budget_ms - spent_ms) / max(per_call_ms, 1e-6)))
        batch = max(1, min(len(samples), left))
    return samples


def time_back_to_back(
    fn: Callable[[int], object], device: torch.device, duration_ms: float, first: int = 30
) -> list[float]:
    """Each call's milliseconds of `fn(i)` run back to back on a CUDA device for at least
    `duration_ms` (and at least 2 x `first` calls), no flush or sync between calls: how a
    card runs sustained work, power cap included (`measure.ceilings`)."""
    for i in range(2):
        fn(i)
    samples = _cuda_batch(fn, 0, first, device, None)
    # Batches sized from the latest calls' pace until the calls add up to duration_ms: a
    # card whose first calls run slower than its later ones (an H100 ramping its clock)
    # would otherwise stop short of it (0.97 s of 1 s on version 35's H100).
    while len(samples) < 2 * first or sum(samples) < duration_ms:
        per_call_ms = max(statistics.median(samples[-first:]), 1e-6)
        more = max(first, math.ceil((duration_ms - sum(samples)) / per_call_ms))
        samples += _cuda_batch(fn, len(samples), more, device, None)
    return samples


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """The milliseconds of one call of `fn`: CUDA events around it on a CUDA device (then
    a sync), else the host's clock. No warm-up, no flush: for probes that time several
    variants in turns (`in_turns`) after warming them up together."""
    if device.type == "cuda":
        return _cuda_batch(lambda _: fn(), 0, 1, device, None)[0]
    return _cpu_batch(lambda _: fn(), 0, 1)[0]


def queued_and_wall_us(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(host microseconds per call to queue `calls` calls of `fn` back to back on a CUDA
    device, wall microseconds per call until the device finished them), after 5 calls of
    warm-up: where the wall time is about the queueing time, the host set it (an
    un-graphed call is host-bound), where it is longer, the device."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    queued = time.perf_counter()
    torch.cuda.synchronize()
    end = time.perf_counter()
    return (queued - start) / calls * 1e6, (end - start) / calls * 1e6


def in_turns(sides: dict[str, Callable[[], float]], rounds: int = 8) -> dict[str, float]:
    """Each side's median (a side returns one sample) over `rounds`, the sides taking turns
    in one process, the order reversed every other round: on a shared host the time per
    call moves by tens of percent between processes and over minutes, and a card's clock
    with its power draw, which a comparison of sides timed apart would read as their
    difference."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name].append(sides[name]())
    return {name: statistics.median(taken) for name, taken in times.items()}


def _cpu_batch(fn: Callable[[int], object], start: int, n: int) -> list[float]:
    out = []
    for i in range(start, start + n):
        t0 = time.perf_counter_ns()
        fn(i)
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def _cuda_batch(
    fn: Callable[[int], object],
    start: int,
    n: int,
    device: torch.device,
    flush: L2Flush | None,
) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for j in range(n):
        if flush is not None:
            flush()
        starts[j].record()
        fn(start + j)
        ends[j].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]
