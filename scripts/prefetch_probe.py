"""What reading the first experts' gate|up weights into L2 during the router gives the
fused layer (moebench/impls/triton/prefetch.py), on a CUDA device:

    python scripts/prefetch_probe.py [--preset qwen3-30b-a3b ...] [--tokens 64 1024]
        [--budget-mb 0 12 24 36 48]

For each case and each read-ahead budget (0: none), the same layer's forward is timed
after the timer's L2 flush (`L2Flush`), both as a CUDA graph (a sleep kernel first, so the
host stays ahead) and as plain calls (host launches included; these never read ahead, so
they should not move with the budget). Prints medians in microseconds and checks that
every budget gives the same output, bit for bit.
"""

from __future__ import annotations

import argparse

import torch
from l2_flush_probe import median_us

from moebench import registry
from moebench.case import Case, Workload
from moebench.impls.triton import align
from moebench.measure.graph import graphed_step
from moebench.measure.timing import L2Flush
from moebench.presets import PRESETS
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs


def probe(case: Case, budgets_mb: list[int], repeats: int, flush: L2Flush) -> None:
    """Print graphed and plain medians of `case`'s forward at each budget."""
    weights = make_weights(case)
    layer = registry.get(case.impl).build(weights, case)
    x_TD = make_inputs(case, 1)[0]
    outputs = []
    with torch.no_grad():
        for budget_mb in budgets_mb:
            layer.l2_prefetch_bytes = budget_mb * 1024 * 1024
            outputs.append(layer(x_TD).clone())  # tunes and warms up outside the capture
            step = graphed_step(lambda i: layer(x_TD), 1, x_TD.device, case.impl)
            graphed = median_us(lambda step=step: step(0), flush, repeats)
            plain = median_us(lambda: layer(x_TD), flush, repeats, sleep=False)
            print(f"{case.preset} {case.tokens} tokens, read-ahead {budget_mb} MB:"
                  f" graphed {graphed:.1f} us, plain {plain:.1f} us", flush=True)  # fmt: skip
    same = all(torch.equal(outputs[0], out) for out in outputs[1:])
    print(f"{case.preset} {case.tokens} tokens: outputs identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["qwen3-30b-a3b", "olmoe-1b-7b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 1024])
    parser.add_argument("--budget-mb", nargs="+", type=int, default=[0, 12, 24, 36, 48])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument(
        "--three-kernel-alignment",
        action="store_true",
        help="align with the three kernels where one program would (align.py), to time both",
    )
    args = parser.parse_args()
    if args.three_kernel_alignment:
        align.MEDIUM_ASSIGNMENTS = 0
    flush = L2Flush(torch.device("cuda"))
    for preset in args.preset:
        for tokens in args.tokens:
            case = Case(PRESETS[preset], Workload(tokens, 1, "forward"), "triton",
                        device="cuda", dtype="bfloat16", preset=preset)  # fmt: skip
            probe(case, args.budget_mb, args.repeats, flush)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
