"""Where the host's time goes in one un-graphed forward or training step of a layer (CUDA).

    python scripts/host_profile.py [--impl triton] [--preset qwen3-30b-a3b] [--tokens 1 64]
                                   [--mode forward|train]

For each token count: the microseconds per call of the whole layer, of its router and
of its routed part alone (calls queued back to back, one sync at the end: while the GPU
keeps up, wall time per call is the host's time) and of its kernels (torch.profiler),
then the functions that took the most host time (cProfile, by own time) and moebench's
functions by the time under them, and with `--ops N` the N torch ops that took the most
CPU time.
A layer whose host time exceeds its GPU time is launch-bound un-graphed: this says
which calls to trim.

With `--mode train` a call is the harness's training step (`case_run._step_fn`: fresh
gradients, the forward, the backward of a fixed output gradient), also timed without
its backward; the router and routed parts are timed at inference (no autograd).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import time

import torch

from moebench import registry
from moebench.case import Case, Workload
from moebench.layer import MoELayer
from moebench.measure.case_run import _step_fn
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


def profile_layer(
    impl: str, preset: str, tokens: int, calls: int, top: int, mode: str = "forward", ops: int = 0
) -> None:
    """Print the host time per call of `impl`'s layer (a forward, or a training step if
    `mode` is "train"), its router and routed part, and the device's kernel time per
    call; then the `top` functions by own time and the `ops` torch ops by own CPU time."""
    case = Case(
        PRESETS[preset], Workload(tokens, 1, mode), impl,
        device="cuda", dtype="bfloat16", preset=preset,
    )  # fmt: skip
    layer = registry.get(impl).build(make_weights(case), case)
    inputs = make_inputs(case, 1)
    x_TD = inputs[0]
    parts = [f"== {impl} {preset} {tokens} tokens, {mode}"]
    if mode == "train":
        x_TD.requires_grad_(True)
        call = functools.partial(_step_fn(case, layer, inputs, {}), 0)
        parts.append(f"step {per_call_us(call, calls):.1f} us")
        parts.append(f"its forward {per_call_us(functools.partial(layer, x_TD), calls):.1f} us")
    else:
        call = functools.partial(layer, x_TD)
        parts.append(f"layer {per_call_us(call, calls):.1f} us")
    if isinstance(layer, MoELayer):  # a router and a routed part to time apart
        with torch.no_grad():
            gate_TK, ids_TK, _ = layer.router(x_TD)
            router_us = per_call_us(lambda: layer.router(x_TD), calls)
            routed_us = per_call_us(lambda: layer.routed(x_TD, gate_TK, ids_TK), calls)
        parts.append(f"router {router_us:.1f} us, routed {routed_us:.1f} us (inference)")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    events = profiler.key_averages()
    # the kernels' own rows (an op's row repeats the time of the kernels it launched)
    kernels = (e for e in events if e.device_type != torch.autograd.DeviceType.CPU)
    device_us = sum(e.self_device_time_total for e in kernels) / calls
    parts.append(f"kernels {device_us:.1f} us (per call, calls queued back to back)")
    print(", ".join(parts))
    if ops:
        print(events.table(sort_by="self_cpu_time_total", row_limit=ops, max_name_column_width=60))
    if top:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(calls):
            call()
        profile.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(top)
        # and moebench's own functions by the time under them: which step to trim
        stats.sort_stats("cumulative").print_stats("moebench", top)
        print(text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="triton")
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--mode", choices=("forward", "train"), default="forward")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--top", type=int, default=25, help="functions listed (0: none)")
    parser.add_argument("--ops", type=int, default=0, help="torch ops listed by CPU time")
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
        profile_layer(args.impl, args.preset, tokens, args.calls, args.top, args.mode, args.ops)


if __name__ == "__main__":
    main()
