"""What the timer's L2 flush costs the call it precedes (NOTES.md of the fused layer,
version 9), on a CUDA device:

    python scripts/l2_flush_probe.py [--impl triton] [--preset qwen3-30b-a3b ...] [--tokens 1 64]

1. Whether `L2Flush` (a read of 256 MB) evicts: a 40 MB buffer, read once to warm L2, is
   read again under CUDA events with no flush between (hot), after `L2Flush`, and after
   zeroing a 256 MB buffer (as triton's do_bench flushes). A sleep kernel before each
   repeat keeps the host ahead of the GPU, so no launch gap is timed.
2. What each flush costs a layer: the same graphed forward, timed after a zeroing flush,
   after `L2Flush` and after no flush. The zeroing flush leaves dirty lines that the timed
   call writes back.

Prints medians in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from moebench import registry
from moebench.case import Case, Workload
from moebench.measure.graph import graphed_step
from moebench.measure.timing import L2Flush
from moebench.presets import PRESETS
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs

SLEEP_CYCLES = 200_000


def median_us(call: Callable[[], object], before: Callable[[], object], repeats: int) -> float:
    """Median time of `call()` under CUDA events, `before()` run ahead of each repeat."""
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        before()
        start.record()
        call()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def graphed_forward_us(
    case: Case, flushes: dict[str, Callable[[], object]], repeats: int
) -> dict[str, float]:
    """The median of one graphed forward of `case` after each of `flushes`."""
    device = torch.device("cuda")
    weights = make_weights(case)
    layer = registry.get(case.impl).build(weights, case)
    x_TD = make_inputs(case, 1)[0]
    with torch.no_grad():
        layer(x_TD)  # tunes and warms up outside the capture
        step = graphed_step(lambda i: layer(x_TD), 1, device, case.impl)
        return {name: median_us(lambda: step(0), f, repeats) for name, f in flushes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", default="triton")
    parser.add_argument("--preset", nargs="+", default=["qwen3-30b-a3b", "olmoe-1b-7b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    device = torch.device("cuda")
    read_flush = L2Flush(device)
    zeroed = torch.empty_like(read_flush.buffer)

    buffer = torch.randn(10 * 1024 * 1024, device=device)  # 40 MB: fits the L2 of an H100/H200
    flushes = {"hot": buffer.sum, "L2Flush": lambda: (buffer.sum(), read_flush())}
    flushes["zero_"] = lambda: (buffer.sum(), zeroed.zero_())
    times = {name: median_us(buffer.sum, f, args.repeats) for name, f in flushes.items()}
    print("40 MB read after:", {name: f"{us:.1f}" for name, us in times.items()})

    flushes = {"zero_": zeroed.zero_, "L2Flush": read_flush, "none": lambda: None}
    for preset in args.preset:
        for tokens in args.tokens:
            case = Case(PRESETS[preset], Workload(tokens, 1, "forward"), args.impl,
                        device="cuda", dtype="bfloat16")  # fmt: skip
            times = graphed_forward_us(case, flushes, args.repeats)
            print(f"{args.impl} {preset} {tokens} tokens, graphed, after:",
                  {name: f"{us:.1f}" for name, us in times.items()})  # fmt: skip
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
