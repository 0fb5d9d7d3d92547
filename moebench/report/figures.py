"""Every figure of the report, one function per question a reader asks. Each returns a
`Section`: its figures, or the one-line reason it was left out (a figure is never drawn
empty), plus notes and an optional small table.

Colours: one per implementation (style.impl_colors), the same in every figure; a run is
told by its line dash and marker. Only imported while a report is built (imports plotly).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moebench.report.data import (
    REGRESSION_RATIO,
    ReportData,
    run_comparison,
    series_options,
    thin_samples,
)
from moebench.report.facets import Axes, Panel, faceted
from moebench.report.style import (
    PARAM_COLORS,
    PART_COLORS,
    REGRESSION_COLOR,
    ROOF_COLOR,
    SAME_BAND_COLOR,
    base_layout,
    run_dash,
    run_symbol,
)

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
MAX_LISTED_REGRESSIONS = 25
MAX_OVERVIEW_BARS = 30
RUN_OPACITY = (1.0, 0.6, 0.4, 0.3)  # bars of later runs fade


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


def build_sections(data: ReportData) -> list[Section]:
    """All sections, in reading order."""
    builders: list[Callable[[ReportData], Section]] = [
        overview,
        throughput,
        latency,
        memory,
        parameters,
        roofline,
        balance,
        communication,
        energy,
        fidelity,
        run_speedups,
    ]
    sections = [build(data) for build in builders]
    legend = series_options(data.frame)
    if legend:
        note = "Options behind the legend names: " + "; ".join(
            f"{name} = {text}" for name, text in legend.items()
        )
        for section in sections:
            if section.figures:
                section.notes.append(note)
    return sections


# -- helpers ---------------------------------------------------------------------------


def _sorted_cases(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [k for k in SHAPE_ORDER if k in frame.columns] + ["tokens"]
    return frame.sort_values(keys, kind="stable", na_position="last")


def _facets(frame: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(facet label, its rows), facets in shape order."""
    frame = _sorted_cases(frame)
    yield from frame.groupby("facet_label", sort=False)


