"""`moebench report RUN [RUN ...] -o report.html [--png DIR] [--plotly-js DIR]`: one
self-contained HTML file (works offline) comparing the runs named; the first is the
baseline of comparisons. With `--plotly-js DIR` the page loads plotly.js (about 5 MB) from
DIR/plotly-VERSION.min.js, written there once, so that many pages kept together (a
repository's reference runs) hold one copy; such a page works offline beside that file.

Exit codes (EXIT_CODES, shown by --help): 0 written, 1 the PNG export failed, 2 bad input
or a missing optional dependency (plotly, kaleido), with the message saying what to do.
"""

from __future__ import annotations

import argparse
from typing import Any

from moebench.console import error, say, warning

COMMAND = "report"
HELP = "an interactive HTML report of one or more runs (several runs are compared)"
EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CODES = """exit codes:
  0    written; a run with not all its cases is named in a warning
  1    the PNG export failed (the HTML is written)
  2    bad input, with a message: an unknown run (the known ones are listed), a
       file that is not a moebench results table, a run with no cases, an output
       file that exists (pass --force), a missing optional dependency (what to
       install)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run id, run folder, results parquet file, or 'latest' (several: compared "
        "against the first)",
    )
    parser.add_argument(
        "-o", "--output", default="report.html", help="HTML file to write (default: report.html)"
    )
    parser.add_argument(
        "--root",
        default="results",
        help="results root folder where run ids are looked up (default: results)",
    )
    parser.add_argument(
        "--png", metavar="DIR", help="also write each figure as DIR/<figure>.png (needs kaleido)"
    )
    parser.add_argument(
        "--plotly-js",
        metavar="DIR",
        help="load plotly.js from DIR/plotly-VERSION.min.js (written there once) in place of "
        "inlining its 5 MB: for many reports kept together",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


def main(args: argparse.Namespace, console: Any) -> int:
    """Write the report; print where it went and what it holds."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        error(console, "the report needs plotly: pip install 'moebench[report]'")
        return EXIT_BAD_INPUT
    from moebench.report.png import PngUnavailableError, export_pngs, require_kaleido
    from moebench.store import StoreError

    if args.png:
        try:
            require_kaleido()
        except PngUnavailableError as exc:
            error(console, exc)
            return EXIT_BAD_INPUT
    from pathlib import Path

    from moebench.report.build import write_report

    try:
        for run in args.runs:
            if problem := _run_problem(run, args.root, console):
                error(console, problem)
                return EXIT_BAD_INPUT
        if args.plotly_js and Path(args.plotly_js).exists() and not Path(args.plotly_js).is_dir():
            error(console, f"--plotly-js {args.plotly_js}: not a folder")
            return EXIT_BAD_INPUT
        if Path(args.output).exists() and not args.force:  # as export: never by accident
            error(console, f"{args.output} exists; pass --force to overwrite it")
            return EXIT_BAD_INPUT
        result = write_report(args.runs, args.output, root=args.root, plotly_dir=args.plotly_js)
    except StoreError as exc:
        error(console, exc)
        return EXIT_BAD_INPUT
    manifest = result.manifest
    say(
        console,
        f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB): "
        f"{manifest['cases']} cases from {len(manifest['runs'])} run(s), "
        f"{len(manifest['figures'])} figures",
    )
    if args.plotly_js and manifest["figures"]:
        say(console, f"  its figures load plotly.js from {args.plotly_js}: keep them together")
    for omitted in manifest["omitted"]:
        say(console, f"  left out {omitted['section']}: {omitted['reason']}")
    if args.png:
        figures = [fig for section in result.sections for fig in section.figures]
        try:
            paths = export_pngs(figures, args.png)
        except Exception as exc:  # kaleido's browser can fail in many ways; say which
            error(console, f"PNG export failed: {type(exc).__name__}: {exc}")
            return EXIT_FAIL
        say(console, f"wrote {len(paths)} PNG files to {args.png}")
    return EXIT_OK


def _run_problem(run: str, root: str, console: Any) -> str | None:
    """Why `run` cannot be reported (it has no cases), or None; a run with not all its
    cases gets a warning line. Raises StoreError for a run that cannot be read."""
    from moebench.resume import incompleteness
    from moebench.store import StoreError, read_metadata, read_run

    finished = len(read_run(run, root))
    try:
        meta = read_metadata(run, root)
    except StoreError:
        meta = {}
    note = incompleteness(meta, finished, root)
    if finished == 0:
        return f"{run}: nothing to report: " + (note or "the table has no rows")
    if note:
        warning(console, f"{run}: {note}")
    return None
