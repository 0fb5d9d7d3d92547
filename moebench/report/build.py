"""Build a report end to end: read the runs, draw the sections, render and write the page."""

from __future__ import annotations

import json
import os
import re
import urllib.parse
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


def render_report(data: ReportData, plotly_src: str | None = None) -> tuple[str, list[Any]]:
    """(the page's HTML, its sections) for runs already read. Needs plotly. plotly.js
    (about 5 MB) is inlined once, and only when there is a figure to draw; with
    `plotly_src` (a URL relative to the page, `plotly_file`) the page loads it from there."""
    import plotly.offline

    from moebench import __version__
    from moebench.report import templates
    from moebench.report.figures import build_sections
    from moebench.report.figures_profile import with_profile_sections
    from moebench.report.page import render_page

    sections = with_profile_sections(build_sections(data), data)
    if not any(section.figures for section in sections):
        script = ""
    elif plotly_src is None:
        script = templates.PLOTLY_INLINE.substitute(js=plotly.offline.get_plotlyjs())
    else:
        script = templates.PLOTLY_FILE.substitute(src=plotly_src)
    page = render_page(data, sections, plotly_script=script, version=__version__)
    return page, sections


def plotly_file(folder: Path, page: Path) -> tuple[Path, str]:
    """Where a page at `page` loads plotly.js from with `folder` (`write_report`'s
    `plotly_dir`): folder/plotly-VERSION.min.js, so that pages made with another plotly
    keep theirs, and its URL relative to the page."""
    import plotly

    path = folder / f"plotly-{plotly.__version__}.min.js"
    relative = os.path.relpath(path.resolve(), page.resolve().parent)
    return path, urllib.parse.quote(Path(relative).as_posix())


def _write(path: Path, text: str) -> None:
    """`text` into `path` atomically, its folder made; StoreError naming the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {os_reason(exc)}") from exc
    write_text_atomically(path, text)


def read_manifest(page: str) -> dict[str, Any]:
    """The JSON manifest embedded in a rendered page."""
    match = MANIFEST_RE.search(page)
    if match is None:
        raise ValueError("no moebench manifest in this page")
    return json.loads(match.group(1).replace("<\\/", "</"))


def write_report(
    specs: Sequence[str | Path],
    output: str | Path,
    root: str | Path = "results",
    plotly_dir: str | Path | None = None,
) -> ReportResult:
    """Read the runs named by `specs`, render the page and write it to `output` atomically;
    with `plotly_dir`, plotly.js goes there once (`plotly_file`) in place of inside the
    page.

    Raises `moebench.store.StoreError` for a run that cannot be found or read, or a page
    that cannot be written (naming the file; a full disk leaves no partial page).
    """
    data = load_runs(specs, root)
    path = Path(output)
    js_path = plotly_src = None
    if plotly_dir is not None:
        js_path, plotly_src = plotly_file(Path(plotly_dir), path)
    page, sections = render_report(data, plotly_src)
    if js_path is not None and not js_path.exists() and any(s.figures for s in sections):
        import plotly.offline

        _write(js_path, plotly.offline.get_plotlyjs())
    _write(path, page)
    return ReportResult(path, path.stat().st_size, read_manifest(page), sections)
