"""What each stage of the fused `triton` layer adds to a call's critical path, on a CUDA
device (NOTES.md, version 28):

    python scripts/stage_probe.py [--points olmoe-1b-7b:64 deepseek-v3:8192 ...]
                                  [--ab MOEBENCH_MERGE_TAIL] [--rounds 7] [--json FILE]

A kernel's duration in a profile is not what removing it would save: with dependent
launch (calls of at most 64 tokens on Hopper) each kernel starts under its predecessor's
tail, and a short kernel's cost is mostly the wait at its boundary. So this probe times
the layer's call and its parts, each captured in a CUDA graph, in turns (moebench's own
timer, L2 flushed before each call), on the same weights, input and routing:

- `layer`: the whole call (the Router, the routed experts, the shared experts if any);
- `routed`: the routed experts given the Router's choices (alignment, both GEMMs, the sum
  over slots: `TritonMoE.routed`);
- `gemms+sum`: both GEMMs and the sum over slots, given the alignment;
- `gemms`: both GEMMs alone; `gate_up`, `down`: each alone;
- `router`: the Router alone; `alignment`: the alignment alone.

The GEMMs run with the configs the layer's own first call chose (its forward plan). The
differences are what the stages add on the path: layer - routed is the Router (and the
shared experts), routed - gemms+sum the alignment, gemms+sum - gemms the sum over slots.
`--ab VARIABLE` adds the whole call of a second layer, built, tuned and captured with
that switch on (`VARIABLE=1`; `A,B`: both on), right after the plain call in every
turn, and says whether its output is the plain call's bit for bit; the plain layer and
its stages then run with the switch off (`VARIABLE=0`, whatever its default): an A/B of
a change behind a switch (`MOEBENCH_MERGE_TAIL`, say, whose tiles join the race, or the
tuner's `MOEBENCH_TRITON_RUNOFF`) on the same card, in one process. Each turn's medians
are in the JSON (`turns_us`).
Without CUDA (Triton's interpreter, `TRITON_INTERPRET=1`, a small `--shape`) the stages
run un-graphed, for the tests: nothing there is worth timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator

import torch

from moebench.presets import PRESETS

# The points issue 14 misses (H100, version 34): OLMoE-1B-7B at 64 tokens graphed, the
# middle regime at 1024 tokens and the large batches at 8192.
DEFAULT_POINTS = [
    "olmoe-1b-7b:64", "olmoe-1b-7b:1024", "qwen3-30b-a3b:1024", "mixtral-8x7b:1024",
    "qwen3-30b-a3b:8192", "deepseek-v3:8192",
]  # fmt: skip
STAGES = ("layer", "routed", "gemms+sum", "gemms", "gate_up", "down", "router", "alignment")


def parse_point(text: str) -> tuple[str, int]:
    """ "PRESET:TOKENS" -> (preset, tokens), or SystemExit naming the bad point."""
    preset, _, tokens = text.partition(":")
    if preset not in PRESETS or not tokens.isdigit() or int(tokens) < 1:
        raise SystemExit(
            f"stage_probe: bad point {text!r}: PRESET:TOKENS, PRESET one of {sorted(PRESETS)}"
        )
    return preset, int(tokens)


def stages(layer, x_TD: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each stage of STAGES as a call, on `layer` (a built `triton` layer whose first
    call has run) and its input."""
    from moebench import dependent_launch
    from moebench.impls.triton.align import align_to_blocks, per_assignment_blocks
    from moebench.impls.triton.backward import token_sum
    from moebench.impls.triton.layer import launch_down, launch_gate_up

    (plan,) = layer._plans.values()  # the one inference signature the first call planned
    gates_TK, ids_TK, _ = layer.router(x_TD)
    T, K = ids_TK.shape
    E, F, D = layer.w_down_EFD.shape
    pdl = dependent_launch.for_tokens(x_TD.device, T)

    def align():
        if T == 1:  # as `fused_experts`: one block an assignment
            return per_assignment_blocks(ids_TK, plan.block_m)
        return align_to_blocks(ids_TK, E, plan.block_m, pdl)

    alignment = align()
    h_PF = torch.empty(alignment.max_rows, F, device=x_TD.device, dtype=x_TD.dtype)
    out_AD = torch.empty(T * K, D, device=x_TD.device, dtype=x_TD.dtype)
    gate_A = gates_TK.to(x_TD.dtype).contiguous().view(-1)
    weights = (layer.w_gate_up_E2FD, layer.w_down_EFD)

    def gate_up():
        launch_gate_up(plan.gate_up, x_TD, weights[0], h_PF, alignment, K, None, pdl)

    def down():
        launch_down(plan.down, h_PF, weights[1], gate_A, out_AD, alignment, pdl)

    def gemms_and_sum():
        gate_up()
        down()
        return out_AD if K == 1 else token_sum(out_AD, K, pdl=pdl)

    return {
        "layer": lambda: layer(x_TD),
        "routed": lambda: layer.routed(x_TD, gates_TK, ids_TK),
        "gemms+sum": gemms_and_sum,
        "gemms": lambda: (gate_up(), down()),
        "gate_up": gate_up,
        "down": down,
        "router": lambda: layer.router(x_TD),
        "alignment": align,
    }


