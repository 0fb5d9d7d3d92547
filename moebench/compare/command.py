"""`moebench compare`: the command-line face of the comparison (see the package docstring)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from moebench.compare.bootstrap import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED
from moebench.compare.pairing import compare_impls, compare_runs, get_metric
from moebench.compare.render import (
    VERDICT_STYLE,
    dumps,
    markdown,
    rich_impl_table,
    rich_table,
)
from moebench.compare.report import DRIFT_MODES, GATES, Report, Settings
from moebench.compare.runs import CompareError, load_run
from moebench.compare.verdict import DEFAULT_THRESHOLD, METRICS, Threshold, ThresholdError
from moebench.console import error, say, warning
from moebench.store import os_reason

COMMAND = "compare"
HELP = "compare a candidate run with a baseline (or two implementations): noise-aware verdicts"
EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `moebench compare`."""
    parser.description = (
        "Per case, the ratio candidate/baseline of a metric's median with a bootstrap "
        "confidence interval, and a verdict. Exit 0: no regression; 1: a regression (or a "
        "case ok in the baseline that fails in the candidate); 2: bad input."
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="BASELINE CANDIDATE (run ids, run folders, parquet files or 'latest'); with "
        "--impls, one RUN",
    )
    parser.add_argument(
        "--metric",
        default="latency_ms",
        help=f"column to compare (default latency_ms); one of: {', '.join(METRICS)}",
    )
    parser.add_argument(
        "--threshold",
        default=DEFAULT_THRESHOLD,
        help="smallest change that counts, '5%%' or '0.05' (default 5%%: above the 1-3%% "
        "run-to-run noise of GPU medians; noisy CPU runners need more, with --gate impl)",
    )
    parser.add_argument(
        "--normalize",
        metavar="IMPL",
        help="divide each case's metric by IMPL's on the same case of the same run, so a "
        "uniformly slower machine flags nothing",
    )
    parser.add_argument(
        "--impls",
        metavar="A,B",
        help="within one RUN: B against A on every case they share (ratio < 1: B faster)",
    )
    parser.add_argument(
        "--gate",
        choices=GATES,
        default="case",
        help="what a regression must reach to fail (exit 1): 'case' (default: any single "
        "case) or 'impl' (an implementation's geometric mean over its cases; steadier on "
        "noisy CPU runners)",
    )
    parser.add_argument(
        "--drift",
        choices=DRIFT_MODES,
        default="auto",
        help="'auto' (default): measure the run-to-run drift across all cases; a case must "
        "move beyond it to count, and on CPU runs the run's overall shift (the median "
        "implementation's) is divided out (moebench.compare.drift); 'off': judge each "
        "case on its own samples alone",
    )
    parser.add_argument("--markdown", metavar="FILE", help="write a Markdown summary (CI)")
    parser.add_argument("--json", metavar="FILE", help="write every case's result as JSON")
    parser.add_argument("--root", default="results", help="results root for run ids")
    parser.add_argument(
        "--confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help=f"confidence of the bootstrap interval (default {DEFAULT_CONFIDENCE})",
    )
    parser.add_argument(
        "--resamples",
        type=int,
        default=DEFAULT_RESAMPLES,
        help=f"bootstrap resamples (default {DEFAULT_RESAMPLES})",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no table: sentences and summary")


def build_report(args: argparse.Namespace) -> Report:
    """Parse the arguments, read the runs and compare them (CompareError on bad input)."""
    try:
        threshold = Threshold.parse(args.threshold)
    except ThresholdError as exc:
        raise CompareError(f"--{exc}") from exc  # "--threshold 'x' is not ...": the option
    if not 0 < args.confidence < 1:
        raise CompareError(f"--confidence must be between 0 and 1, got {args.confidence}")
    if args.resamples < 100:
        raise CompareError(f"--resamples must be at least 100, got {args.resamples}")
    settings = Settings(
        metric=get_metric(args.metric),
        threshold=threshold,
        normalize=args.normalize,
        confidence=args.confidence,
        resamples=args.resamples,
        seed=args.seed,
        gate=args.gate,
        drift=args.drift,
    )
    if args.impls:
        impls = [name.strip() for name in args.impls.split(",")]
        if len(impls) != 2 or not all(impls):
            raise CompareError(f"--impls takes two names A,B; got {args.impls!r}")
        if len(args.runs) != 1:
            raise CompareError(f"--impls compares within one run; got {len(args.runs)} runs")
        if args.normalize:
            raise CompareError("--normalize does not apply to --impls (A is the yardstick)")
        return compare_impls(load_run(args.runs[0], args.root), impls[0], impls[1], settings)
    if len(args.runs) != 2:
        raise CompareError(
            f"compare takes BASELINE CANDIDATE (or one RUN with --impls A,B); "
            f"got {len(args.runs)} run(s)"
        )
    baseline, candidate = (load_run(spec, args.root) for spec in args.runs)
    run_id = baseline.meta.get("run_id")
    if run_id and run_id == candidate.meta.get("run_id"):
        # `compare latest latest`, or a run against its copy: every case is unchanged by
        # construction, a gate that cannot fail.
        raise CompareError(
            f"baseline and candidate are the same run ({baseline.name}: "
            f"{' and '.join(map(repr, args.runs))}); compare two runs, or one run's "
            "implementations with --impls A,B"
        )
    return compare_runs(baseline, candidate, settings)


def main(args: argparse.Namespace, console: Console) -> int:
    """Run `moebench compare`; returns the exit status."""
    try:
        report = build_report(args)
    except CompareError as exc:
        error(console, exc)
        return EXIT_BAD_INPUT
    if not args.quiet:
        console.print(rich_table(report))
        if report.impl_summaries:
            console.print(rich_impl_table(report))
    # Each sentence whole in a log (a CI log is searched line by line), wrapped at a
    # terminal's edge (`moebench.console`).
    for note in report.notes:
        say(console, (note, "dim"))
    for message in report.warnings:
        warning(console, message)
    if not report.settings.case_gate:
        inform = "single cases below inform; the gate is on each implementation's geometric mean"
        say(console, (inform, "dim"))
    for result in [*report.results, *report.impl_summaries]:
        if result.verdict in ("failed", "regressed", "improved"):
            gate = " (fails the gate)" if result.fails_gate else ""
            say(
                console, (result.verdict, VERDICT_STYLE[result.verdict]), gate, " ", result.sentence
            )
    for path, text in ((args.markdown, markdown(report)), (args.json, dumps(report))):
        if not path:
            continue
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        except OSError as exc:
            error(console, f"cannot write {path}: {os_reason(exc)}")
            return EXIT_BAD_INPUT
    say(console, (report.summary(), "bold" if report.passed else "bold red"))
    return EXIT_OK if report.passed else EXIT_REGRESSION
