"""Where the Router's few-token logits kernel beats its cuBLAS path, on a CUDA device:

    python scripts/router_probe.py [--preset qwen3-30b-a3b ...] [--tokens 1 2 4 8 16]

For each preset and token count, the whole Router (logits, then the top-k kernel) is
captured in a CUDA graph and timed by `triton.testing.do_bench_cudagraph` twice: with
its logits from `route_kernel.few_token_logits_kernel` (float32 partial sums) and from
the cuBLAS path (the tensor cores' three bfloat16 pieces). Prints both medians in
microseconds and whether the two picked the same experts. `takes_few_token_logits`
holds the limits this measured on the H200 (the fused layer's NOTES.md, version 11).
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench_cudagraph

from moebench import route_kernel
from moebench.case import Case, Workload
from moebench.presets import PRESETS
from moebench.routing import Router
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    presets = ["qwen3-30b-a3b", "olmoe-1b-7b", "mixtral-8x7b", "deepseek-v3"]
    parser.add_argument("--preset", nargs="+", default=presets)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    args = parser.parse_args()
    if max(args.tokens) > route_kernel.FEW_TOKENS:
        parser.error(f"--tokens: the kernel computes at most {route_kernel.FEW_TOKENS}")
    rule = route_kernel.takes_few_token_logits
    for preset in args.preset:
        for tokens in args.tokens:
            case = Case(PRESETS[preset], Workload(tokens, 1, "forward"), "reference",
                        device="cuda", dtype="bfloat16")  # fmt: skip
            weights = make_weights(case)
            router = Router(
                weights.w_router_DE, weights.router_bias_E, weights.shape,
                weights.correction_bias_E,
            ).cuda()  # fmt: skip
            x_TD = make_inputs(case, 1)[0]
            timed = {}
            with torch.no_grad():
                for path, takes in (("kernel", True), ("cuBLAS", False)):
                    route_kernel.takes_few_token_logits = lambda t, d, takes=takes: takes
                    experts = router(x_TD)[1]
                    us = do_bench_cudagraph(lambda r=router, x=x_TD: r(x), rep=200) * 1e3
                    timed[path] = (us, experts)
            route_kernel.takes_few_token_logits = rule
            same = bool((timed["kernel"][1] == timed["cuBLAS"][1]).all())
            print(
                f"{preset} {tokens} tokens: kernel {timed['kernel'][0]:.1f} us, cuBLAS path "
                f"{timed['cuBLAS'][0]:.1f} us, same experts {same}, "
                f"the Router takes the kernel: {rule(tokens, case.shape.hidden)}"
            )


if __name__ == "__main__":
    main()