@contextlib.contextmanager
def switches_set(variables: str, value: str) -> Iterator[None]:
    """The environment variables named in `variables` (comma-separated) set to `value`
    ("1" or "0") inside, as they were after."""
    names = variables.split(",")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, value))
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def probe(
    hidden: int, ffn: int, experts: int, top_k: int, preset: str | None, tokens: int,
    rounds: int, device: torch.device, ab: str | None = None,
) -> dict[str, object]:  # fmt: skip
    """{"us": {stage: median microseconds}, "turns_us": {stage: each turn's median},
    "same_bits": whether `gemms+sum` gives `routed`'s output bit for bit, and with `ab`
    "ab_same_bits": whether a layer built with that switch on gives the plain call's} at
    one point, the stages timed in turns."""
    from moebench import registry
    from moebench.case import Case, LayerShape, Workload
    from moebench.measure.graph import graphed_step
    from moebench.measure.timing import TimingPlan, time_repeats
    from moebench.weight_sources import make_weights
    from moebench.weights import make_inputs

    shape = PRESETS[preset] if preset else LayerShape(hidden, ffn, experts, top_k)
    cuda = device.type == "cuda"
    case = Case(shape, Workload(tokens, 1, "forward"), "triton", device=device.type,
                dtype="bfloat16" if cuda else "float16", cuda_graph=cuda)  # fmt: skip
    weights = make_weights(case)
    layer = registry.get("triton").build(weights, case)
    x_TD = make_inputs(case, 1)[0]
    plan = TimingPlan(budget_ms=100.0, warmup=2, min_repeats=10, max_repeats=100)
    # the switched call right after the plain one in every turn: their difference is the
    # A/B, and neighbours in a turn see the same clocks
    names = [STAGES[0], *([f"layer, {ab.replace(',', '=1 ')}=1"] if ab else []), *STAGES[1:]]
    samples: dict[str, list[float]] = {name: [] for name in names}
    found: dict[str, object] = {}
    # the plain layer with the switches off (some are on by default), the other with them on
    plain = switches_set(ab, "0") if ab else contextlib.nullcontext()
    with torch.no_grad(), plain:
        plain_out = layer(x_TD).clone()  # tunes, and plans the forward
        calls = stages(layer, x_TD)
        found["same_bits"] = torch.equal(calls["gemms+sum"]().clone(), calls["routed"]())
        if cuda:
            replays = {n: graphed_step(lambda _, c=c: c(), 1, device, n) for n, c in calls.items()}
        else:
            replays = {name: (lambda _, c=call: c()) for name, call in calls.items()}
        if ab:
            # a layer of its own, built, tuned and planned with the switch on: a switch
            # that adds tiles to the race acts when the first call plans the forward
            with switches_set(ab, "1"):
                switched = registry.get("triton").build(weights, case)
                switched_out = switched(x_TD)
                found["ab_same_bits"] = torch.equal(switched_out, plain_out)
                # (a switch whose kernels sum in another order: how far, as a fraction
                # of the output's largest magnitude)
                found["ab_max_diff"] = float(
                    (switched_out.float() - plain_out.float()).abs().max()
                    / plain_out.float().abs().max().clamp_min(1e-30)
                )
                if cuda:  # the switch is read while the graph is captured
                    replays[names[1]] = graphed_step(lambda _: switched(x_TD), 1, device, ab)
            if not cuda:  # read at each call

                def switched_call(_) -> None:
                    with switches_set(ab, "1"):
                        switched(x_TD)

                replays[names[1]] = switched_call
        for round_ in range(rounds):
            for name in names if round_ % 2 == 0 else names[::-1]:
                taken = time_repeats(replays[name], device, plan)
                samples[name].append(statistics.median(taken) * 1e3)
    found["us"] = {name: statistics.median(taken) for name, taken in samples.items()}
    found["turns_us"] = samples  # each turn's median, to see drift and outliers
    return found


