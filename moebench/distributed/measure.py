"""Measure one expert-parallel case on one rank of its process group. Every rank of the
group calls `measure_on_rank` with the same case; rank 0 returns the results row, the
others None.

Shape legend: T tokens (the whole batch), D hidden, W ranks.

Same function on every rank: each rank draws the case's weights and inputs
(`make_weights`, `make_inputs`, seeded per case), then rank 0's draw is broadcast, so the
ranks hold identical numbers by construction (a CUDA generator need not give equal numbers
on two different cards). The batch of T tokens is split into W contiguous slices, one per
rank (like data parallel: `token_bounds`); the ranks' outputs gathered to rank 0 must equal
the float32 single-device `reference_output` of the whole batch on the same weights, as a
single-device layer's must (`check.check_output`: within the dtype's TOLERANCE, and every
token within TOKEN_TOLERANCE), or the case is a `mismatch` and is not timed. So must its
output on a batch no timed call sees (the unseen batch), and, after timing, the last timed
call's output on the first batch (drift). A layer that drops assignments on purpose is
checked against the reference with the same drops (that is `rel_err`) and its distance to
the dropless function is `fidelity_err`.

Timing: the slowest rank decides. Latency repeats start together (an all-reduce before
each, outside the timed window) and each repeat's figure is the maximum over the ranks
(an all-reduce MAX); the number of repeats is decided from those agreed figures, so every
rank runs the same count. The phase breakdown is a second, instrumented pass (CUDA events
or perf_counter around each phase), each phase's figure per repeat again the maximum over
ranks, then the median over repeats. For the overlapped schedule the breakdown is taken on
the same chunks run one after the other (what the communication costs), and the
overlapped pass gives the exposed communication (time spent waiting on it):
comm_hidden_frac = 1 - exposed_comm_ms / comm_ms.

Columns beyond the single-device ones: router_ms, permute_ms, dispatch_ms, expert_ms,
combine_ms, unpermute_ms, shared_ms (median per phase); comm_ms = dispatch_ms + combine_ms
(counts exchange included in dispatch); exposed_comm_ms, comm_hidden_frac; comm_bytes =
dispatch_bytes + combine_bytes: the bytes all ranks together sent to other ranks in one
step of the checked input (rows kept on their own rank are local copies and are not
counted; counts are 8-byte integers, E / W per peer per chunk); comm_gbps = comm_bytes /
W / comm_ms (per-rank bus bandwidth, nccl-tests' busbw for an all-to-all); tokens_per_rank
(list): the (token, slot) rows each rank's experts computed; rank_imbalance = max / mean of
it; peak and weight bytes are the largest rank's.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moebench import registry
from moebench.case import Case
from moebench.distributed.group import token_bounds, use_group
from moebench.distributed.layer import ExpertParallelMoE
from moebench.impls.reference import reference_output
from moebench.measure import counters
from moebench.measure.case_run import (
    MAX_ROTATIONS,
    ROTATE_BYTES,
    TOLERANCE,
    UNSEEN_FAILURE,
    relative_error,
)
from moebench.measure.check import check_output, routing_ties
from moebench.measure.memory import peak_during, weight_bytes
from moebench.measure.phases import BREAKDOWN_REPEATS, NULL_TIMER, PhaseTimer
from moebench.measure.phases import EP_PHASES as PHASES
from moebench.measure.stats import summarize
from moebench.measure.timing import L2Flush, TimingPlan, repeat_in_batches, warm_up
from moebench.weight_sources import make_weights
from moebench.weights import ExpertWeights, make_inputs, torch_dtype


class Aligner:
    """Starts a repeat on every rank together: an all-reduce of one number (on CUDA it
    makes the stream wait for every rank; on the CPU it blocks until all arrive), after the
    L2 flush, before the timed window."""

    def __init__(self, device: torch.device, group: dist.ProcessGroup, flush_l2: bool):
        self.group = group
        self.token = torch.zeros(1, device=device)
        self.flush = None
        if device.type == "cuda" and flush_l2:
            self.flush = L2Flush(device)

    def __call__(self) -> None:
        if self.flush is not None:
            self.flush()
        dist.all_reduce(self.token, group=self.group)


def _max_over_ranks(
    values: list[float], device: torch.device, group: dist.ProcessGroup
) -> list[float]:
    """Element-wise maximum of `values` over the ranks of `group`."""
    agreed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    return agreed.tolist()


def time_steps(
    step: Callable[[int], object],
    device: torch.device,
    plan: TimingPlan,
    group: dist.ProcessGroup,
) -> list[float]:
    """Per-repeat step time of the slowest rank, in ms (the recipe of
    `moebench.measure.timing.time_repeats`, with the ranks agreeing on every figure)."""
    warm_up(step, device, plan, agree=lambda ms: _max_over_ranks([ms], device, group)[0])
    align = Aligner(device, group, plan.flush_l2)
    started = time.perf_counter()

    def agreed_batch(start: int, n: int) -> tuple[list[float], float]:
        local = _timed_batch(step, start, n, device, align)
        spent_ms = (time.perf_counter() - started) * 1e3
        *agreed, spent_ms = _max_over_ranks([*local, spent_ms], device, group)
        return agreed, spent_ms

    return repeat_in_batches(agreed_batch, plan)


def _timed_batch(
    step: Callable[[int], object], start: int, n: int, device: torch.device, align: Aligner
) -> list[float]:
    if device.type != "cuda":
        out = []
        for i in range(start, start + n):
            align()
            t0 = time.perf_counter_ns()
            step(i)
            out.append((time.perf_counter_ns() - t0) / 1e6)
        return out
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for j in range(n):
        align()
        starts[j].record()
        step(start + j)
        ends[j].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def breakdown(
    layer: ExpertParallelMoE,
    step: Callable[[int], object],
    device: torch.device,
    group: dist.ProcessGroup,
    repeats: int,
) -> dict[str, float]:
    """Median over `repeats` instrumented steps of each phase's time on the slowest rank."""
    align = Aligner(device, group, flush_l2=False)
    layer.timer = timer = PhaseTimer(device)
    rows: list[list[float]] = []
    try:
        for i in range(repeats):
            align()
            step(i)
            phases = timer.collect()
            rows.append([phases[name] for name in PHASES])
    finally:
        layer.timer = NULL_TIMER
    flat = _max_over_ranks([v for row in rows for v in row], device, group)
    width = len(PHASES)
    return {
        name: statistics.median(flat[r * width + p] for r in range(repeats))
        for p, name in enumerate(PHASES)
    }


