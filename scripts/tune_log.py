"""What the fused layer's tuner timed, one line per tuning, from the log that
`MOEBENCH_TRITON_TUNE_LOG=FILE` writes ($OUT/tune-log.jsonl in scripts/gpu_session.sh).

    python scripts/tune_log.py FILE [--key SUBSTRING]

Each line: the key (kernel, weight layout, shape, dtype, token bucket), the chosen
candidate and its milliseconds, the runner-up, and how many candidates failed to
compile or launch (the first error is shown). Where the candidates hold both a Triton
tile and torch's grouped GEMM (the backward's GEMMs), the best of each is shown too, and
where they were timed replayed from a CUDA graph (the forward's GEMMs), that too, and
how long the tuning took (with the part spent compiling every candidate at once, where
`MOEBENCH_TRITON_PARALLEL_COMPILE` asked for it), and where a run-off timed the closest
candidates again in turns (by default; `MOEBENCH_TRITON_RUNOFF=0`: none), their medians
there; last, the tunings' seconds in all.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from moebench.impls.triton.tuning import read_log

_FIELDS = (
    ("BLOCK_M", "M"),
    ("BLOCK_N", "N"),
    ("BLOCK_K", "K"),
    ("BLOCK_R", "R"),
    ("num_warps", "w"),
    ("num_stages", "s"),
)


def describe(config: dict | None) -> str:
    """A candidate in a few characters: "grouped_mm", or M/N/K/R tile, warps, stages."""
    if config is None:
        return "none"
    if "kernel" in config:
        return str(config["kernel"])
    parts = [f"{short}{config[name]}" for name, short in _FIELDS if name in config]
    parts += [name for name, value in config.items() if value is True]  # flags
    return " ".join(parts)


def summarise(line: dict) -> str:
    """One tuning's line of the summary."""
    timed = sorted(
        ((ms, config) for config, ms in line["trials"] if isinstance(ms, (int, float))),
        key=lambda trial: trial[0],
    )
    failed = [result for _, result in line["trials"] if not isinstance(result, (int, float))]
    text = f"{line['key']}: {describe(line['chosen'])}"
    # (the chosen is the pass's fastest, unless a run-off chose another)
    chosen_ms = [ms for ms, config in timed if config == line["chosen"]]
    others = [(ms, config) for ms, config in timed if config != line["chosen"]]
    if chosen_ms:
        text += f" {chosen_ms[0]:.4g} ms"
    if others:
        text += f"; next {describe(others[0][1])} {others[0][0]:.4g} ms"
    grouped = [ms for ms, config in timed if "kernel" in config]
    tiles = [ms for ms, config in timed if "kernel" not in config]
    if grouped and tiles:
        text += f"; grouped GEMM {grouped[0]:.4g} ms, best Triton tile {tiles[0]:.4g} ms"
    if failed:
        text += f"; {len(failed)} failed ({failed[0]})"
    if line.get("runoff"):  # (unless $MOEBENCH_TRITON_RUNOFF=0)
        medians = [statistics.median(times) for _, times in line["runoff"]]
        rounds = len(line["runoff"][0][1])
        text += (
            f"; run-off of {len(medians)} in {rounds} turns, medians "
            + ", ".join(f"{ms:.4g}" for ms in medians)
            + " ms"
        )
    # ("graph", or "graph, run-off"; logs from before 2026-12-03 do not say)
    if str(line.get("timed_by", "")).startswith("graph"):
        text += "; timed from a CUDA graph"
    if "tune_s" in line:  # (logs from before 2026-12-04 do not say)
        text += f"; tuned in {line['tune_s']:.1f} s"
        if "precompile_s" in line:
            text += f", {line['precompile_s']:.1f} of them compiling every candidate at once"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the JSON-lines tune log")
    parser.add_argument("--key", default="", help="only tunings whose key contains this")
    args = parser.parse_args(argv)
    try:
        text = args.log.read_text()
    except OSError as error:
        print(f"tune_log.py: cannot read {args.log}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        tunings = read_log(text)
    except ValueError as error:
        print(f"tune_log.py: {args.log}: {error}", file=sys.stderr)
        return 2
    tune_s = []
    for number, line in tunings:
        if args.key not in line["key"]:
            continue
        try:
            print(summarise(line))
        except (ValueError, KeyError, TypeError) as error:  # its trials not what they are
            print(f"tune_log.py: {args.log}:{number}: not a tuning line ({error})", file=sys.stderr)
            return 2
        tune_s += [line["tune_s"]] if "tune_s" in line else []
    if tune_s:
        print(f"in all: {sum(tune_s):.1f} s of tuning ({len(tune_s)} logged with their time)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `| head`: the reader has all it wanted
        sys.stderr.close()
        sys.exit(0)
