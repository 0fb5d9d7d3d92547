"""Where the host's time goes in one un-graphed forward of a layer (CUDA).

    python scripts/host_profile.py [--impl triton] [--preset qwen3-30b-a3b] [--tokens 1 64]

For each token count: the host microseconds per call of the whole layer, of its router
and of its routed part alone (calls queued back to back, one sync at the end: while the
GPU keeps up, wall time per call is the host's time), then the functions that took the
most host time (cProfile, by own time). A layer whose host time exceeds its GPU time is
launch-bound un-graphed: this says which calls to trim.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from moebench import registry
from moebench.case import Case, Workload
from moebench.presets import PRESETS
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs


def per_call_us(fn, calls: int) -> float:
    """Host microseconds per call of `fn`, queued back to back."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def profile_layer(impl: str, preset: str, tokens: int, calls: int, top: int) -> None:
    """Print the host time per call of `impl`'s layer, router and routed part, then the
    `top` functions by own time."""
    case = Case(
        PRESETS[preset], Workload(tokens, 1, "forward"), impl,
        device="cuda", dtype="bfloat16", preset=preset,
    )  # fmt: skip
    layer = registry.get(impl).build(make_weights(case), case)
    x_TD = make_inputs(case, 1)[0]
    with torch.no_grad():
        gate_TK, ids_TK, _ = layer.router(x_TD)
        layer_us = per_call_us(lambda: layer(x_TD), calls)
        router_us = per_call_us(lambda: layer.router(x_TD), calls)
        routed_us = per_call_us(lambda: layer.routed(x_TD, gate_TK, ids_TK), calls)
        print(
            f"== {impl} {preset} {tokens} tokens: layer {layer_us:.1f} us, "
            f"router {router_us:.1f} us, routed {routed_us:.1f} us (host, per call)"
        )
        if top:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(calls):
                layer(x_TD)
            profile.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
            print(text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="triton")
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--top", type=int, default=25, help="functions listed (0: none)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "host_profile.py needs a CUDA device: it times the host against one\n")
    try:
        registry.get(args.impl)
    except registry.RegistryError as error:
        parser.exit(2, f"{error}\n")
    if args.preset not in PRESETS:
        parser.exit(2, f"unknown preset {args.preset!r}; known: {', '.join(sorted(PRESETS))}\n")
    for tokens in args.tokens:
        profile_layer(args.impl, args.preset, tokens, args.calls, args.top)


if __name__ == "__main__":
    main()
