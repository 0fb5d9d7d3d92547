"""Routing figures: load balance per expert, communication of expert-parallel cases, and
fidelity against speed for the design variants."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moebench.report.data import ReportData
from moebench.report.facets import Axes, Panel, faceted
from moebench.report.sections import (
    Section,
    by_series,
    case_bars,
    has_items,
    no_ok_reason,
    omitted,
    positive_rows,
    series_style,
    sorted_cases,
)
from moebench.report.style import (
    PART_COLORS,
    base_layout,
    run_symbol,
)


def _balance_rows(data: ReportData, rows: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct (routing outcome, case except impl and run): implementations
    and runs that saw the same tokens per expert share a row."""
    entries: dict[tuple, dict[str, Any]] = {}
    for row in sorted_cases(rows).to_dict("records"):
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
    rows = ok[ok["tokens_per_expert"].map(has_items)]
    if rows.empty:
        return omitted(key, title, description, no_ok_reason(data, "tokens-per-expert counts"))
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
    rows = positive_rows(data.ok, "comm_ms")
    if rows.empty:
        return omitted(
            key,
            title,
            description,
            "no case communicated (comm_ms is 0 or missing: single-device runs)",
        )
    panels = []
    for facet, part, labels in case_bars(data, rows):
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
        return omitted(key, title, description, "no variant implementation in the runs")
    rows = rows[rows["base_speedup"].notna() & (rows["base_speedup"] > 0)]
    if rows.empty:
        return omitted(
            key,
            title,
            description,
            "no base layer (grouped or reference) was measured on the variants' cases",
        )
    positive = rows.loc[rows["fidelity_err"] > 0, "fidelity_err"]
    floor = float(positive.min()) / 10 if len(positive) else 1e-9
    traces = []
    for name, series in by_series(data, rows):
        color, run = series_style(data, series)
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
