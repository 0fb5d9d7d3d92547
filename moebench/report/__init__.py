"""The HTML report: `moebench report RUN [RUN ...] -o report.html`.

    from moebench.report import write_report
    result = write_report(["latest"], "report.html", root="results")
    print(result.path, result.size_bytes, [f["id"] for f in result.manifest["figures"]])

data.py reads and joins the runs, figures.py draws one section per question (facets.py
lays out small multiples), page.py fills the HTML templates of templates.py, png.py
exports PNGs, build.py ties them together, and command.py is the CLI. Nothing heavy is
imported with this package (the CLI imports it on every command); plotly only while a
report is built.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ReportResult", "render_report", "write_report"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moebench.report import build

        return getattr(build, name)
    raise AttributeError(f"module 'moebench.report' has no attribute {name!r}")
