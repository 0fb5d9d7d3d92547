"""What an expert's last block (its tail) costs in the fused layer's gate_up or down GEMM,
per kind of tile, with and without HALF_TAIL and MERGE_TAIL (CUDA; NOTES.md, versions 18,
19 and 28).

    python scripts/tail_probe.py [--preset deepseek-v3 | --shape D F E K]
                                 [--gemm gate_up | down]
                                 [--rows 256 288 320 384] [--block-m 128]
                                 [--group-m 8 [3 ...]] [--only VARIANT ...]
                                 [--warm-s 3] [--rounds 8] [--json FILE]

Every expert gets exactly n rows (token t's slots go to experts t K, ..., t K + K - 1,
mod E), so at 128-row blocks n = 256 is two full blocks an expert, 288 adds a tail of 32
rows, 320 one of 64 and 384 a full third block: a tail's cost is the time over n =
256's, and HALF_TAIL's saving is that of its first-half path, MERGE_TAIL's that of
computing the tail with the block before it. The gate_up variants (one tile each, 128 x
128 x 64 at 8 warps and 4 stages, the tuner's usual winner at these shapes): the pointer
tile (`kernels.py`), the TMA tile (`tma.py`, the gather of x included), the TMA tile
with ONE_DOT, and with ONE_DOT and GATHER_A (A loaded by pointers from x's rows, TMA for
the weights only), each with and without HALF_TAIL; and 64 columns wide, ONE_DOT's tile
with HALF_TAIL beside `merge_tail.py`'s (a tail of at most half a block computed with
its expert's block before it), with and without GATHER_A, and merge_tail.py's 128-wide
tile on 16 warps (W16); the pointer tile 64 wide with HALF_TAIL beside merge_tail.py's,
and its 128-wide one on 16 warps; on a Hopper card, Gluon's warp-specialised tile
(`gluon_gate_up.py`). The down variants: the pointer and TMA tiles 128 columns wide,
with and without HALF_TAIL, and merge_tail.py's; the TMA tile 256 wide with HALF_TAIL
beside merge_tail.py's on 8 and 16 warps; on a Hopper card, `gluon_down.py`'s 256-wide
tile. The card's clock falls under its power cap within a second of GEMMs, so every
variant is run for `--warm-s` seconds, then all are timed in turns, `--rounds` times
(median, ms). Each variant's output (h, or the per-assignment rows of down) on the real
rows is also compared with the first variant's: the largest difference is printed beside
its time (0 where they agree bit for bit).

Under Triton's interpreter (`TRITON_INTERPRET=1`) it runs on a CPU at a small `--shape`
in float16, for the tests: nothing there is worth timing. For where the time goes inside
a variant, run one variant under Nsight Compute (`ncu --kernel-name regex:gate_up`).

`--group-m` races the tile order too: GROUP_M row blocks walk the columns together, so
that their weight tiles are read from HBM once and from L2 after. With 3 blocks an expert
(`--rows 288` or 384) and GROUP_M = 8, every third group splits an expert between two
groups, whose weight tiles are then read from HBM twice; GROUP_M = 3 splits none (NOTES.md,
version 37). Several values label each variant with its own (`G3`, `G8`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable

import torch

from moebench.measure import timing
from moebench.presets import PRESETS

VARIANTS = {
    "pointer": {},
    "pointer, HALF_TAIL": {"HALF_TAIL": True},
    "TMA": {"TMA": True},
    "TMA, HALF_TAIL": {"TMA": True, "HALF_TAIL": True},
    "TMA, ONE_DOT": {"TMA": True, "ONE_DOT": True},
    "TMA, ONE_DOT, HALF_TAIL": {"TMA": True, "ONE_DOT": True, "HALF_TAIL": True},
    "TMA, GATHER_A": {"TMA": True, "ONE_DOT": True, "GATHER_A": True},
    "TMA, GATHER_A, HALF_TAIL": {
        "TMA": True,
        "ONE_DOT": True,
        "GATHER_A": True,
        "HALF_TAIL": True,
    },
    # merge_tail.py's tiles hold a second accumulator for the tail: 64 columns of gate
    # and of up (128 spill); beside them, tma.py's tile of that width
    "TMA, ONE_DOT, N64, HALF_TAIL": {
        "TMA": True,
        "ONE_DOT": True,
        "HALF_TAIL": True,
        "BLOCK_N": 64,
    },
    "TMA, ONE_DOT, N64, MERGE_TAIL": {
        "TMA": True,
        "ONE_DOT": True,
        "HALF_TAIL": True,
        "MERGE_TAIL": True,
        "BLOCK_N": 64,
    },
    "TMA, ONE_DOT, W16, MERGE_TAIL": {
        "TMA": True,
        "ONE_DOT": True,
        "HALF_TAIL": True,
        "MERGE_TAIL": True,
        "num_warps": 16,
    },
    "pointer, N64, HALF_TAIL": {"HALF_TAIL": True, "BLOCK_N": 64},
    "pointer, N64, MERGE_TAIL": {"HALF_TAIL": True, "MERGE_TAIL": True, "BLOCK_N": 64},
    "pointer, W16, MERGE_TAIL": {"HALF_TAIL": True, "MERGE_TAIL": True, "num_warps": 16},
    "TMA, GATHER_A, N64, MERGE_TAIL": {
        "TMA": True,
        "ONE_DOT": True,
        "GATHER_A": True,
        "HALF_TAIL": True,
        "MERGE_TAIL": True,
        "BLOCK_N": 64,
    },
    # Gluon's warp-specialised tile (gluon_gate_up.py; Hopper only)
    "Gluon": {"GLUON_WS": True, "STAGES": 4},
}
DOWN_VARIANTS = {
    "pointer": {},
    "pointer, HALF_TAIL": {"HALF_TAIL": True},
    "TMA": {"TMA": True},
    "TMA, HALF_TAIL": {"TMA": True, "HALF_TAIL": True},
    "TMA, MERGE_TAIL": {"TMA": True, "HALF_TAIL": True, "MERGE_TAIL": True},
    "TMA, N256, HALF_TAIL": {"TMA": True, "HALF_TAIL": True, "BLOCK_N": 256},
    "TMA, N256, MERGE_TAIL": {"TMA": True, "HALF_TAIL": True, "MERGE_TAIL": True, "BLOCK_N": 256},
    "TMA, N256, W16, MERGE_TAIL": {
        "TMA": True,
        "HALF_TAIL": True,
        "MERGE_TAIL": True,
        "BLOCK_N": 256,
        "num_warps": 16,
    },
    "Gluon, N256": {"GLUON_WS": True, "BLOCK_N": 256, "STAGES": 4},
}


def tile(block_m: int, variant: dict, on_cpu: bool, group_m: int = 8) -> dict:
    """The probe's gate_up config for `variant` at `block_m` rows: 128 columns unless the
    variant says (a narrower tile on a CPU, where the interpreter's time grows with it),
    `group_m` row blocks a group."""
    variant = dict(variant)
    block_n = variant.pop("BLOCK_N", 128)
    block_n, block_k = (32, 32) if on_cpu else (block_n, 64)
    return {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m,
        "num_warps": 8, "num_stages": 4, **variant,
    }  # fmt: skip


GEMMS = {"gate_up": VARIANTS, "down": DOWN_VARIANTS}


def probe(
    D: int, F: int, E: int, K: int, rows_per_expert: list[int], block_m: int,
    warm_s: float, rounds: int, device: str, dtype: torch.dtype, gemm: str = "gate_up",
    group_ms: tuple[int, ...] = (8,), only: tuple[str, ...] = (),
    token_counts: tuple[int, ...] = (),
) -> dict[str, dict[str, float]]:  # fmt: skip
    """{"<rows> <variant>": {"ms": median, "max_diff": largest |output - first variant's
    output| on the real rows}} for each rows-per-expert count and `gemm`'s variants (those
    named in `only`, if any), at each GROUP_M of `group_ms` (labelled " G<n>" when more
    than one); and for each of `token_counts`, the same on random routing ("<T>tok": each
    token's K experts drawn uniformly, so the experts' rows vary as a layer's do)."""
    from moebench.impls.triton.align import align_to_blocks
    from moebench.impls.triton.layer import launch_down, launch_gate_up

    gen = torch.Generator(device=device).manual_seed(0)
    w_E2FD = torch.randn(E, 2 * F, D, device=device, dtype=dtype, generator=gen) * 0.02
    w_down_EFD = torch.randn(E, F, D, device=device, dtype=dtype, generator=gen) * 0.02
    variants = {}
    for name, variant in GEMMS[gemm].items():
        if (only and name not in only) or (variant.get("GLUON_WS") and device == "cpu"):
            continue  # (Gluon has no interpreter)
        for group_m in group_ms:
            label = name + (f" G{group_m}" if len(group_ms) > 1 else "")
            variants[label] = (variant, group_m)
    runs: dict[str, Callable[[], object]] = {}
    outputs: dict[str, torch.Tensor] = {}
    real_rows: dict[str, torch.Tensor | slice] = {}
    cases = []
    for rows in rows_per_expert:
        if rows * E % K:
            raise SystemExit(f"--rows {rows}: {rows} x {E} experts is no whole number of tokens")
        tokens = rows * E // K
        slots = torch.arange(tokens, device=device)[:, None] * K + torch.arange(K, device=device)
        cases.append((str(rows), tokens, (slots % E).to(torch.int32)))
    for tokens in token_counts:
        scores = torch.rand(tokens, E, device=device, generator=gen)
        cases.append((f"{tokens}tok", tokens, scores.topk(K, dim=1).indices.to(torch.int32)))
    for case, tokens, expert_ids in cases:
        x_TD = torch.randn(tokens, D, device=device, dtype=dtype, generator=gen)
        alignment = align_to_blocks(expert_ids, E, block_m)
        if gemm == "gate_up":  # each assignment's row of h
            real_rows[case] = alignment.row_of_assign_A.long()
        else:  # down's input: h's rows; its output: one row an assignment, all real
            real_rows[case] = slice(None)
            h_PF = torch.randn(alignment.max_rows, F, device=device, dtype=dtype, generator=gen)
            gate_A = torch.rand(tokens * K, device=device, dtype=dtype, generator=gen)
        for name, (variant, group_m) in variants.items():
            config = tile(block_m, variant, device == "cpu", group_m)
            label = f"{case} {name}"
            if gemm == "gate_up":
                out = torch.zeros(alignment.max_rows, F, device=device, dtype=dtype)
                run = functools.partial(launch_gate_up, config, x_TD, w_E2FD, out, alignment, K)
            else:
                out = torch.zeros(tokens * K, D, device=device, dtype=dtype)
                run = functools.partial(
                    launch_down, config, h_PF, w_down_EFD, gate_A, out, alignment
                )
            outputs[label] = out
            runs[label] = run
    # warmed up together, to the clock the power cap keeps; then timed in turns
    on = torch.device(device)
    plan = timing.TimingPlan(warmup=1, warmup_ms=warm_s * 1e3)
    timing.warm_up(lambda _: [run() for run in runs.values()], on, plan)
    sides = {label: functools.partial(timing.time_once, run, on) for label, run in runs.items()}
    times = timing.in_turns(sides, rounds)
    found = {}
    for label, out in outputs.items():
        case = label.split()[0]
        real = real_rows[case]
        first = outputs[f"{case} {next(iter(variants))}"]
        diff = (out[real].float() - first[real].float()).abs().max()
        found[label] = {"ms": times[label], "max_diff": float(diff)}
    return found


def main(argv: list[str] | None = None) -> int:
    import triton

    first_paragraph = __doc__.split("\n\n")[0].replace("\n", " ")
    parser = argparse.ArgumentParser(description=first_paragraph)
    parser.add_argument(
        "--preset", default="deepseek-v3", choices=sorted(PRESETS), help="the layer's shape"
    )
    parser.add_argument(
        "--shape", type=int, nargs=4, metavar=("D", "F", "E", "K"),
        help="hidden, expert width, experts, top_k (in place of --preset)",
    )  # fmt: skip
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[256, 288, 320, 384],
        help="rows every expert gets, one run of each variant per count",
    )  # fmt: skip
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[], metavar="T",
        help="also T tokens routed at random (each token's top_k experts drawn uniformly)",
    )  # fmt: skip
    parser.add_argument("--gemm", default="gate_up", choices=sorted(GEMMS))
    parser.add_argument("--block-m", type=int, default=128, choices=(64, 128))
    parser.add_argument(
        "--group-m", type=int, nargs="+", default=[8], metavar="N",
        help="row blocks a group of the tile order (several: each variant at each)",
    )  # fmt: skip
    parser.add_argument(
        "--only", nargs="+", default=[], metavar="VARIANT",
        help="these variants alone (names as printed, e.g. 'TMA, GATHER_A, HALF_TAIL')",
    )  # fmt: skip
    parser.add_argument(
        "--warm-s", type=float, default=3.0, help="seconds of calls before the timing"
    )
    parser.add_argument("--rounds", type=int, default=8, help="timed calls of each variant")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(GEMMS[args.gemm]))
    if unknown:
        allowed = sorted(GEMMS[args.gemm])
        parser.error(f"--only: no {args.gemm} variant {unknown}; allowed: {allowed}")
    if args.tokens and min(args.tokens) < 1:
        parser.error(f"--tokens {min(args.tokens)}: route at least 1 token")
    if min(args.group_m) < 1:
        parser.error(f"--group-m {min(args.group_m)}: a group holds at least 1 row block")
    interpreted = bool(triton.knobs.runtime.interpret)
    if not (torch.cuda.is_available() or interpreted):
        print("tail_probe: needs a CUDA device (or TRITON_INTERPRET=1 at a small --shape)")
        return 2
    if args.shape:
        D, F, E, K = args.shape
    else:
        shape = PRESETS[args.preset]
        D, F, E, K = shape.hidden, shape.ffn, shape.num_experts, shape.top_k
    device = "cpu" if interpreted else "cuda"
    dtype = torch.float16 if interpreted else torch.bfloat16  # (numpy has no bfloat16)
    found = probe(
        D, F, E, K, args.rows, args.block_m, args.warm_s, args.rounds, device, dtype, args.gemm,
        tuple(args.group_m), tuple(args.only), tuple(args.tokens),
    )  # fmt: skip
    what = "h" if args.gemm == "gate_up" else "out"
    print(
        f"{args.gemm}, D {D} F {F} E {E} K {K}, {args.block_m}-row blocks:"
        f" median ms (max |{what} diff|)"
    )
    for label, result in found.items():
        print(f"  {label:34} {result['ms']:9.3f}  ({result['max_diff']:.3g})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(found, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
