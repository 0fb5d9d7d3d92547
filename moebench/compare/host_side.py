"""Cases that moved on the host's side of the call: an un-graphed case judged improved or
regressed whose CUDA-graphed twin (the same case with `cuda_graph = true`, which suites
time beside the launch-bound points) was judged unchanged.

A graph replays the call's kernels from one launch, so the twin times the GPU's work
alone. Where it held and the un-graphed case moved, what moved is the host's share of
the call (its launches, Python and the torch ops around the kernels), which moves with
the host machine as much as with the code. The host-speed warning (`drift.py`,
`ceilings.host_op_us`) times one torch op and missed this between two H200 machines:
2.2 and 1.8 us a torch op, while the `triton` layer's un-graphed one-token forward on
Qwen3-30B-A3B took 0.343 and 0.116 ms with the same kernels, its graphed twin 0.0323 and
0.0314 (`results/reference/h200-triton-v26/` and `h200-triton-v33/`).
"""

from __future__ import annotations

from collections.abc import Sequence

from moebench.compare.report import CaseResult
from moebench.compare.runs import fields_key

MOVED = ("improved", "regressed")
# Moved cases the note names; the rest it counts
NAMED = 3


def host_side_moves(results: Sequence[CaseResult]) -> list[tuple[CaseResult, CaseResult]]:
    """(un-graphed case, its graphed twin) for every case judged improved or regressed
    whose twin was judged unchanged, in `results`' order."""
    twins = {
        fields_key(result.fields, ("cuda_graph",)): result
        for result in results
        if result.fields.get("cuda_graph") is True
    }
    pairs = []
    for result in results:
        if result.verdict not in MOVED or result.fields.get("cuda_graph") is True:
            continue
        twin = twins.get(fields_key(result.fields, ("cuda_graph",)))
        if twin is not None and twin.verdict == "unchanged" and twin.ratio is not None:
            pairs.append((result, twin))
    return pairs


def host_side_note(results: Sequence[CaseResult]) -> str | None:
    """A sentence on `host_side_moves`, naming the first NAMED with both ratios; None
    where there are none."""
    pairs = host_side_moves(results)
    if not pairs:
        return None
    named = "; ".join(
        f"{case.label} x{case.ratio:.3g} (graphed x{twin.ratio:.3g})"
        for case, twin in pairs[:NAMED]
        if case.ratio is not None
    )
    more = f"; {len(pairs) - NAMED} more" if len(pairs) > NAMED else ""
    cases = "case moved while its twin" if len(pairs) == 1 else "cases moved while their twins"
    return (
        f"{len(pairs)} un-graphed {cases} under a CUDA graph held: what moved is the host's"
        " share of the call (launches, Python), which moves with the host machine as much"
        f" as with the code: {named}{more}"
    )
