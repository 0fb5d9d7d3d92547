"""`moebench report RUN [RUN ...] -o report.html [--png DIR]`: one self-contained HTML
file (works offline) comparing the runs named; the first is the baseline of comparisons.

Exit codes: 0 written, 1 the PNG export failed, 2 bad input (an unknown run) or a missing
optional dependency (plotly, kaleido), with the message saying what to do.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.markup import escape

COMMAND = "report"
HELP = "an interactive HTML report of one or more runs (several runs are compared)"
EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


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


def main(args: argparse.Namespace, console: Any) -> int:
    """Write the report; print where it went and what it holds."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        console.print(
            "[red]error:[/] " + escape("the report needs plotly: pip install 'moebench[report]'")
        )
        return EXIT_BAD_INPUT
    from moebench.report.png import PngUnavailableError, export_pngs, require_kaleido
    from moebench.store import StoreError

    if args.png:
        try:
            require_kaleido()
        except PngUnavailableError as exc:
            console.print(f"[red]error:[/] {escape(str(exc))}")
            return EXIT_BAD_INPUT
    from moebench.report.build import write_report

    try:
        result = write_report(args.runs, args.output, root=args.root)
    except StoreError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        return EXIT_BAD_INPUT
    manifest = result.manifest
    console.print(
        f"wrote {escape(str(result.path))} ({result.size_bytes / 1e6:.1f} MB): "
        f"{manifest['cases']} cases from {len(manifest['runs'])} run(s), "
        f"{len(manifest['figures'])} figures"
    )
    for omitted in manifest["omitted"]:
        console.print(f"  left out {omitted['section']}: {escape(omitted['reason'])}")
    if args.png:
        figures = [fig for section in result.sections for fig in section.figures]
        try:
            paths = export_pngs(figures, args.png)
        except Exception as exc:  # kaleido's browser can fail in many ways; say which
            console.print(
                f"[red]error:[/] PNG export failed: {type(exc).__name__}: {escape(str(exc))}"
            )
            return EXIT_FAIL
        console.print(f"wrote {len(paths)} PNG files to {escape(str(args.png))}")
    return EXIT_OK