def _broadcast_weights(weights: ExpertWeights, group: dist.ProcessGroup) -> None:
    source = dist.get_global_rank(group, 0)
    for tensor in weights.tensors():
        dist.broadcast(tensor, src=source, group=group)


def gather_rows(
    part: torch.Tensor, bounds: list[tuple[int, int]], group: dist.ProcessGroup
) -> torch.Tensor:
    """Every rank's slice (rows bounds[rank]) joined into the whole batch, on every rank."""
    rows = max(stop - start for start, stop in bounds)
    padded = part.new_zeros(rows, *part.shape[1:])
    padded[: part.shape[0]] = part
    parts = [torch.empty_like(padded) for _ in bounds]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: stop - start] for p, (start, stop) in zip(parts, bounds)])


class _CallCheck:
    """One call's output check on every rank (`check_call`): the numbers and whether it
    failed everywhere, why on rank 0; and on rank 0 what later outputs on the same batch
    are held to (the expected output, its tokens near a routing tie)."""

    def __init__(self, values: list[float], failure: str | None, expected: Any, ties: Any):
        self.rel_err, self.max_token_err, self.fidelity_err, failed = values
        self.failed = failed > 0
        self.failure = failure
        self.expected, self.ties = expected, ties


def check_call(
    y_TD: torch.Tensor,
    layer: ExpertParallelMoE,
    case: Case,
    bounds: list[tuple[int, int]],
    group: dist.ProcessGroup,
    device: torch.device,
    reference: tuple[ExpertWeights, torch.Tensor] | _CallCheck,
) -> _CallCheck:
    """The ranks' outputs of one call gathered on rank 0 and checked there: against the
    reference on the whole batch, `reference` = (weights, x_TD) (a layer that drops
    assignments: against the reference with its drops), or against an earlier check's
    expected output (drift). A collective: every rank gets the numbers and the verdict."""
    rank = dist.get_rank(group)
    y_full_TD = gather_rows(y_TD, bounds, group)
    keep_full_TK = None
    # the same on every rank, so every rank takes part in the same gathers
    if not isinstance(reference, _CallCheck) and layer._last_dropped_TK is not None:
        kept_TK = (~layer._last_dropped_TK).to(torch.uint8)  # this call's drops
        keep_full_TK = gather_rows(kept_TK, bounds, group).bool()
    values, failure, expected, ties = [0.0, 0.0, 0.0, 0.0], None, None, None
    if rank == 0:
        fidelity = 0.0
        if isinstance(reference, _CallCheck):
            expected, ties = reference.expected, reference.ties
        else:
            weights, x_full_TD = reference
            expected = reference_output(weights, x_full_TD, keep_full_TK)
            ties = routing_ties(weights, x_full_TD)
            if keep_full_TK is not None:
                fidelity = relative_error(y_full_TD, reference_output(weights, x_full_TD))
        checked = check_output(y_full_TD, expected, case.dtype, ties)
        if checked.failure:
            failure = f"{checked.failure} on {dist.get_world_size(group)} ranks"
        values = [checked.rel_err, checked.max_token_err, fidelity, float(bool(failure))]
    return _CallCheck(_broadcast_floats(values, device, group), failure, expected, ties)


