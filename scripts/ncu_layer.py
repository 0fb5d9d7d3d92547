"""One forward of the fused `triton` layer per preset and token count, inside
cudaProfilerStart/Stop, for Nsight Compute's hardware counters on a card:

    ncu --clock-control none --profile-from-start off -k regex:"gate_up|down" \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --section Occupancy --section LaunchStats \\
        python scripts/ncu_layer.py qwen3-30b-a3b:8192 olmoe-1b-7b:1024

(`scripts/gpu_session.sh ncu` runs that). Each layer is built on the preset's shape and
called three times first (its tuning, shipped or not, and warm caches), so that the
profiled call is the kernels a timed call runs. `--clock-control none` leaves the clocks
as the power cap sets them, as the timed runs see them (the device notes ask for it).
"""

from __future__ import annotations

import argparse

import torch

from moebench import registry
from moebench.case import Case, Workload
from moebench.presets import PRESETS
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs

WARM_UP_CALLS = 3


def profiled_forward(preset: str, tokens: int) -> None:
    """Build `preset`'s triton layer, warm it up, and run one forward inside the
    profiler's range (under inference_mode, as `moebench run` times a forward)."""
    case = Case(
        PRESETS[preset], Workload(tokens, 1, "forward"), "triton",
        device="cuda", dtype="bfloat16", preset=preset,
    )  # fmt: skip
    layer = registry.get("triton").build(make_weights(case), case)
    x_TD = make_inputs(case, 1)[0]
    with torch.inference_mode():
        for _ in range(WARM_UP_CALLS):
            layer(x_TD)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        layer(x_TD)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    del layer, x_TD
    torch.cuda.empty_cache()


def case(text: str) -> tuple[str, int]:
    """PRESET:TOKENS, checked."""
    preset, _, tokens = text.partition(":")
    if preset not in PRESETS or not tokens.isdigit() or int(tokens) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want PRESET:TOKENS, PRESET one of {', '.join(sorted(PRESETS))}"
        )
    return preset, int(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", type=case, metavar="PRESET:TOKENS")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    for preset, tokens in args.cases:
        profiled_forward(preset, tokens)
        print(f"profiled {preset} {tokens} tokens", flush=True)


if __name__ == "__main__":
    main()