def _series(data: ReportData, frame: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(series name, its rows): implementations in legend order, then runs."""
    order = {name: i for i, name in enumerate(data.colors)}
    groups = list(frame.groupby("series", sort=False))
    groups.sort(
        key=lambda g: (order.get(g[1]["impl"].iloc[0], 99), g[1]["run_index"].iloc[0], g[0])
    )
    yield from groups


def _style(data: ReportData, rows: pd.DataFrame) -> tuple[str, int]:
    return data.colors.get(rows["impl"].iloc[0], "#333"), int(rows["run_index"].iloc[0])


def _ticks(values: pd.Series, most: int = 10) -> list[float] | None:
    """Tick marks at the measured values (token counts) when there are few of them."""
    unique = sorted(float(v) for v in values.dropna().unique())
    return unique if 0 < len(unique) <= most else None


def _has_items(value: Any) -> bool:
    """A list cell (samples, tokens per expert) that holds something."""
    return isinstance(value, list | tuple | np.ndarray) and len(value) > 0


def _omitted(key: str, title: str, description: str, reason: str) -> Section:
    return Section(key, title, description, omitted=reason)


def _no_ok_reason(data: ReportData, what: str) -> str:
    if data.ok.empty:
        total = len(data.frame)
        return f"no case finished ok ({total} cases, all failed or not timed), so no {what}"
    return f"the runs hold no {what}"


def _positive(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    mask = pd.Series(True, index=frame.index)
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        mask &= values.notna() & (values > 0)
    return frame[mask]


def _line_traces(
    data: ReportData,
    frame: pd.DataFrame,
    x: str,
    y: str,
    x_name: str,
    y_name: str,
    y_format: str,
) -> list[go.Scatter]:
    traces = []
    for name, rows in _series(data, frame):
        rows = rows.sort_values(x)
        color, run = _style(data, rows)
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


def overview(data: ReportData) -> Section:
    """Per layer shape, each implementation's speed relative to the base layer (geometric
    mean over the shape's token counts): who wins where, in one picture."""
    key = "overview"
    bases = " / ".join(sorted({b for b in data.base_impls.values() if b})) or "base"
    title = f"Speed relative to {bases}, per layer shape"
    description = (
        f"Geometric mean over tokens per call of each implementation's speed relative to "
        f"{bases} on the same case (taller is faster; the dotted line is {bases} itself). "
        "Hatched bars are variants that compute a different function."
    )
    rows = data.ok[data.ok["base_speedup"].notna() & (data.ok["base_speedup"] > 0)]
    if rows.empty:
        reason = (
            _no_ok_reason(data, "speeds")
            if data.ok.empty
            else ("no base layer (grouped or reference) was measured beside the others")
        )
        return _omitted(key, title, description, reason)
    facets = list(dict.fromkeys(_sorted_cases(rows)["facet_label"]))
    traces = []
    many = len(facets) > MAX_OVERVIEW_BARS
    matrix, names = [], []
    for name, series in _series(data, rows):
        color, run = _style(data, series)
        grouped = series.groupby("facet_label")["base_speedup"]
        geomean = np.exp(grouped.apply(lambda v: np.log(v).mean())).reindex(facets)
        lows, highs = grouped.min().reindex(facets), grouped.max().reindex(facets)
        counts = grouped.count().reindex(facets)
        hover = [
            f"{name} on {f}: {g:.3g}x {bases}"
            + (f" (from {lo:.3g}x to {hi:.3g}x over {n:.0f} token counts)" if n > 1 else "")
            for f, g, lo, hi, n in zip(facets, geomean, lows, highs, counts)
        ]
        variant = not bool(series["exact"].fillna(True).iloc[0])
        if many:
            matrix.append(np.log2(geomean.to_numpy(dtype=float)).round(3).tolist())
            names.append(name)
            continue
        traces.append(
            go.Bar(
                x=facets,
                y=geomean.round(4).tolist(),
                name=name,
                legendgroup=name,
                marker={
                    "color": color,
                    "pattern": {"shape": "/" if variant else ""},
                    "opacity": RUN_OPACITY[min(run, len(RUN_OPACITY) - 1)],
                },
                hovertext=hover,
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )
    if many:
        traces = [
            go.Heatmap(
                z=matrix,
                x=facets,
                y=names,
                colorscale="RdBu",
                zmid=0,
                colorbar={"title": {"text": "log2 speed"}},
                hovertemplate="%{y} on %{x}: 2^%{z:.2f} x the base<extra></extra>",
            )
        ]
        axes = Axes("layer shape", "implementation")
    else:
        axes = Axes("layer shape", f"speed relative to {bases} (x)", y_log=True)
    figure = faceted(
        [Panel("", traces)],
        axes,
        title=f"Speed relative to {bases} (geometric mean)",
        hlines=() if many else (1.0,),
        layout={"barmode": "group", "bargap": 0.2},
    )
    return Section(key, title, description, figures=[(f"fig-{key}", figure)])


def _against_tokens(
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
            _line_traces(data, part, "tokens", column, "tokens", unit, number_format),
            x_ticks=_ticks(part["tokens"]),
        )
        for facet, part in _facets(rows)
    ]
    return faceted(panels, Axes("tokens per call", y_title, x_log=True, y_log=True), title=title)


def throughput(data: ReportData) -> Section:
    """Tokens per second against tokens per call, log-log, one panel per layer shape."""
    key, title = "throughput", "Throughput"
    description = (
        "Tokens per second against tokens per call (log-log), one panel per layer shape; "
        "higher is better. One colour per implementation."
    )
    rows = _positive(data.ok, "tokens_per_s", "tokens")
    if rows.empty:
        return _omitted(key, title, description, _no_ok_reason(data, "throughput"))
    figure = _against_tokens(
        data,
        rows,
        "tokens_per_s",
        "tokens/s",
        ".3s",
        "throughput (tokens/s)",
        "Throughput (tokens/s) vs tokens per call",
    )
    return Section(key, title, description, figures=[(f"fig-{key}", figure)])


def latency(data: ReportData) -> Section:
    """Box plots of every case's latency samples, grouped by tokens, one panel per shape."""
    key, title = "latency", "Latency distribution"
    description = (
        "Every timed call of every case (at most 200 samples a case, spread evenly over "
        "their sorted values): the box is p25-p75 with the median, whiskers 1.5 IQR."
    )
    ok = data.ok
    rows = ok[ok["samples_ms"].map(_has_items)]
    if rows.empty:
        return _omitted(key, title, description, _no_ok_reason(data, "latency samples"))
    panels = []
    for facet, part in _facets(rows):
        categories = [f"T{int(t)}" for t in sorted(part["tokens"].unique())]
        traces = []
        for name, series in _series(data, part):
            color, _ = _style(data, series)
            xs: list[str] = []
            ys: list[float] = []
            ordered = series.sort_values("tokens")
            for tokens, raw in zip(ordered["tokens"], ordered["samples_ms"]):
                samples = thin_samples(raw)
                xs += [f"T{int(tokens)}"] * len(samples)
                ys += samples
            traces.append(
                go.Box(
                    x=np.array(xs),
                    y=np.array(ys),
                    name=name,
                    legendgroup=name,
                    offsetgroup=name,
                    marker={"color": color},
                    line={"color": color, "width": 1.5},
                    boxpoints=False,
                    hovertemplate=f"{name} · {facet} · %{{x}}<br>%{{y:.3g}} ms<extra></extra>",
                )
            )
        panels.append(Panel(facet, traces, x_categories=categories))
    figure = faceted(
        panels,
        Axes("tokens per call", "latency per call (ms)", y_log=True),
        title="Latency per call (ms): distribution of the timed samples",
        layout={"boxmode": "group"},
    )
    return Section(key, title, description, figures=[(f"fig-{key}", figure)])


MEMORY_KINDS = (
    ("peak_mem_bytes", "peak", "circle"),
    ("weight_bytes", "weights", "square"),
    ("activation_bytes", "activations", "triangle-up-open"),
)


def memory(data: ReportData) -> Section:
    """Peak, weight and activation bytes against the number of experts and the tokens."""
    key, title = "memory", "Memory"
    description = (
        "Peak memory of one call, the layer's weights and what the call added over them "
        "(activations and workspaces), against the number of experts and the tokens per "
        "call. The marker tells which; the colour, the implementation."
    )
    ok = data.ok
    columns = [kind[0] for kind in MEMORY_KINDS]
    values = ok[columns].apply(pd.to_numeric, errors="coerce")
    rows = ok[(values > 0).any(axis=1)]
    if rows.empty:
        return _omitted(key, title, description, _no_ok_reason(data, "memory measurements"))
    figure = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.05,
        subplot_titles=["against the number of experts", "against tokens per call"],
    )
    hidden_zeros = 0
    for col, x in enumerate(("num_experts", "tokens"), start=1):
        prefix = "E" if x == "num_experts" else "T"
        categories = [f"{prefix}{int(v)}" for v in sorted(rows[x].dropna().unique())]
        figure.update_xaxes(categoryorder="array", categoryarray=categories, row=1, col=col)
        for name, series in _series(data, rows):
            color, _ = _style(data, series)
            for index, (column, kind, symbol) in enumerate(MEMORY_KINDS):
                mib = pd.to_numeric(series[column], errors="coerce") / MIB
                keep = mib > 0
                if col == 1:
                    hidden_zeros += int((mib == 0).sum())
                if not keep.any():
                    continue
                figure.add_trace(
                    go.Scatter(
                        x=[f"{prefix}{int(v)}" for v in series.loc[keep, x]],
                        y=mib[keep].round(4).tolist(),
                        mode="markers",
                        name=name,
                        legendgroup=name,
                        offsetgroup=name,
                        showlegend=col == 1 and index == 0,
                        marker={
                            "symbol": symbol,
                            "color": color,
                            "size": 9,
                            "line": {"width": 1.5, "color": color},
                        },
                        hovertext=[f"{label} · {kind}" for label in series.loc[keep, "case_label"]],
                        hovertemplate="%{hovertext}<br>%{y:.4g} MiB<extra></extra>",
                    ),
                    row=1,
                    col=col,
                )
    for _, kind, symbol in MEMORY_KINDS:
        figure.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=kind,
                legendgroup="kinds",
                legendgrouptitle_text="marker",
                marker={"symbol": symbol, "color": "#555", "size": 9, "line": {"width": 1.5}},
            ),
            row=1,
            col=1,
        )
    figure.update_xaxes(type="category", showline=True, linecolor="#bbb")
    figure.update_yaxes(type="log", showline=True, linecolor="#bbb")
    figure.update_xaxes(title_text="number of routed experts", row=1, col=1)
    figure.update_xaxes(title_text="tokens per call", row=1, col=2)
    figure.update_yaxes(title_text="memory (MiB)", row=1, col=1)
    figure.update_layout(
        **base_layout(
            title={"text": "Memory (MiB): peak, weights, activations", "x": 0.01},
            height=480,
            scattermode="group",
            scattergap=0.5,
        )
    )
    section = Section(key, title, description, figures=[(f"fig-{key}", figure)])
    if hidden_zeros:
        section.notes.append(
            f"{hidden_zeros} zero values (nothing added over the weights) are not drawn on "
            "the log axis."
        )
    if (rows["device"] == "cpu").any():
        section.notes.append(
            "On CPU the peak is the process's resident set size: an upper bound, best effort."
        )
    return section


