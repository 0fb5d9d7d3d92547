"""Cost figures: memory, parameters (total, active, touched), the roofline and energy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moebench.report.data import ReportData
from moebench.report.sections import (
    MIB,
    Section,
    against_tokens,
    by_series,
    no_ok_reason,
    omitted,
    positive_rows,
    series_style,
    sorted_cases,
)
from moebench.report.style import (
    PARAM_COLORS,
    ROOF_COLOR,
    base_layout,
    run_dash,
    run_symbol,
)

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
        return omitted(key, title, description, no_ok_reason(data, "memory measurements"))
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
        for name, series in by_series(data, rows):
            color, _ = series_style(data, series)
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
    rows = positive_rows(data.ok, "total_params")
    if rows.empty:
        return omitted(key, title, description, no_ok_reason(data, "parameter counts"))
    rows = sorted_cases(rows)
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
    """Each run's roof per dtype: its copy bandwidth, then the matrix rate the card
    sustains (`measure.ceilings`); fainter above it, the rate of its first products where
    the run measured one (a short call can reach it, a sustained one not)."""
    lo, hi = float(ai.min()) / 3, float(ai.max()) * 3
    traces = []
    for run in data.runs:
        ceilings = run.ceilings
        bandwidth = ceilings.get("copy_gbps")
        dtypes = sorted(set(rows.loc[rows["run_index"] == run.index, "dtype"].dropna()))
        for dtype in dtypes:
            peak = ceilings.get(f"matmul_tflops_{dtype}")
            if not bandwidth or not peak:
                continue
            label = f"{dtype}" + (f" · {run.label}" if data.multi_run else "")
            dash = run_dash(run.index)
            traces.append(_roof(f"roof {label}", bandwidth, peak, (lo, hi), dash, dtype))
            burst = ceilings.get(f"matmul_burst_tflops_{dtype}")
            if burst and burst > peak:
                traces.append(
                    _roof(f"burst roof {label}", bandwidth, burst, (lo, hi), dash, dtype, 0.4)
                )
    return traces


def _roof(
    name: str,
    bandwidth: float,
    peak: float,
    intensities: tuple[float, float],
    dash: str,
    dtype: str,
    opacity: float = 1.0,
) -> go.Scatter:
    """One roof, min(peak, bandwidth x intensity), over the `intensities` range."""
    lo, hi = intensities
    knee = peak * 1e3 / bandwidth
    xs = sorted({*np.geomspace(lo, hi, 48).tolist(), *([knee] if lo < knee < hi else [])})
    return go.Scatter(
        x=xs,
        y=[min(peak, bandwidth * x / 1e3) for x in xs],
        mode="lines",
        name=name,
        legendgroup="roofs",
        legendgrouptitle_text="measured ceilings",
        line={"color": ROOF_COLOR, "dash": dash, "width": 1.5},
        opacity=opacity,
        hovertemplate=(
            f"{name}: copy {bandwidth:.4g} GB/s, {dtype} matmul {peak:.4g} TFLOP/s"
            "<br>%{x:.3g} FLOP/byte -> %{y:.3g} TFLOP/s<extra></extra>"
        ),
    )


def roofline(data: ReportData) -> Section:
    """Achieved TFLOP/s against arithmetic intensity under the run's measured ceilings."""
    key, title = "roofline", "Roofline"
    description = (
        "Achieved rate against arithmetic intensity (FLOPs / least bytes a call must move), "
        "under the roofs this run measured on its device (copy bandwidth and the "
        "matrix-product rate the card sustains; fainter, its rate over the first products, "
        "before its power cap lowers the clock). Right: each case's fraction of its roof "
        "(1 = at the ceiling)."
    )
    rows = positive_rows(data.ok, "achieved_tflops", "flops", "min_bytes")
    if rows.empty:
        return omitted(key, title, description, no_ok_reason(data, "FLOP or byte counts"))
    rows = rows.assign(intensity=rows["flops"] / rows["min_bytes"])
    fractions = positive_rows(rows, "roofline_frac")
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
    for name, series in by_series(data, rows):
        color, run = series_style(data, series)
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
        for name, series in by_series(data, fractions):
            color, _ = series_style(data, series)
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


def energy(data: ReportData) -> Section:
    """Joules per token against tokens per call, where the device reported energy."""
    key, title = "energy", "Energy"
    description = (
        "Energy per token (NVML's energy counter over back-to-back calls); lower is better."
    )
    rows = positive_rows(data.ok, "j_per_token", "tokens")
    if rows.empty:
        return omitted(
            key,
            title,
            description,
            "no energy readings (the device cannot say: CPU, or no NVML energy counter)",
        )
    figure = against_tokens(
        data,
        rows,
        "j_per_token",
        "J/token",
        ".3g",
        "energy per token (J)",
        "Energy per token (J) vs tokens per call",
    )
    return Section(key, title, description, figures=[(f"fig-{key}", figure)])
