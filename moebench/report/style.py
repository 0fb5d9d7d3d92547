"""Visual constants shared by every figure and the page: one colour per implementation
(the same in every figure and in the tables), one line dash and marker per run, status
colours, and the plotly layout defaults.

Red is kept out of the implementation palette: it means a failure or a regression.
"""

from __future__ import annotations

from functools import cache
from typing import Any

# Colour-blind-friendly hues first, no red among them.
IMPL_PALETTE: tuple[str, ...] = (
    "#1f77b4",  # blue
    "#ff7f0e",  # orange
    "#2ca02c",  # green
    "#9467bd",  # purple
    "#8c564b",  # brown
    "#17becf",  # cyan
    "#e377c2",  # pink
    "#bcbd22",  # olive
    "#7f7f7f",  # grey
    "#393b79",  # navy
    "#637939",  # moss
    "#8c6d31",  # ochre
)
# Built-ins first, in a fixed order, so "grouped" has the same colour in every report.
KNOWN_IMPLS: tuple[str, ...] = ("reference", "grouped", "capacity", "dense")
REGRESSION_COLOR = "#d62728"
SAME_BAND_COLOR = "#7f7f7f"  # the within-5% band of run-against-run speedups
ROOF_COLOR = "#444444"
RUN_DASHES: tuple[str, ...] = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
RUN_SYMBOLS: tuple[str, ...] = ("circle", "diamond", "square", "triangle-up", "cross", "star")
STATUS_COLORS: dict[str, str] = {
    "ok": "#2ca02c",
    "mismatch": "#d62728",
    "error": "#d62728",
    "oom": "#9467bd",
    "timeout": "#e6a700",
    "crashed": "#8b0000",
    "skipped": "#999999",
}
# Parts of a latency (communication figure) and kinds of parameter count.
PART_COLORS: dict[str, str] = {
    "compute": "#4c78a8",
    "dispatch": "#f58518",
    "combine": "#54a24b",
    "other comm": "#b279a2",
}
PARAM_COLORS: dict[str, str] = {
    "total": "#3b4a5a",
    "active per token": "#8fa3b8",
    "touched by the batch": "#c9d4df",
}
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"


def impl_colors(impls: list[str]) -> dict[str, str]:
    """A colour for each implementation: built-ins fixed, others in order of name."""
    ordered = [name for name in KNOWN_IMPLS if name in impls]
    ordered += sorted(name for name in impls if name not in KNOWN_IMPLS)
    colors = {}
    others = 0
    for name in ordered:
        if name in KNOWN_IMPLS:
            slot = KNOWN_IMPLS.index(name)
        else:  # after the built-ins' slots, wrapping round a long list
            slot = (len(KNOWN_IMPLS) + others) % len(IMPL_PALETTE)
            others += 1
        colors[name] = IMPL_PALETTE[slot]
    return colors


def run_dash(run_index: int) -> str:
    """The line dash of the run at `run_index` (0 = the first run named)."""
    return RUN_DASHES[run_index % len(RUN_DASHES)]


def run_symbol(run_index: int) -> str:
    """The marker symbol of the run at `run_index`."""
    return RUN_SYMBOLS[run_index % len(RUN_SYMBOLS)]


def base_layout(**overrides: Any) -> dict[str, Any]:
    """Layout settings every figure shares (font, margins, legend, hover)."""
    layout: dict[str, Any] = {
        "font": {"family": FONT, "size": 12},
        "margin": {"l": 70, "r": 20, "t": 50, "b": 60},
        "legend": {"title": {"text": "implementation"}, "groupclick": "togglegroup"},
        "hoverlabel": {"namelength": -1},
    }
    layout.update(overrides)
    return layout


@cache
def _template_json() -> dict[str, Any]:
    import plotly.io as pio

    return pio.templates["plotly_white"].to_plotly_json()


def figure_json(figure: Any) -> dict[str, Any]:
    """The figure as plotly JSON with the report's template ("plotly_white").

    The template is added here, once per figure as plain JSON, rather than on the figure
    object: plotly validates a template on every assignment, which costs ~0.1 s a figure.
    """
    result = figure.to_plotly_json()
    result.setdefault("layout", {})["template"] = _template_json()
    return result