def parameters(data: ReportData) -> Section:
    """Total, active-per-token and touched parameters per layer shape: the MoE story."""
    key, title = "parameters", "Parameters: total, active, touched"
    description = (
        "Per layer shape: parameters the MoE layer holds, those one token uses (top-k "
        "experts + shared + router), and those a whole batch touched (distinct experts "
        "used; the most over the shape's cases). Layers with their own structure (the dense "
        "FFN with the same active parameters) are drawn beside them in their colour."
    )
    rows = _positive(data.ok, "total_params")
    if rows.empty:
        return _omitted(key, title, description, _no_ok_reason(data, "parameter counts"))
    rows = _sorted_cases(rows)
    exact = rows[rows["exact"].fillna(True).astype(bool)]
    moe = exact if not exact.empty else rows
    shapes = list(dict.fromkeys(rows["shape_label"]))
    by_shape = moe.groupby("shape_label", sort=False)
    figure = go.Figure()
    moe_profile: dict[str, tuple[float, float]] = {}
    for label, column, how in (
        ("total", "total_params", "max"),
        ("active per token", "active_params", "median"),
        ("touched by the batch", "touched_params", "max"),
    ):
        agg = by_shape[column].agg(["min", "max", "median", "count"]).reindex(shapes)
        hover = [
            f"{shape}<br>{label}: {row[how]:,.0f}"
            + (
                f" (range {row['min']:,.0f}-{row['max']:,.0f} over {row['count']:.0f} cases)"
                if row["min"] != row["max"]
                else ""
            )
            for shape, row in agg.iterrows()
        ]
        figure.add_trace(
            go.Bar(
                x=shapes,
                y=agg[how].tolist(),
                name=label,
                marker_color=PARAM_COLORS[label],
                legendgroup="MoE layer",
                legendgrouptitle_text="MoE layer",
                texttemplate="%{y:.3s}",
                textposition="outside",
                cliponaxis=False,
                hovertext=hover,
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )
        if label != "touched by the batch":
            for shape, value in agg[how].items():
                total, active = moe_profile.get(shape, (math.nan, math.nan))
                moe_profile[shape] = (value, active) if label == "total" else (total, value)
    for impl in data.colors:
        own = rows[rows["impl"] == impl]
        if own.empty:
            continue
        profile = own.groupby("shape_label", sort=False)[["total_params", "active_params"]].max()
        differs = [
            s
            for s, r in profile.iterrows()
            if (r["total_params"], r["active_params"]) != moe_profile.get(s)
        ]
        if not differs or impl in set(moe["impl"]):
            continue
        all_active = all(
            profile.loc[s, "total_params"] == profile.loc[s, "active_params"] for s in differs
        )
        name = f"{impl}: total = active" if all_active else f"{impl}: total"
        figure.add_trace(
            go.Bar(
                x=differs,
                y=[float(profile.loc[s, "total_params"]) for s in differs],
                name=name,
                marker_color=data.colors[impl],
                legendgroup="other",
                legendgrouptitle_text="other",
                texttemplate="%{y:.3s}",
                textposition="outside",
                cliponaxis=False,
                hovertemplate=f"%{{x}}<br>{impl}: %{{y:,.0f}} parameters<extra></extra>",
            )
        )
    figure.update_layout(
        **base_layout(
            title={"text": "Parameters per layer shape (log scale)", "x": 0.01},
            barmode="group",
            height=460,
            legend={"title": {"text": ""}},
            bargap=0.25,
        )
    )
    figure.update_yaxes(type="log", title_text="parameters", showline=True, linecolor="#bbb")
    figure.update_xaxes(
        title_text="layer shape (D hidden, F ffn, E experts, k top-k)",
        showline=True,
        linecolor="#bbb",
    )
    section = Section(key, title, description, figures=[(f"fig-{key}", figure)])
    ratios = [t / a for t, a in moe_profile.values() if a and a == a and t == t]
    if ratios:
        section.notes.append(
            f"The MoE layer holds {min(ratios):.1f}x to {max(ratios):.1f}x the parameters "
            "one token uses."
            if min(ratios) != max(ratios)
            else f"The MoE layer holds {ratios[0]:.1f}x the parameters one token uses."
        )
    return section


def _roof_traces(data: ReportData, rows: pd.DataFrame, ai: pd.Series) -> list[go.Scatter]:
    lo, hi = float(ai.min()) / 3, float(ai.max()) * 3
    traces = []
    for run in data.runs:
        ceilings = run.meta.get("ceilings") or {}
        bandwidth = ceilings.get("copy_gbps")
        dtypes = sorted(set(rows.loc[rows["run_index"] == run.index, "dtype"].dropna()))
        for dtype in dtypes:
            peak = ceilings.get(f"matmul_tflops_{dtype}")
            if not bandwidth or not peak:
                continue
            knee = peak * 1e3 / bandwidth
            xs = sorted({*np.geomspace(lo, hi, 48).tolist(), *([knee] if lo < knee < hi else [])})
            ys = [min(peak, bandwidth * x / 1e3) for x in xs]
            name = f"roof {dtype}" + (f" · {run.label}" if data.multi_run else "")
            traces.append(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    name=name,
                    legendgroup="roofs",
                    legendgrouptitle_text="measured ceilings",
                    line={"color": ROOF_COLOR, "dash": run_dash(run.index), "width": 1.5},
                    hovertemplate=(
                        f"{name}: copy {bandwidth:.4g} GB/s, {dtype} matmul {peak:.4g} TFLOP/s"
                        "<br>%{x:.3g} FLOP/byte -> %{y:.3g} TFLOP/s<extra></extra>"
                    ),
                )
            )
    return traces


