"""How many rows the fused layer's grouped GEMMs compute for each real one, from a run's
own routing (NOTES.md, version 36): each expert's run of rows is padded to whole row
blocks, so an expert with 260 rows at 128-row blocks computes 384.

    python scripts/row_padding.py RESULTS.parquet [--impl triton] [--blocks 128 64 16]
                                  [--down-waves 132 [--down-columns 256]]

For every forward case of `--impl` (its `tokens_per_expert`: the rows each expert
computed in the correctness check, the same routing the timed calls ran), one line: the
mean rows an expert, the busiest expert over the mean, and the padded rows over the real
ones at each block size of `--blocks`, and at the first with HALF_TAIL (an expert's last
block computes half its rows where its real rows fit in that half). Below the crossover
a GEMM's time is its weight reads, and padding costs only tensor time under them; at and
above it, the padding is FLOP time the floor (real FLOPs / matrix rate) does not count:
Mixtral-8x7B at 1024 tokens computes 1.25x its rows at 128-row blocks.

`--down-waves PROGRAMS` adds what a persistent down kernel of that many programs (one a
streaming multiprocessor: 132 on an H100 or H200) makes of those blocks (at the first
block size) in tiles of `--down-columns` columns: the waves, and the share of the
programs' time busy when each walks its tiles one tile-time apiece ("2.42/81%"; NOTES.md
versions 37 and 38: a down split in two along K, to fill the last wave, lost on a card).
CPU only: it reads the parquet and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import pandas as pd


def padded_rows(rows_per_expert: Sequence[int], block_m: int, half_tail: bool = False) -> int:
    """The rows computed when each expert's run is padded to whole `block_m` blocks; with
    `half_tail`, a last block whose real rows fit in its first half computes that half."""
    total = 0
    for rows in rows_per_expert:
        full_blocks, tail = divmod(int(rows), block_m)
        total += full_blocks * block_m
        if tail:
            total += block_m // 2 if half_tail and tail <= block_m // 2 else block_m
    return total


def waves(tiles: int, programs: int) -> tuple[float, float]:
    """(waves, busy share): `tiles` over `programs` persistent programs, and the share of
    their time busy when each walks ceil(tiles / programs) tiles of one tile-time."""
    if tiles <= 0:
        return 0.0, 0.0
    rounds = -(-tiles // programs)
    return tiles / programs, tiles / (rounds * programs)


def padding_table(
    frame: pd.DataFrame,
    impl: str,
    blocks: Sequence[int],
    down_programs: int | None = None,
    down_columns: int = 256,
) -> pd.DataFrame:
    """One row per forward case of `impl` that computed rows: preset, tokens, graphed,
    rows an expert, max / mean, and padded / real rows per block size (and HALF_TAIL at
    the first); with `down_programs`, the down GEMM's waves and busy share at the first
    block size (module docstring). Raises ValueError when the run has no such case."""
    cases = frame[(frame["impl"] == impl) & (frame["mode"] == "forward")]
    cases = cases[cases["tokens_per_expert"].notna()]
    lines = []
    for _, case in cases.sort_values(["preset", "tokens", "cuda_graph"]).iterrows():
        counts = [int(n) for n in case["tokens_per_expert"]]
        real = sum(counts)
        if not real:
            continue
        mean = real / len(counts)
        line = {
            "preset": case["preset"] or f"D{case['hidden']} F{case['ffn']}",
            "tokens": int(case["tokens"]),
            "graphed": bool(case["cuda_graph"]),
            "rows/expert": round(mean, 1),
            "max/mean": round(max(counts) / mean, 2),
        }
        for block_m in blocks:
            line[f"x{block_m}"] = round(padded_rows(counts, block_m) / real, 3)
        line[f"x{blocks[0]} half"] = round(padded_rows(counts, blocks[0], True) / real, 3)
        if down_programs:
            row_blocks = padded_rows(counts, blocks[0]) // blocks[0]
            tiles = row_blocks * -(-int(case["hidden"]) // down_columns)
            count, busy = waves(tiles, down_programs)
            line[f"down N{down_columns}"] = f"{count:.2f}/{busy:.0%}"
        lines.append(line)
    if not lines:
        raise ValueError(f"no forward case of impl {impl!r} with tokens_per_expert in the run")
    return pd.DataFrame(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results.parquet (or a run folder)")
    parser.add_argument("--impl", default="triton", help="whose cases (default triton)")
    parser.add_argument(
        "--blocks", type=int, nargs="+", default=[128, 64, 16], help="row-block sizes"
    )
    parser.add_argument(
        "--down-waves", type=int, metavar="PROGRAMS",
        help="the down GEMM's waves on this many persistent programs (132: H100, H200)",
    )  # fmt: skip
    parser.add_argument(
        "--down-columns", type=int, default=256, help="the down tile's columns (default 256)"
    )
    args = parser.parse_args(argv)
    if any(block < 2 for block in args.blocks):
        parser.error(f"--blocks must be 2 or more rows, got {args.blocks}")
    if args.down_waves is not None and args.down_waves < 1:
        parser.error(f"--down-waves must be 1 or more programs, got {args.down_waves}")
    if args.down_columns < 1:
        parser.error(f"--down-columns must be 1 or more, got {args.down_columns}")
    from moebench.store import read_run

    try:
        table = padding_table(
            read_run(args.results), args.impl, args.blocks, args.down_waves, args.down_columns
        )
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {args.results}: {exc}", file=sys.stderr)
        return 2
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
