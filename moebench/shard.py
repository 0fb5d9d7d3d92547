"""`moebench run SUITE --shard I/N`: one deterministic Nth of a suite's cases.

Every machine computes the same split from the same cases (no coordination): cases are
dealt longest first (by expected cost, ties by case_id) to the shard with the least cost
so far, then each shard runs its cases in the suite's order. `moebench merge` joins the
shards' runs into one (moebench.merge).

Expected cost of a case: a fixed part (worker hand-off, build, correctness check and the
timing budget's floor, the same for every case) plus the FLOPs of one call, counted as
`moebench.measure.counters` does (2 x tokens x active parameters, x3 in train mode), in
GFLOP. A model of the work, not a measurement: it keeps the big cases apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from moebench.case import Case

# The cost of a case that does no work, in the same unit as its GFLOP (about a second's
# worth of host-side overhead on a CPU that does tens of GFLOP/s).
CASE_OVERHEAD_COST = 1.0


class ShardError(ValueError):
    """A --shard value that does not parse or leaves a shard empty."""


def parse_shard(text: str) -> tuple[int, int]:
    """'2/3' -> (2, 3): shard 2 of 3, counted from 1.

    >>> parse_shard("1/4")
    (1, 4)
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ShardError(f"--shard {text!r}: expected I/N, e.g. 1/4 (shard I of N, from 1)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise ShardError(f"--shard {text!r}: I must be between 1 and N (N >= 1)")
    return index, count


def expected_cost(case: Case) -> float:
    """The fixed per-case part plus one call's GFLOP (module docstring)."""
    shape, workload = case.shape, case.workload
    active = shape.hidden * shape.ffn * 3 * (shape.top_k + shape.shared_experts)
    flops = 2 * workload.tokens * active * workload.layers
    if workload.mode == "train":
        flops *= 3
    return CASE_OVERHEAD_COST + flops / 1e9


def assign_shards(cases: Sequence[Case], count: int) -> list[int]:
    """The shard (0-based) of each case: longest-processing-time-first dealing."""
    loads = [0.0] * count
    shard_of: dict[str, int] = {}
    for case in sorted(cases, key=lambda c: (-expected_cost(c), c.case_id)):
        shard = min(range(count), key=lambda s: (loads[s], s))
        loads[shard] += expected_cost(case)
        shard_of[case.case_id] = shard
    return [shard_of[case.case_id] for case in cases]


def select_shard(cases: Sequence[Case], index: int, count: int) -> list[Case]:
    """The cases of shard `index` of `count` (from 1), in their suite order."""
    shards = assign_shards(cases, count)
    chosen = [case for case, shard in zip(cases, shards) if shard == index - 1]
    if not chosen:
        raise ShardError(
            f"--shard {index}/{count}: no case falls in this shard ({len(cases)} cases "
            f"for {count} shards); use at most {len(cases)} shards"
        )
    return chosen