def roofline(data: ReportData) -> Section:
    """Achieved TFLOP/s against arithmetic intensity under the run's measured ceilings."""
    key, title = "roofline", "Roofline"
    description = (
        "Achieved rate against arithmetic intensity (FLOPs / least bytes a call must move), "
        "under the roofs this run measured on its device (copy bandwidth and matrix-product "
        "rate). Right: each case's fraction of its roof (1 = at the ceiling)."
    )
    rows = _positive(data.ok, "achieved_tflops", "flops", "min_bytes")
    if rows.empty:
        return _omitted(key, title, description, _no_ok_reason(data, "FLOP or byte counts"))
    rows = rows.assign(intensity=rows["flops"] / rows["min_bytes"])
    fractions = _positive(rows, "roofline_frac")
    two = not fractions.empty
    figure = make_subplots(
        rows=1,
        cols=2 if two else 1,
        column_widths=[0.68, 0.32] if two else None,
        horizontal_spacing=0.1,
        subplot_titles=(
            ["achieved vs arithmetic intensity", "fraction of the roof per case"] if two else None
        ),
    )
    roofs = _roof_traces(data, rows, rows["intensity"])
    for trace in roofs:
        figure.add_trace(trace, row=1, col=1)
    for name, series in _series(data, rows):
        color, run = _style(data, series)
        frac = series["roofline_frac"].map(
            lambda v: f"{v:.1%} of the roof" if v == v and v is not None else "no roof"
        )
        figure.add_trace(
            go.Scatter(
                x=series["intensity"].round(4).tolist(),
                y=series["achieved_tflops"].tolist(),
                mode="markers",
                name=name,
                legendgroup=name,
                marker={"color": color, "symbol": run_symbol(run), "size": 9, "opacity": 0.85},
                hovertext=[f"{c}<br>{f}" for c, f in zip(series["case_label"], frac)],
                hovertemplate=(
                    "%{hovertext}<br>%{x:.3g} FLOP/byte, %{y:.3g} TFLOP/s<extra></extra>"
                ),
            ),
            row=1,
            col=1,
        )
    if two:
        for name, series in _series(data, fractions):
            color, _ = _style(data, series)
            figure.add_trace(
                go.Box(
                    x=[name] * len(series),
                    y=series["roofline_frac"].tolist(),
                    name=name,
                    legendgroup=name,
                    showlegend=False,
                    boxpoints="all",
                    jitter=0.5,
                    pointpos=0,
                    marker={"color": color, "size": 6},
                    line={"color": color, "width": 1},
                    fillcolor="rgba(0,0,0,0)",
                    hoveron="points",
                    hovertext=series["case_label"].tolist(),
                    hovertemplate="%{hovertext}<br>%{y:.2%} of the roof<extra></extra>",
                ),
                row=1,
                col=2,
            )
        figure.update_yaxes(
            type="log", title_text="fraction of the roof (floor time / measured time)", row=1, col=2
        )
        figure.update_xaxes(title_text="implementation", row=1, col=2)
    figure.update_xaxes(type="log", title_text="arithmetic intensity (FLOP/byte)", row=1, col=1)
    figure.update_yaxes(type="log", title_text="achieved (TFLOP/s)", row=1, col=1)
    figure.update_xaxes(showline=True, linecolor="#bbb")
    figure.update_yaxes(showline=True, linecolor="#bbb")
    figure.update_layout(
        **base_layout(
            title={"text": "Roofline: achieved TFLOP/s vs arithmetic intensity", "x": 0.01},
            height=500,
        )
    )
    section = Section(key, title, description, figures=[(f"fig-{key}", figure)])
    if not roofs:
        section.notes.append("The runs stored no measured ceilings: roof lines left out.")
    if not two:
        section.notes.append("No case has a roofline fraction (no ceilings for its dtype).")
    return section


