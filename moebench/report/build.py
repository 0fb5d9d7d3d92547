"""Build a report end to end: read the runs, draw the sections, render and write the page."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moebench.report.data import ReportData, load_runs
from moebench.store import StoreError, os_reason, write_text_atomically

MANIFEST_RE = re.compile(
    r'<script type="application/json" id="moebench-manifest">(.*?)</script>', re.S
)


@dataclass(frozen=True)
class ReportResult:
    """What `write_report` wrote: the file, its size and the page's manifest."""

    path: Path
    size_bytes: int
    manifest: dict[str, Any]
    sections: list[Any]


def render_report(data: ReportData) -> tuple[str, list[Any]]:
    """(the page's HTML, its sections) for runs already read. Needs plotly."""
    import plotly.offline

    from moebench import __version__
    from moebench.report.figures import build_sections
    from moebench.report.figures_profile import with_profile_sections
    from moebench.report.page import render_page

    sections = with_profile_sections(build_sections(data), data)
    drawn = any(section.figures for section in sections)
    # plotly.js (~5 MB) is inlined once, and only when there is a figure to draw.
    page = render_page(
        data, sections, plotlyjs=plotly.offline.get_plotlyjs() if drawn else "", version=__version__
    )
    return page, sections


def read_manifest(page: str) -> dict[str, Any]:
    """The JSON manifest embedded in a rendered page."""
    match = MANIFEST_RE.search(page)
    if match is None:
        raise ValueError("no moebench manifest in this page")
    return json.loads(match.group(1).replace("<\\/", "</"))


def write_report(
    specs: Sequence[str | Path], output: str | Path, root: str | Path = "results"
) -> ReportResult:
    """Read the runs named by `specs`, render the page and write it to `output` atomically.

    Raises `moebench.store.StoreError` for a run that cannot be found or read, or a page
    that cannot be written (naming the file; a full disk leaves no partial page).
    """
    data = load_runs(specs, root)
    page, sections = render_report(data)
    path = Path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {os_reason(exc)}") from exc
    write_text_atomically(path, page)
    return ReportResult(path, path.stat().st_size, read_manifest(page), sections)
