"""What every figure module shares: the `Section` a figure function returns, and the
helpers that group a run's rows into facets (layer shapes) and series (implementations,
runs) and style them the same way in every figure.

Only imported while a report is built (imports plotly).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moebench.report.data import ReportData
from moebench.report.facets import Axes, Panel, faceted
from moebench.report.style import run_dash, run_symbol

MIB = 2**20
SHAPE_ORDER = (
    "hidden",
    "ffn",
    "num_experts",
    "top_k",
    "shared_experts",
    "mode",
    "dtype",
    "routing",
    "world_size",
    "capacity_factor",
    "seed",
)


@dataclass
class TableData:
    """A small table shown under a section's figures (cells are plain text)."""

    headers: list[str]
    rows: list[list[str]]
    row_classes: list[str] = field(default_factory=list)


@dataclass
class Section:
    """One question of the report: its figures, or why it has none."""

    key: str
    title: str
    description: str
    figures: list[tuple[str, go.Figure]] = field(default_factory=list)
    omitted: str | None = None
    notes: list[str] = field(default_factory=list)
    table: TableData | None = None


def sorted_cases(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [k for k in SHAPE_ORDER if k in frame.columns] + ["tokens"]
    return frame.sort_values(keys, kind="stable", na_position="last")


def by_facet(frame: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(facet label, its rows), facets in shape order."""
    frame = sorted_cases(frame)
    yield from frame.groupby("facet_label", sort=False)


def by_series(data: ReportData, frame: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(series name, its rows): implementations in legend order, then runs."""
    order = {name: i for i, name in enumerate(data.colors)}
    groups = list(frame.groupby("series", sort=False))
    groups.sort(
        key=lambda g: (order.get(g[1]["impl"].iloc[0], 99), g[1]["run_index"].iloc[0], g[0])
    )
    yield from groups


def series_style(data: ReportData, rows: pd.DataFrame) -> tuple[str, int]:
    return data.colors.get(rows["impl"].iloc[0], "#333"), int(rows["run_index"].iloc[0])


def token_ticks(values: pd.Series, most: int = 10) -> list[float] | None:
    """Tick marks at the measured values (token counts) when there are few of them."""
    unique = sorted(float(v) for v in values.dropna().unique())
    return unique if 0 < len(unique) <= most else None


def has_items(value: Any) -> bool:
    """A list cell (samples, tokens per expert) that holds something."""
    return isinstance(value, list | tuple | np.ndarray) and len(value) > 0


def omitted(key: str, title: str, description: str, reason: str) -> Section:
    return Section(key, title, description, omitted=reason)


def no_ok_reason(data: ReportData, what: str) -> str:
    if data.ok.empty:
        total = len(data.frame)
        return f"no case finished ok ({total} cases, all failed or not timed), so no {what}"
    return f"the runs hold no {what}"


def positive_rows(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    mask = pd.Series(True, index=frame.index)
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        mask &= values.notna() & (values > 0)
    return frame[mask]


def line_traces(
    data: ReportData,
    frame: pd.DataFrame,
    x: str,
    y: str,
    x_name: str,
    y_name: str,
    y_format: str,
) -> list[go.Scatter]:
    traces = []
    for name, rows in by_series(data, frame):
        rows = rows.sort_values(x)
        color, run = series_style(data, rows)
        traces.append(
            go.Scatter(
                x=rows[x].tolist(),
                y=rows[y].tolist(),
                mode="lines+markers",
                name=name,
                legendgroup=name,
                line={"color": color, "dash": run_dash(run), "width": 2},
                marker={"symbol": run_symbol(run), "size": 7, "color": color},
                hovertext=rows["case_label"].tolist(),
                hovertemplate=(
                    f"%{{hovertext}}<br>{x_name}: %{{x}}<br>"
                    f"{y_name}: %{{y:{y_format}}}<extra></extra>"
                ),
            )
        )
    return traces


# -- the sections ----------------------------------------------------------------------


def against_tokens(
    data: ReportData,
    rows: pd.DataFrame,
    column: str,
    unit: str,
    number_format: str,
    y_title: str,
    title: str,
) -> go.Figure:
    """`column` against tokens per call, log-log, a line per implementation, a panel per
    layer shape."""
    panels = [
        Panel(
            facet,
            line_traces(data, part, "tokens", column, "tokens", unit, number_format),
            x_ticks=token_ticks(part["tokens"]),
        )
        for facet, part in by_facet(rows)
    ]
    return faceted(panels, Axes("tokens per call", y_title, x_log=True, y_log=True), title=title)


def case_bars(
    data: ReportData, rows: pd.DataFrame
) -> Iterator[tuple[str, pd.DataFrame, list[str]]]:
    """(facet label, its rows by tokens then implementation, a bar label per row) for
    figures with a bar per case: 'grouped T64' (and the run, when several are compared)."""
    for facet, part in by_facet(rows):
        part = part.sort_values(["tokens", "impl", "run_index"])
        labels = [
            f"{impl} T{int(t)}" + (f" {r}" if data.multi_run else "")
            for impl, t, r in zip(part["impl"], part["tokens"], part["run_label"])
        ]
        yield facet, part, labels