def _balance_rows(data: ReportData, rows: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct (routing outcome, case except impl and run): implementations
    and runs that saw the same tokens per expert share a row."""
    entries: dict[tuple, dict[str, Any]] = {}
    for row in _sorted_cases(rows).to_dict("records"):
        counts = tuple(int(v) for v in row["tokens_per_expert"])
        dropped = row.get("dropped_frac")
        dropped = None if dropped is None or dropped != dropped else round(float(dropped), 6)
        key = (row["facet_label"], int(row["tokens"]), counts, dropped)
        entry = entries.setdefault(
            key,
            {
                "impls": [],
                "facet": row["facet_label"],
                "tokens": int(row["tokens"]),
                "top_k": int(row["top_k"]),
                "counts": counts,
                "dropped": dropped,
                "runs": [],
            },
        )
        if row["impl"] not in entry["impls"]:
            entry["impls"].append(row["impl"])
        if row["run_label"] not in entry["runs"]:
            entry["runs"].append(row["run_label"])
    out = pd.DataFrame(list(entries.values()))
    # Routing is seeded, so runs usually agree; name the runs only where they do not.
    suffix = [
        f" · {', '.join(r)}" if data.multi_run and len(r) < len(data.runs) else ""
        for r in out["runs"]
    ]
    labels = [
        f"{', '.join(impls)} · {facet} · T{tokens}{s}"
        for impls, facet, tokens, s in zip(out["impls"], out["facet"], out["tokens"], suffix)
    ]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:  # heatmap rows need distinct names
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out.assign(label=unique)


def _load_scale(top: float) -> list[list[Any]]:
    """Blue under a uniform share, white at it (1), red over it, up to `top`."""
    return (
        [
            [0.0, "#2166ac"],
            [0.5 / top, "#92c5de"],
            [1.0 / top, "#f7f7f7"],
            [min(1.0, 2.0 / top), "#f4a582"],
            [1.0, "#b2182b"],
        ]
        if top > 2.0
        else [
            [0.0, "#2166ac"],
            [0.25, "#92c5de"],
            [0.5, "#f7f7f7"],
            [0.75, "#f4a582"],
            [1.0, "#b2182b"],
        ]
    )


def balance(data: ReportData) -> Section:
    """Tokens per expert (relative to a uniform share) per case, and dropped tokens."""
    key, title = "balance", "Load balance"
    description = (
        "Tokens each expert received, relative to a uniform share (tokens x top-k / "
        "experts; 1 = balanced, white). Implementations that routed identically share a row. "
        "Right: the fraction of token-expert assignments dropped (capacity limits)."
    )
    ok = data.ok
    rows = ok[ok["tokens_per_expert"].map(_has_items)]
    if rows.empty:
        return _omitted(key, title, description, _no_ok_reason(data, "tokens-per-expert counts"))
    figures = []
    for experts in sorted(rows["tokens_per_expert"].map(len).unique()):
        part = rows[rows["tokens_per_expert"].map(len) == experts]
        table = _balance_rows(data, part)
        shares = np.array([list(c) for c in table["counts"]], dtype=float)
        expected = (table["tokens"] * table["top_k"] / experts).to_numpy()[:, None]
        relative = np.round(shares / np.where(expected > 0, expected, 1), 3)
        top = max(2.0, float(relative.max()) if relative.size else 2.0)
        has_drops = table["dropped"].notna().any()
        figure = make_subplots(
            rows=1,
            cols=2 if has_drops else 1,
            shared_yaxes=True,
            horizontal_spacing=0.02,
            column_widths=[0.64, 0.36] if has_drops else None,
        )
        figure.add_trace(
            go.Heatmap(
                z=relative.tolist(),
                x=list(range(experts)),
                y=table["label"].tolist(),
                customdata=shares.astype(int).tolist(),
                colorscale=_load_scale(top),
                zmin=0,
                zmax=top,
                colorbar={"title": {"text": "load / uniform"}, "x": 1.02, "len": 0.9},
                hovertemplate=(
                    "%{y}<br>expert %{x}: %{customdata} tokens (%{z:.2f}x a uniform share)"
                    "<extra></extra>"
                ),
            ),
            row=1,
            col=1,
        )
        if has_drops:
            colors = [data.colors.get(impls[0], "#333") for impls in table["impls"]]
            figure.add_trace(
                go.Bar(
                    y=table["label"].tolist(),
                    x=(table["dropped"].fillna(0) * 100).tolist(),
                    orientation="h",
                    marker_color=colors,
                    showlegend=False,
                    name="dropped",
                    hovertemplate="%{y}<br>dropped %{x:.2f}% of assignments<extra></extra>",
                ),
                row=1,
                col=2,
            )
            figure.update_xaxes(title_text="dropped (%)", rangemode="tozero", row=1, col=2)
        figure.update_xaxes(
            title_text="expert index", row=1, col=1, dtick=1 if experts <= 32 else None
        )
        figure.update_yaxes(autorange="reversed", title_text="case", row=1, col=1)
        figure.update_yaxes(tickfont={"size": 10})
        height = int(min(1800, max(320, 130 + 20 * len(table))))
        figure.update_layout(
            **base_layout(
                title={
                    "text": f"Tokens per expert, {experts} experts (relative to uniform)",
                    "x": 0.01,
                },
                height=height,
                showlegend=False,
                margin={"l": 20, "r": 20, "t": 50, "b": 60},
            )
        )
        figure.update_yaxes(automargin=True)
        figures.append((f"fig-{key}-e{experts}", figure))
    return Section(key, title, description, figures=figures)


def communication(data: ReportData) -> Section:
    """Compute, dispatch and combine time stacked per case, where there was communication."""
    key, title = "communication", "Communication"
    description = (
        "Time per call split into compute, token dispatch and combine (all-to-all), for "
        "cases that communicated (comm_ms > 0)."
    )
    rows = _positive(data.ok, "comm_ms")
    if rows.empty:
        return _omitted(
            key,
            title,
            description,
            "no case communicated (comm_ms is 0 or missing: single-device runs)",
        )
    panels = []
    for facet, part in _facets(rows):
        part = part.sort_values(["tokens", "impl", "run_index"])
        labels = [
            f"{impl} T{int(t)}" + (f" {r}" if data.multi_run else "")
            for impl, t, r in zip(part["impl"], part["tokens"], part["run_label"])
        ]
        comm = part["comm_ms"].fillna(0)
        dispatch = part["dispatch_ms"].fillna(0)
        combine = part["combine_ms"].fillna(0)
        parts = {
            "compute": (part["latency_ms"] - comm).clip(lower=0),
            "dispatch": dispatch,
            "combine": combine,
            "other comm": (comm - dispatch - combine).clip(lower=0),
        }
        traces = [
            go.Bar(
                x=labels,
                y=values.round(5).tolist(),
                name=name,
                legendgroup=name,
                marker_color=PART_COLORS[name],
                hovertext=part["case_label"].tolist(),
                hovertemplate=f"%{{hovertext}}<br>{name}: %{{y:.3g}} ms<extra></extra>",
            )
            for name, values in parts.items()
            if (values > 0).any()
        ]
        panels.append(Panel(facet, traces))
    figure = faceted(
        panels,
        Axes("case (implementation, tokens per call)", "time per call (ms)"),
        title="Where the time goes: compute vs communication (ms)",
        layout={"barmode": "stack", "legend": {"title": {"text": "part"}}},
    )
    return Section(key, title, description, figures=[(f"fig-{key}", figure)])


def energy(data: ReportData) -> Section:
    """Joules per token against tokens per call, where the device reported energy."""
    key, title = "energy", "Energy"
    description = (
        "Energy per token (NVML's energy counter over back-to-back calls); lower is better."
    )
    rows = _positive(data.ok, "j_per_token", "tokens")
    if rows.empty:
        return _omitted(
            key,
            title,
            description,
            "no energy readings (the device cannot say: CPU, or no NVML energy counter)",
        )
    figure = _against_tokens(
        data,
        rows,
        "j_per_token",
        "J/token",
        ".3g",
        "energy per token (J)",
        "Energy per token (J) vs tokens per call",
    )
    return Section(key, title, description, figures=[(f"fig-{key}", figure)])


def fidelity(data: ReportData) -> Section:
    """Speedup over the base layer against the deviation from it, for variants."""
    key, title = "fidelity", "Fidelity vs speed (variants)"
    description = (
        "Implementations that change the function on purpose (dropped tokens, dense FFN, "
        "...): how much faster than the base layer on the same case, against how far their "
        "output is from the base model's (relative L2 error). Up and left is better."
    )
    ok = data.ok
    rows = ok[ok["fidelity_err"].notna()]
    if rows.empty:
        return _omitted(key, title, description, "no variant implementation in the runs")
    rows = rows[rows["base_speedup"].notna() & (rows["base_speedup"] > 0)]
    if rows.empty:
        return _omitted(
            key,
            title,
            description,
            "no base layer (grouped or reference) was measured on the variants' cases",
        )
    positive = rows.loc[rows["fidelity_err"] > 0, "fidelity_err"]
    floor = float(positive.min()) / 10 if len(positive) else 1e-9
    traces = []
    for name, series in _series(data, rows):
        color, run = _style(data, series)
        errors = series["fidelity_err"].clip(lower=floor)
        traces.append(
            go.Scatter(
                x=errors.tolist(),
                y=series["base_speedup"].round(4).tolist(),
                mode="markers",
                name=name,
                legendgroup=name,
                marker={"color": color, "symbol": run_symbol(run), "size": 10, "opacity": 0.85},
                hovertext=[
                    f"{c}<br>error {e:.3g}, {s:.3g}x {b}'s speed"
                    for c, e, s, b in zip(
                        series["case_label"],
                        series["fidelity_err"],
                        series["base_speedup"],
                        series["base_impl"],
                    )
                ],
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )
    bases = sorted(set(rows["base_impl"].dropna()))
    figure = faceted(
        [Panel("", traces)],
        Axes(
            "fidelity error vs base model (relative L2)",
            f"speedup over {' / '.join(bases)} (x)",
            x_log=True,
            y_log=True,
        ),
        title="Fidelity vs speed: variants against the base layer",
        hlines=(1.0,),
    )
    section = Section(key, title, description, figures=[(f"fig-{key}", figure)])
    if (rows["fidelity_err"] <= 0).any():
        section.notes.append(f"Errors of exactly 0 are drawn at {floor:.2g} (log axis).")
    return section


def run_speedups(data: ReportData) -> Section:
    """Each later run against the first, case by case; regressions in red."""
    key, title = "comparison", "Run against run"
    description = (
        "Speedup of each run over the first (R1) on the same case (time in R1 / time in the "
        f"run; > 1 is faster), cases sorted by it. Below 1/{REGRESSION_RATIO:g} is a "
        "regression (red)."
    )
    if not data.multi_run:
        return _omitted(key, title, description, "one run: nothing to compare (name two or more)")
    table = run_comparison(data)
    if table.empty:
        return _omitted(
            key,
            title,
            description,
            "no case finished ok in both the first run and a later one (nothing matched)",
        )
    panels = []
    for run in data.runs[1:]:
        part = table[table["run_index"] == run.index].sort_values("speedup")
        if part.empty:
            continue
        part = part.assign(rank=range(1, len(part) + 1))
        traces = []
        regressed = part["verdict"] == "regression"
        for impl in data.colors:
            mine = part[(part["impl"] == impl) & ~regressed]
            if not mine.empty:
                traces.append(_comparison_trace(mine, impl, data.colors[impl], run.label))
        if regressed.any():
            traces.append(
                _comparison_trace(
                    part[regressed],
                    f"regression (< {1 / REGRESSION_RATIO:.3f}x)",
                    REGRESSION_COLOR,
                    run.label,
                    size=11,
                )
            )
        panels.append(Panel(f"{run.label} vs R1", traces))
    figure = faceted(
        panels,
        Axes("cases, slowest to fastest", "speedup over R1 (x)", y_log=True),
        title="Speedup of each run over the first (per matched case)",
        hlines=(1.0,),
        band=(1 / REGRESSION_RATIO, REGRESSION_RATIO),
        band_color=SAME_BAND_COLOR,
    )
    section = Section(key, title, description, figures=[(f"fig-{key}", figure)])
    for run in data.runs[1:]:
        part = table[table["run_index"] == run.index]
        counts = part["verdict"].value_counts()
        unmatched = run.cases - len(part)
        geomean = float(np.exp(np.log(part["speedup"]).mean())) if len(part) else math.nan
        section.notes.append(
            f"{run.label} vs R1: {len(part)} matched cases, geometric-mean speedup "
            f"{geomean:.3f}x; {counts.get('improvement', 0)} faster, "
            f"{counts.get('regression', 0)} slower (regressions), {counts.get('same', 0)} "
            f"within {REGRESSION_RATIO:g}x; {unmatched} not matched or not ok."
        )
    worst = table[table["verdict"] == "regression"].sort_values("speedup")
    if not worst.empty:
        shown = worst.head(MAX_LISTED_REGRESSIONS)
        section.table = TableData(
            headers=["run", "case", "R1 ms", "run ms", "speedup"],
            rows=[
                [
                    r["run_label"],
                    r["case_label"],
                    f"{r['base_ms']:.4g}",
                    f"{r['latency_ms']:.4g}",
                    f"{r['speedup']:.3f}x",
                ]
                for r in shown.to_dict("records")
            ],
            row_classes=["regression"] * len(shown),
        )
        if len(worst) > len(shown):
            section.notes.append(
                f"The table lists the {len(shown)} worst of {len(worst)} regressions."
            )
    return section


def _comparison_trace(
    part: pd.DataFrame, name: str, color: str, run_label: str, size: int = 8
) -> go.Scatter:
    return go.Scatter(
        x=part["rank"].tolist(),
        y=part["speedup"].round(4).tolist(),
        mode="markers",
        name=name,
        legendgroup=name,
        marker={"color": color, "size": size, "line": {"width": 0.5, "color": "#333"}},
        hovertext=[
            f"{c}<br>R1 {b:.4g} ms, {run_label} {m:.4g} ms"
            for c, b, m in zip(part["case_label"], part["base_ms"], part["latency_ms"])
        ],
        hovertemplate="%{hovertext}<br>speedup %{y:.3f}x<extra></extra>",
    )
