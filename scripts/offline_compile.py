"""Compile the fused `triton` layer for Hopper (sm_90) on this host, no card needed:
every kernel its forward (and with `--train` its training step) launches, each tuning
candidate of its GEMMs included, at a preset's shape; print what each uses
(`moebench.offline_compile`).

    python scripts/offline_compile.py [--preset mixtral-8x7b | --shape D F E K]
                                      [--tokens 1 64 1024 8192] [--train]
                                      [--cache DIR] [--ptx DIR]

A call's kernels as on an H200: programmatic dependent launch at up to 64 tokens, the
per-assignment layout at one token (inference), every row-block size the forward races.
`--train`: the training step (its forward keeps the pre-activations, another gate_up
kernel; its backward: the rows' products and weight gradients with their candidates, the
SwiGLU backward, the token sums).
One line per compile (kernel, constexprs and options, shared memory, warps, registers
and stack per thread, or why it failed), then a summary. `--cache DIR`: compile into
DIR as Triton's cache and pack it (`offline_compile.pack_cache`), for a card's JIT to
load instead of compiling (`scripts/gpu_session.sh` unpacks `.triton-cache/`); a DIR
packed by an earlier pass of the same compiler is taken up again, so that passes for
several presets add up in one cache.
`--ptx DIR`: each kernel's PTX, debug locations left out (`offline_compile.comparable_ptx`),
a file a compile named by token count, kernel and constants: `diff -r` of two checkouts'
folders says whether an edit changed any kernel (the Gluon and merged-tail kernels
included, unless `MOEBENCH_GLUON_WS=0` or `MOEBENCH_MERGE_TAIL=0` is set).
Exit status: 0 when everything compiled, 1 when something failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path

import torch

from moebench import offline_compile
from moebench.presets import PRESETS


def compile_layer(
    hidden: int, ffn: int, experts: int, top_k: int, tokens: int, train: bool
) -> list[offline_compile.Compiled]:
    """Every compile of one call of `tokens` tokens (a forward per row-block size it may
    take, or a training step), on meta tensors, with dependent launch as Hopper has it."""
    from moebench import dependent_launch  # (these import Triton, which main checked)
    from moebench.impls.triton import tuning
    from moebench.impls.triton.backward import fused_backward
    from moebench.impls.triton.layer import fused_experts

    def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype)

    args = (
        meta(tokens, hidden),
        meta(tokens, top_k),
        meta(tokens, top_k, dtype=torch.int64),
        meta(experts, 2 * ffn, hidden),
        meta(experts, ffn, hidden),
    )
    if train or tokens == 1:
        block_ms = [tuning.block_m_for(tokens, top_k, experts)]
    else:
        block_ms = tuning.block_m_choices(tokens, top_k, experts)
    compiled = []
    enabled = dependent_launch.enabled
    dependent_launch.enabled = lambda device: not dependent_launch._off  # as on Hopper
    try:
        for block_m in block_ms:
            with offline_compile.compiling_for() as record:
                _, saved = fused_experts(*args, keep_for_backward=train, block_m=block_m)
                if train:
                    fused_backward(saved, meta(tokens, hidden), args[0], args[1], *args[3:])
            compiled += record
    finally:
        dependent_launch.enabled = enabled
    return compiled


def write_ptx(folder: Path, prefix: str, compiled: offline_compile.Compiled) -> Path:
    """`compiled`'s PTX into `folder`, named by `prefix`, its kernel and its constants; a
    second compile of that name with other PTX (arguments specialised otherwise) gets
    `~2`, `~3`, ... after it."""
    constants = "_".join(f"{key}{value}" for key, value in compiled.constants.items())
    name = re.sub(r"[^A-Za-z0-9_.=-]", "", f"{prefix}_{compiled.kernel}_{constants}")
    path, count = folder / f"{name}.ptx", 1
    while path.exists() and path.read_text() != compiled.ptx:
        count += 1
        path = folder / f"{name}~{count}.ptx"
    path.write_text(compiled.ptx)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mixtral-8x7b", choices=sorted(PRESETS))
    parser.add_argument(
        "--shape", type=int, nargs=4, metavar=("D", "F", "E", "K"),
        help="hidden, expert width, experts, top_k (in place of --preset)",
    )  # fmt: skip
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024, 8192])
    parser.add_argument("--train", action="store_true", help="the training step")
    parser.add_argument("--cache", type=Path, help="compile into this Triton cache, packed")
    parser.add_argument("--ptx", type=Path, help="write each kernel's PTX into this folder")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("triton") is None:
        parser.exit(2, "offline_compile.py needs Triton: pip install triton==3.6.0\n")
    if args.shape:
        shape = tuple(args.shape)
    else:
        preset = PRESETS[args.preset]
        shape = (preset.hidden, preset.ffn, preset.num_experts, preset.top_k)
    if any(t < 1 for t in args.tokens) or any(n < 1 for n in shape) or shape[3] > shape[2]:
        parser.error("tokens and every size must be at least 1, top_k at most the experts")
    if args.cache and (args.cache / offline_compile.MADE_BY).exists():
        # a packed cache of an earlier pass: taken up again, so that passes add up
        said = offline_compile.unpack_cache(args.cache)
        if not said.endswith("loadable"):
            parser.error(f"--cache {said}; give an empty folder")
        print(said)
    if args.cache:  # (Triton reads its cache folder from the environment as it compiles)
        os.environ["TRITON_CACHE_DIR"] = str(args.cache.resolve())
    if args.ptx and args.ptx.exists() and any(args.ptx.iterdir()):
        parser.error(f"--ptx {args.ptx}: not empty (a folder of another pass's PTX?)")
    if args.ptx:
        args.ptx.mkdir(parents=True, exist_ok=True)
    failed = spilled = total = 0
    for tokens in args.tokens:
        for compiled in compile_layer(*shape, tokens, args.train):
            print(f"T{tokens} {compiled.describe()}", flush=True)
            total += 1
            failed += compiled.error is not None
            spilled += compiled.stack_bytes > 0
            if args.ptx and compiled.ptx:
                write_ptx(args.ptx, f"T{tokens}", compiled)
    print(f"{total} kernels compiled for sm_90: {failed} failed, {spilled} with stack (spills)")
    if args.ptx:
        print(f"PTX of each kernel in {args.ptx}/")
    if args.cache:
        size = offline_compile.pack_cache(args.cache)
        print(f"packed {args.cache}: {size / 2**20:.1f} MiB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
