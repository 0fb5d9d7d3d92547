"""Small multiples that stay readable: up to `MAX_FACETS` panels side by side, beyond that
one plot with a drop-down that picks the panel (a sweep of hundreds of cases never puts
hundreds of traces on one axis at once).

Only imported while a report is being built (it imports plotly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moebench.report.style import base_layout

MAX_FACETS = 12
FACET_COLUMNS = 3
PANEL_HEIGHT = 300
SINGLE_HEIGHT = 460


@dataclass
class Panel:
    """One facet: its title, its traces and (for categorical x) the order of categories."""

    title: str
    traces: list[Any] = field(default_factory=list)
    x_categories: list[str] | None = None
    x_ticks: list[float] | None = None  # numeric x: ticks at exactly these values


@dataclass(frozen=True)
class Axes:
    """Titles (with units) and scales shared by every panel of a faceted figure."""

    x_title: str
    y_title: str
    x_log: bool = False
    y_log: bool = False


def faceted(
    panels: list[Panel],
    axes: Axes,
    *,
    title: str,
    hlines: tuple[float, ...] = (),
    band: tuple[float, float] | None = None,
    band_color: str = "#7f7f7f",
    layout: dict[str, Any] | None = None,
) -> go.Figure:
    """A figure with one panel per entry: a grid when there are few, a drop-down when many.

    A legend entry appears once per legendgroup, so clicking it toggles that series in
    every panel. hlines: horizontal reference lines; band: a shaded (y0, y1) stripe.
    """
    if len(panels) <= MAX_FACETS:
        figure, own_layout = _grid(panels, axes)
    else:
        figure, own_layout = _dropdown(panels, axes)
    figure.update_layout(**base_layout(title={"text": title, "x": 0.01}))
    figure.update_layout(**own_layout)
    figure.update_layout(**(layout or {}))
    every: dict[str, Any] = {"row": "all", "col": "all"} if len(panels) <= MAX_FACETS else {}
    for y in hlines:
        figure.add_hline(y=y, line={"color": "#888", "dash": "dot", "width": 1}, **every)
    if band is not None:
        figure.add_hrect(
            y0=band[0],
            y1=band[1],
            fillcolor=band_color,
            opacity=0.15,
            line_width=0,
            layer="below",
            **every,
        )
    return figure


def _dedupe_legend(traces: list[Any], shown: set[str]) -> None:
    for trace in traces:
        group = trace.legendgroup or trace.name
        if trace.showlegend is False:
            continue
        trace.showlegend = group not in shown
        shown.add(group)


def _axis_settings(axes: Axes) -> tuple[dict[str, Any], dict[str, Any]]:
    x = {"type": "log" if axes.x_log else "-", "showline": True, "linecolor": "#bbb"}
    y = {"type": "log" if axes.y_log else "-", "showline": True, "linecolor": "#bbb"}
    return x, y


def _grid(panels: list[Panel], axes: Axes) -> tuple[go.Figure, dict[str, Any]]:
    columns = min(FACET_COLUMNS, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    single = len(panels) == 1
    figure = make_subplots(
        rows=rows,
        cols=columns,
        subplot_titles=[p.title for p in panels],
        horizontal_spacing=0.07,
        vertical_spacing=min(0.14, 0.45 / rows),
    )
    shown: set[str] = set()
    x_settings, y_settings = _axis_settings(axes)
    traces, trace_rows, trace_cols = [], [], []
    axis_layout: dict[str, Any] = {}
    for index, panel in enumerate(panels):
        row, col = index // columns + 1, index % columns + 1
        _dedupe_legend(panel.traces, shown)
        traces += panel.traces
        trace_rows += [row] * len(panel.traces)
        trace_cols += [col] * len(panel.traces)
        # make_subplots numbers its axes row by row: xaxis, xaxis2, ...
        suffix = "" if index == 0 else str(index + 1)
        x_axis, y_axis = dict(x_settings), dict(y_settings)
        if panel.x_categories is not None:
            x_axis.update(categoryorder="array", categoryarray=panel.x_categories)
        if panel.x_ticks:
            x_axis.update(tickmode="array", tickvals=panel.x_ticks)
        if index + columns >= len(panels):  # the lowest panel of its column
            x_axis["title"] = {"text": axes.x_title}
        if col == 1:
            y_axis["title"] = {"text": axes.y_title}
        axis_layout[f"xaxis{suffix}"] = x_axis
        axis_layout[f"yaxis{suffix}"] = y_axis
    if traces:
        figure.add_traces(traces, rows=trace_rows, cols=trace_cols)
    figure.update_layout(axis_layout)
    figure.update_annotations(font_size=12)
    own: dict[str, Any] = {
        "height": SINGLE_HEIGHT if single else max(SINGLE_HEIGHT, 90 + PANEL_HEIGHT * rows)
    }
    return figure, own


def _dropdown(panels: list[Panel], axes: Axes) -> tuple[go.Figure, dict[str, Any]]:
    owner: list[int] = []
    traces = []
    for index, panel in enumerate(panels):
        _dedupe_legend(panel.traces, set())
        for trace in panel.traces:
            trace.visible = index == 0
            traces.append(trace)
            owner.append(index)
    figure = go.Figure(data=traces)
    buttons = []
    for index, panel in enumerate(panels):
        relayout: dict[str, Any] = {}
        if panel.x_categories is not None:
            relayout = {"xaxis.categoryorder": "array", "xaxis.categoryarray": panel.x_categories}
        if panel.x_ticks:
            relayout = {"xaxis.tickmode": "array", "xaxis.tickvals": panel.x_ticks}
        buttons.append(
            {
                "label": panel.title,
                "method": "update",
                "args": [{"visible": [o == index for o in owner]}, relayout],
            }
        )
    x_settings, y_settings = _axis_settings(axes)
    figure.update_xaxes(title_text=axes.x_title, **x_settings)
    figure.update_yaxes(title_text=axes.y_title, **y_settings)
    if panels and panels[0].x_categories is not None:
        figure.update_xaxes(categoryorder="array", categoryarray=panels[0].x_categories)
    if panels and panels[0].x_ticks:
        figure.update_xaxes(tickmode="array", tickvals=panels[0].x_ticks)
    own: dict[str, Any] = dict(
        height=SINGLE_HEIGHT + 40,
        margin={"l": 70, "r": 20, "t": 110, "b": 60},
        updatemenus=[
            {
                "buttons": buttons,
                "direction": "down",
                "showactive": True,
                "x": 0.0,
                "xanchor": "left",
                "y": 1.16,
                "yanchor": "top",
            }
        ],
        annotations=[
            {
                "text": f"{len(panels)} panels: pick one",
                "showarrow": False,
                "xref": "paper",
                "yref": "paper",
                "x": 1.0,
                "y": 1.12,
                "xanchor": "right",
                "font": {"size": 11, "color": "#666"},
            }
        ],
    )
    return figure, own