def report(label: str, found: dict[str, object]) -> str:
    """The stages' medians, and what each adds on the critical path."""
    us = found["us"]
    lines = [f"{label}: median us of a graphed call (gemms+sum gives routed's bits:"
             f" {found['same_bits']})"]  # fmt: skip
    lines += [f"  {name:10} {taken:10.1f}" for name, taken in us.items()]
    lines.append(
        "  on the path: router (and shared experts) {:.1f}, alignment {:.1f},"
        " sum over slots {:.1f}".format(
            us["layer"] - us["routed"],
            us["routed"] - us["gemms+sum"],
            us["gemms+sum"] - us["gemms"],
        )
    )
    if "ab_same_bits" in found:
        (switched,) = (name for name in us if name not in STAGES)
        lines.append(
            f"  {switched}: {us[switched]:.1f} us against {us['layer']:.1f}"
            f" ({us[switched] / us['layer']:.3f}x), same bits {found['ab_same_bits']}"
            f" (largest difference {found['ab_max_diff']:.2e} of the largest output)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS, metavar="PRESET:TOKENS")
    parser.add_argument(
        "--shape", type=int, nargs=5, metavar=("D", "F", "E", "K", "TOKENS"),
        help="one point of this shape in place of --points (the interpreter's tests)",
    )  # fmt: skip
    parser.add_argument(
        "--ab", metavar="VARIABLE[,VARIABLE]",
        help="also time the call with these switches on (MOEBENCH_MERGE_TAIL, say)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=7, help="turns of every stage")
    parser.add_argument("--json", help="also write what `probe` found at each point to this file")
    args = parser.parse_args(argv)
    interpreted = bool(triton.knobs.runtime.interpret)
    if not (torch.cuda.is_available() or interpreted):
        print("stage_probe: needs a CUDA device (or TRITON_INTERPRET=1 at a small --shape)")
        return 2
    device = torch.device("cpu" if interpreted else "cuda")
    if args.shape:
        hidden, ffn, experts, top_k, tokens = args.shape
        points = [(f"D{hidden} F{ffn} E{experts} K{top_k}:{tokens}", None, tokens)]
    else:
        points = [(text, *parse_point(text)) for text in args.points]
        hidden = ffn = experts = top_k = 0
    found = {}
    for label, preset, tokens in points:
        found[label] = probe(
            hidden, ffn, experts, top_k, preset, tokens, args.rounds, device, args.ab
        )  # fmt: skip
        print(report(label, found[label]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:  # after each point: a call cut at its deadline keeps what finished
            with open(args.json, "w") as out:
                json.dump(found, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