def measure_on_rank(
    case: Case, plan: TimingPlan, group: dist.ProcessGroup, device: torch.device
) -> dict[str, Any] | None:
    """Check, time and count `case` on this rank of `group` (a collective: every rank of
    the group calls it with the same arguments); rank 0 returns the row, the others None.
    Raises on failure, like `moebench.measure.case_run.measure_case`."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    info = registry.get(case.impl)
    rank_case = case.with_(device=str(device))
    dtype = torch_dtype(case.dtype)
    element = torch.empty((), dtype=dtype).element_size()
    bounds = token_bounds(case.tokens, world_size)
    start, stop = bounds[rank]

    weights = make_weights(rank_case)
    _broadcast_weights(weights, group)
    slice_bytes = max(1, max(b - a for a, b in bounds) * case.shape.hidden * element)
    rotations = max(1, min(MAX_ROTATIONS, math.ceil(ROTATE_BYTES / slice_bytes)))
    if device.type == "cpu":
        rotations = min(rotations, 2)
    full_inputs = make_inputs(rank_case, rotations) + make_inputs(rank_case, 1, unseen=True)
    for x_TD in full_inputs:
        dist.broadcast(x_TD, src=dist.get_global_rank(group, 0), group=group)
    *inputs, unseen_TD = [x_TD[start:stop].contiguous() for x_TD in full_inputs]
    checked_TD, unseen_full_TD = full_inputs[0], full_inputs[-1]
    del full_inputs

    torch.manual_seed(case.seed)
    with use_group(group):
        layer = info.build(weights, rank_case)
    if not isinstance(layer, ExpertParallelMoE):
        raise TypeError(
            f"impl {case.impl!r} built a {type(layer).__name__}, not an ExpertParallelMoE"
        )
    row: dict[str, Any] = {
        "family": info.family,
        "exact": info.exact,
        "impl_detail": layer.impl_detail,
    }

    # 1. Correctness, before any timing: the first call, then one on the unseen batch.
    with torch.no_grad():
        y_TD = layer(inputs[0])
        stats = layer.global_stats()
        traffic = layer.traffic()
        first = check_call(y_TD, layer, case, bounds, group, device, (weights, checked_TD))
        unseen = None
        if not first.failed:
            y_TD = layer(unseen_TD)
            reference = (weights, unseen_full_TD)
            unseen = check_call(y_TD, layer, case, bounds, group, device, reference)
    del y_TD, weights, checked_TD, unseen_full_TD, unseen_TD
    row.update(tolerance=TOLERANCE[case.dtype], rel_err=first.rel_err)
    row["max_token_err"] = first.max_token_err
    if not info.exact:
        row["fidelity_err"] = first.fidelity_err
    if first.failed or (unseen is not None and unseen.failed):
        row["status"] = "mismatch"
        row["error"] = (
            first.failure if first.failed else f"{UNSEEN_FAILURE}: {unseen and unseen.failure}"
        )
        return row if rank == 0 else None
    if stats is not None:
        row.update(stats.columns())

    # 2. Peak memory of one step, 3. latency, 4. the phase breakdown.
    last: dict[int, torch.Tensor] = {}

    def step(i: int) -> object:
        y_TD = layer(inputs[i % len(inputs)])
        if i % len(inputs) == 0:
            last[0] = y_TD  # the latest output on the first batch, for the drift check
        return y_TD

    with torch.inference_mode():
        step(0)
        peak, added = peak_during(lambda: step(1), device)
        samples_ms = time_steps(step, device, plan, group)
        drift = check_call(last.pop(0), layer, case, bounds, group, device, first)
        if drift.failed:
            row.update(status="mismatch", error=f"drifted during timing: {drift.failure}")
            return row if rank == 0 else None
        repeats = max(1, min(BREAKDOWN_REPEATS, len(samples_ms)))
        phases = breakdown(layer, step, device, group, repeats)
        if layer.overlap:
            exposed_ms = phases["exposed"]
            layer.overlap = False
            try:
                phases = breakdown(layer, step, device, group, repeats)
            finally:
                layer.overlap = True
        else:
            exposed_ms = phases["dispatch"] + phases["combine"]

    # 5. The largest rank's memory, every rank's traffic.
    own_weight_bytes = weight_bytes(layer)
    memory = _max_over_ranks(
        [own_weight_bytes, -1 if added is None else added, -1 if peak is None else peak],
        device,
        group,
    )
    per_rank = torch.tensor(
        [traffic.rows_sent_remote, traffic.rows_received, traffic.count_bytes_sent],
        dtype=torch.int64,
        device=device,
    )
    gathered = [torch.empty_like(per_rank) for _ in range(world_size)]
    dist.all_gather(gathered, per_rank, group=group)
    if rank != 0:
        return None

    most_weight_bytes, most_added, most_peak = (int(v) for v in memory)
    row.update(
        weight_bytes=most_weight_bytes,
        allocator_peak_bytes=None if most_peak < 0 else most_peak,
        activation_bytes=None if most_added < 0 else most_added,
        peak_mem_bytes=None if most_added < 0 else most_weight_bytes + most_added,
    )
    row.update(summarize(samples_ms, device.type))
    row.update(samples_ms=samples_ms, repeats=len(samples_ms))
    latency_s = row["latency_ms"] / 1e3
    row["tokens_per_s"] = case.tokens / latency_s

    params = counters.param_counts(case, layer, stats)
    row.update(counters.work_columns(case, params, dtype, latency_s))

    traffic_rows = [t.tolist() for t in gathered]
    row_bytes = case.shape.hidden * element
    remote_rows = sum(r[0] for r in traffic_rows)
    dispatch_bytes = remote_rows * row_bytes + sum(r[2] for r in traffic_rows)
    combine_bytes = remote_rows * row_bytes
    comm_bytes = dispatch_bytes + combine_bytes
    comm_ms = phases["dispatch"] + phases["combine"]
    tokens_per_rank = [r[1] for r in traffic_rows]
    mean_rows = sum(tokens_per_rank) / world_size
    row.update({f"{name}_ms": phases[name] for name in PHASES if name != "exposed"})
    row.update(
        comm_ms=comm_ms,
        comm_bytes=comm_bytes,
        dispatch_bytes=dispatch_bytes,
        combine_bytes=combine_bytes,
        comm_gbps=comm_bytes / world_size / (comm_ms / 1e3) / 1e9
        if comm_bytes and comm_ms
        else None,
        exposed_comm_ms=exposed_ms,
        comm_hidden_frac=min(1.0, max(0.0, 1.0 - exposed_ms / comm_ms)) if comm_ms else 0.0,
        tokens_per_rank=tokens_per_rank,
        rank_imbalance=max(tokens_per_rank) / mean_rows if mean_rows else None,
        chunks=layer.chunks,
        breakdown_repeats=repeats,
        backend=dist.get_backend(group),
        status="ok",
    )
    return row


def _broadcast_floats(
    values: list[float], device: torch.device, group: dist.ProcessGroup
) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return tensor.tolist()
