"""What programmatic dependent launch (PDL) gives the fused layer, on a CUDA device:

    python scripts/dependent_launch_probe.py [--preset qwen3-30b-a3b ...] [--tokens 1 64 1024]

For each preset and token count, the whole `triton` layer (router, alignment, the two
GEMMs, the sum over slots) is captured in a CUDA graph twice in one process, once with
its kernels launched plainly (`$MOEBENCH_PDL=0`) and once with PDL, on the same weights
and input. The two graphs are timed in turns (plain, PDL, plain, PDL, ...) by moebench's
own timer (L2 flushed before each call, 500 ms of calls back to back first), so that the
card's clock and temperature fall on both alike. Prints each one's median over the
rounds in microseconds, the ratio, and whether the outputs are the same bits.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from moebench import dependent_launch, registry
from moebench.case import Case, Workload
from moebench.measure.graph import graphed_step
from moebench.measure.timing import TimingPlan, time_repeats
from moebench.presets import PRESETS
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs

PLAN = TimingPlan(budget_ms=200.0, warmup=2, min_repeats=20, max_repeats=200, warmup_ms=500.0)


def probe(preset: str, tokens: int, rounds: int, device: torch.device) -> str:
    """One line: the layer's graphed call timed plainly and with PDL, in turns."""
    case = Case(PRESETS[preset], Workload(tokens, 1, "forward"), "triton",
                device="cuda", dtype="bfloat16", cuda_graph=True)  # fmt: skip
    layer = registry.get("triton").build(make_weights(case), case)
    x_TD = make_inputs(case, 1)[0]
    graphs, outputs = {}, {}
    with torch.no_grad():
        for name, switch in (("plain", "0"), ("PDL", "1")):
            os.environ[dependent_launch.ENV_SWITCH] = switch
            dependent_launch.refresh_switch()
            holder: list[torch.Tensor] = []
            graphs[name] = graphed_step(
                lambda _, h=holder: h.append(layer(x_TD)), 1, device, "triton"
            )
            graphs[name](0)
            outputs[name] = holder[-1].clone()
        os.environ.pop(dependent_launch.ENV_SWITCH)
        dependent_launch.refresh_switch()
        samples: dict[str, list[float]] = {"plain": [], "PDL": []}
        for _ in range(rounds):
            for name, replay in graphs.items():
                samples[name].append(statistics.median(time_repeats(replay, device, PLAN)))
    plain_us, pdl_us = (statistics.median(samples[n]) * 1e3 for n in ("plain", "PDL"))
    same = torch.equal(outputs["plain"], outputs["PDL"])
    turns = " ".join(f"{a * 1e3:.1f}/{b * 1e3:.1f}" for a, b in zip(*samples.values()))
    return (
        f"{preset} {tokens} tokens: plain {plain_us:.1f} us, PDL {pdl_us:.1f} us "
        f"({pdl_us / plain_us:.3f}x), same bits {same}; turns plain/PDL {turns}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    presets = ["qwen3-30b-a3b", "olmoe-1b-7b", "mixtral-8x7b", "deepseek-v3"]
    parser.add_argument("--preset", nargs="+", default=presets, choices=sorted(PRESETS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 1024])
    parser.add_argument("--rounds", type=int, default=3, help="turns of each (default 3)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    device = torch.device("cuda")
    if not dependent_launch.enabled(device):
        parser.error("PDL is off on this device (compute capability < 9.0, or $MOEBENCH_PDL)")
    for preset in args.preset:
        for tokens in args.tokens:
            print(probe(preset, tokens, args.rounds, device), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
