"""Which logits path makes the Router fastest, on a CUDA device:

    python scripts/router_probe.py [--preset qwen3-30b-a3b ...] [--tokens 1 8 64 1024 ...]
        [--piece-configs 0:32:4:3 8:64:4:3 ...]

For each preset and token count, the whole Router (logits, then the top-k kernel) is
captured in a CUDA graph and timed by `triton.testing.do_bench_cudagraph`, and timed
un-graphed (calls queued back to back: the host's time where it is the slower), with its
logits from each path that computes that many tokens:
`logits_kernel.few_token_logits_kernel` (float32 partial sums on the CUDA cores,
"few-token"), `logits_kernel.piece_logits_kernel` (the three bfloat16 pieces on the
tensor cores in one Triton launch, "pieces", once per `--piece-configs` entry
MAX_PARTS:BLOCK_E:NUM_WARPS:NUM_STAGES, 0 parts for the kernel's own choice) and cuBLAS
(the same pieces through torch.mm, "cuBLAS"). Prints each path's medians in
microseconds, whether it picked the same experts as cuBLAS, and the path the Router
takes. `takes_few_token_logits` and `takes_piece_logits` hold the limits this measured
on the H200 (the fused layer's NOTES.md, versions 11 and 21).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Iterator

import torch
from triton.testing import do_bench_cudagraph

from moebench import logits_kernel
from moebench.case import Case, Workload
from moebench.measure.timing import queued_and_wall_us
from moebench.presets import PRESETS
from moebench.routing import Router
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs


@contextlib.contextmanager
def logits_path(name: str, piece_config: tuple[int, ...] = ()) -> Iterator[None]:
    """The Router's logits from path `name` alone while inside (its rules restored after)."""
    saved = (
        logits_kernel.takes_few_token_logits,
        logits_kernel.takes_piece_logits,
        logits_kernel.piece_logits,
    )
    logits_kernel.takes_few_token_logits = lambda tokens, hidden: name == "few-token"
    logits_kernel.takes_piece_logits = lambda x_TD, experts: name == "pieces"
    if piece_config:
        max_parts, block_e, num_warps, num_stages = piece_config
        logits_kernel.piece_logits = functools.partial(
            saved[2], max_parts=max_parts or None, block_e=block_e, num_warps=num_warps,
            num_stages=num_stages,
        )  # fmt: skip
    try:
        yield
    finally:
        (
            logits_kernel.takes_few_token_logits,
            logits_kernel.takes_piece_logits,
            logits_kernel.piece_logits,
        ) = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    presets = ["qwen3-30b-a3b", "olmoe-1b-7b", "mixtral-8x7b", "deepseek-v3"]
    parser.add_argument("--preset", nargs="+", default=presets)
    parser.add_argument(
        "--tokens", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 256, 1024]
    )
    parser.add_argument(
        "--piece-configs", nargs="+", default=["0:32:4:3"],
        metavar="PARTS:BLOCK_E:WARPS:STAGES",
    )  # fmt: skip
    args = parser.parse_args()
    piece_configs = [tuple(int(v) for v in c.split(":")) for c in args.piece_configs]
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
            takes_few = logits_kernel.takes_few_token_logits(tokens, case.shape.hidden)
            takes_pieces = not takes_few and logits_kernel.takes_piece_logits(
                x_TD, case.shape.num_experts
            )
            runs = [("cuBLAS", ())]
            if tokens <= logits_kernel.FEW_TOKENS:
                runs.append(("few-token", ()))
            runs += [("pieces", config) for config in piece_configs]
            timed = []
            with torch.no_grad():
                for name, config in runs:
                    with logits_path(name, config):
                        chosen_TK = router(x_TD)[1]
                        us = do_bench_cudagraph(lambda r=router, x=x_TD: r(x), rep=200) * 1e3
                        host_us = queued_and_wall_us(lambda r=router, x=x_TD: r(x), 200)[1]
                    label = name + (":" + ":".join(map(str, config)) if config else "")
                    timed.append((label, us, host_us, chosen_TK))
            cublas_experts = timed[0][3]
            takes = "few-token" if takes_few else ("pieces" if takes_pieces else "cuBLAS")
            cells = ", ".join(
                f"{label} {us:.1f} us ({host_us:.1f} un-graphed)"
                + ("" if torch.equal(e, cublas_experts) else " (other experts)")
                for label, us, host_us, e in timed
            )
            print(f"{preset} {tokens} tokens: {cells}; the Router takes {takes}", flush=True)


if __name__ == "__main__":
    main()
