"""Where the host's time goes in one un-graphed forward or training step of a layer (CUDA).

    python scripts/host_profile.py [--impl triton] [--preset qwen3-30b-a3b ...]
                                   [--tokens 1 64] [--mode forward|train]
                                   [--ab fast-launch|pdl|few-token-logits|piece-logits|
                                         forward-plan]

For each token count and preset: the microseconds per call of the whole layer, of its
router and of its routed part alone (calls queued back to back, one sync at the end:
while the GPU keeps up, wall time per call is the host's time; the layer's line also
gives the host's time to queue the calls, before the sync, and calls the layer
GPU-bound where the wall time is a fifth longer) and of its kernels (torch.profiler),
then the functions that took the most host time (cProfile, by own time) and moebench's
functions by the time under them, and with `--ops N` the N torch ops that took the most
CPU time.
A layer whose host time exceeds its GPU time is launch-bound un-graphed: this says
which calls to trim.

A forward runs under torch.inference_mode, as `moebench run` times it. With `--mode
train` a call is the harness's training step (`case_run._step_fn`: fresh gradients, the
forward, the backward of a fixed output gradient), also timed without its backward; the
router and routed parts are timed at inference (no autograd). With `--ab SWITCH` the
call is also timed with the switch off and on, in turns in one process (`switch_turns`):
`$MOEBENCH_FAST_LAUNCH`, `$MOEBENCH_PDL`, one of the Router's logits kernels, the
few-token one or the pieces' one (off: its cuBLAS path there), or the `triton` layer's
forward plan (off: every call decides again, `layer.ForwardPlan`). With several presets,
their calls are also timed in turns in one process (`preset_turns`): a host's speed
moves between processes and over minutes, so two presets timed apart can differ by what
the host did meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import os
import pstats
from collections.abc import Callable

import torch

from moebench import dependent_launch, fast_launch, logits_kernel, registry
from moebench.case import Case, Workload
from moebench.layer import MoELayer
from moebench.measure.case_run import _step_fn
from moebench.measure.timing import in_turns, queued_and_wall_us
from moebench.presets import PRESETS
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs


def per_call_us(fn, calls: int) -> float:
    """Wall microseconds per call of `fn`, queued back to back (the host's time while
    the device keeps up)."""
    return queued_and_wall_us(fn, calls)[1]


# A wall time this much over the host's queueing time: the device, not the host, set it.
GPU_BOUND_RATIO = 1.2


def describe_call(name: str, fn, calls: int) -> str:
    """`name`, the wall microseconds per call, the host's to queue it, and which of the
    two set the call's time: the host's launches or the device's work (the host queues
    ahead of a slower device until the launch queue is full)."""
    queued, wall = queued_and_wall_us(fn, calls)
    bound = "GPU-bound" if wall > GPU_BOUND_RATIO * queued else "host-bound"
    return f"{name} {wall:.1f} us (queued in {queued:.1f}: {bound})"


@contextlib.contextmanager
def _environment_switch(variable: str, reread: Callable[[], object], on: bool):
    """The switch's environment variable set to `on`, read again as its module reads it;
    restored after."""
    was = os.environ.get(variable)
    os.environ[variable] = "1" if on else "0"
    reread()
    try:
        yield
    finally:
        if was is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = was
        reread()


@contextlib.contextmanager
def _router_rule_switch(rule_name: str, on: bool):
    """Off: `logits_kernel`'s rule `rule_name` refuses every call, so the Router takes its
    next path (the tensor-core path through cuBLAS, for either kernel's rule)."""
    rule = getattr(logits_kernel, rule_name)
    if not on:
        setattr(logits_kernel, rule_name, lambda *args: False)
    try:
        yield
    finally:
        setattr(logits_kernel, rule_name, rule)


@contextlib.contextmanager
def _forward_plan_switch(on: bool):
    """Off: the `triton` layer's calls go without their forward plan (`ForwardPlan`):
    each decides its row blocks and tiles again, asking the tuner."""
    from moebench.impls.triton import layer as triton_layer

    fused_experts = triton_layer.fused_experts

    def without_plan(*args, plans=None, **kwargs):
        return fused_experts(*args, **kwargs)

    if not on:
        triton_layer.fused_experts = without_plan
    try:
        yield
    finally:
        triton_layer.fused_experts = fused_experts


# --ab: a switch, as a context manager of on (True) or off
SWITCHES = {
    "fast-launch": functools.partial(
        _environment_switch, fast_launch.ENV_SWITCH, fast_launch.refresh_switch
    ),
    "pdl": functools.partial(
        _environment_switch, dependent_launch.ENV_SWITCH, dependent_launch.refresh_switch
    ),
    "few-token-logits": functools.partial(_router_rule_switch, "takes_few_token_logits"),
    "piece-logits": functools.partial(_router_rule_switch, "takes_piece_logits"),
    "forward-plan": _forward_plan_switch,
}


def switch_turns(fn, calls: int, switch: str, rounds: int = 8) -> str:
    """The host microseconds per call of `fn` with `switch` off and on, in turns
    (`in_turns`), each side inside the switch's context (`SWITCHES`)."""

    def with_switch(on: bool) -> float:
        with SWITCHES[switch](on):
            return per_call_us(fn, calls)

    sides = {side: functools.partial(with_switch, side) for side in (False, True)}
    median = in_turns(sides, rounds)
    off, on = median[False], median[True]
    return f"{switch} off {off:.1f} us, on {on:.1f} us ({rounds} rounds in turns)"


def preset_turns(
    calls_by_preset: dict[str, Callable[[], object]], calls: int, rounds: int = 8
) -> str:
    """The wall microseconds per call of each preset's call, in turns (`in_turns`)."""
    sides = {
        name: functools.partial(per_call_us, call, calls) for name, call in calls_by_preset.items()
    }
    medians = ", ".join(f"{name} {us:.1f} us" for name, us in in_turns(sides, rounds).items())
    return f"in turns ({rounds} rounds): {medians}"


def layer_call(impl: str, preset: str, tokens: int, mode: str = "forward"):
    """(the layer, its input, a call of it as `moebench run` times it: a forward, or
    the harness's training step if `mode` is "train")."""
    case = Case(
        PRESETS[preset], Workload(tokens, 1, mode), impl,
        device="cuda", dtype="bfloat16", preset=preset,
    )  # fmt: skip
    layer = registry.get(impl).build(make_weights(case), case)
    inputs = make_inputs(case, 1)
    x_TD = inputs[0]
    if mode == "train":
        x_TD.requires_grad_(True)
        return layer, x_TD, functools.partial(_step_fn(case, layer, inputs, {}), 0)
    return layer, x_TD, functools.partial(layer, x_TD)


def timing_mode(mode: str):
    """As `moebench run` times a call: a forward under inference_mode (a layer whose
    weights want gradients runs its training path otherwise), a step with autograd."""
    return torch.inference_mode() if mode == "forward" else torch.enable_grad()


def profile_layer(
    impl: str,
    preset: str,
    tokens: int,
    calls: int,
    top: int,
    mode: str = "forward",
    ops: int = 0,
    ab: str | None = None,
) -> None:
    """Print the host time per call of `impl`'s layer (a forward, or a training step if
    `mode` is "train"), its router and routed part, and the device's kernel time per
    call; then the `top` functions by own time and the `ops` torch ops by own CPU time."""
    layer, x_TD, call = layer_call(impl, preset, tokens, mode)
    parts = [f"== {impl} {preset} {tokens} tokens, {mode}"]
    with timing_mode(mode):
        if mode == "train":
            parts.append(describe_call("step", call, calls))
            forward_us = per_call_us(functools.partial(layer, x_TD), calls)
            parts.append(f"its forward {forward_us:.1f} us")
        else:
            parts.append(describe_call("layer", call, calls))
        if ab:
            parts.append(switch_turns(call, calls, ab))
        if isinstance(layer, MoELayer):  # a router and a routed part to time apart
            with torch.no_grad():
                gate_TK, ids_TK, _ = layer.router(x_TD)
                router_us = per_call_us(lambda: layer.router(x_TD), calls)
                routed_us = per_call_us(lambda: layer.routed(x_TD, gate_TK, ids_TK), calls)
            parts.append(f"router {router_us:.1f} us, routed {routed_us:.1f} us (inference)")
        _profile_calls(call, calls, top, ops, parts)


def _profile_calls(call, calls: int, top: int, ops: int, parts: list[str]) -> None:
    """The kernels' time per call (torch.profiler), printed after `parts`; the `top`
    functions by own time and moebench's by cumulative time (cProfile); the `ops` torch
    ops by own CPU time."""
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
    parser.add_argument("--preset", nargs="+", default=["qwen3-30b-a3b"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--mode", choices=("forward", "train"), default="forward")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--top", type=int, default=25, help="functions listed (0: none)")
    parser.add_argument("--ops", type=int, default=0, help="torch ops listed by CPU time")
    parser.add_argument(
        "--ab",
        choices=sorted(SWITCHES),
        help="time a call with this switch off and on, in turns in one process",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "host_profile.py needs a CUDA device: it times the host against one\n")
    try:
        registry.get(args.impl)
    except registry.RegistryError as error:
        parser.exit(2, f"{error}\n")
    unknown = [preset for preset in args.preset if preset not in PRESETS]
    if unknown:
        parser.exit(2, f"unknown preset {unknown[0]!r}; known: {', '.join(sorted(PRESETS))}\n")
    for tokens in args.tokens:
        for preset in args.preset:
            profile_layer(
                args.impl, preset, tokens, args.calls, args.top, args.mode, args.ops, args.ab
            )
        if len(args.preset) > 1:
            calls = {p: layer_call(args.impl, p, tokens, args.mode)[2] for p in args.preset}
            with timing_mode(args.mode):
                print(f"== {tokens} tokens, {args.mode}, " + preset_turns(calls, args.calls))


if __name__ == "__main__":
    main()
