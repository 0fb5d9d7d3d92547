"""Speed figures: speed relative to the base layer per shape, throughput and latency
against tokens, and each later run against the first."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moebench.report.data import REGRESSION_RATIO, ReportData, run_comparison, thin_samples
from moebench.report.facets import Axes, Panel, faceted
from moebench.report.sections import (
    Section,
    TableData,
    against_tokens,
    by_facet,
    by_series,
    has_items,
    no_ok_reason,
    omitted,
    positive_rows,
    series_style,
    sorted_cases,
)
from moebench.report.style import (
    REGRESSION_COLOR,
    SAME_BAND_COLOR,
)

MAX_LISTED_REGRESSIONS = 25
MAX_OVERVIEW_BARS = 30
RUN_OPACITY = (1.0, 0.6, 0.4, 0.3)  # bars of later runs fade


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
            no_ok_reason(data, "speeds")
            if data.ok.empty
            else ("no base layer (grouped or reference) was measured beside the others")
        )
        return omitted(key, title, description, reason)
    facets = list(dict.fromkeys(sorted_cases(rows)["facet_label"]))
    traces = []
    many = len(facets) > MAX_OVERVIEW_BARS
    matrix, names = [], []
    for name, series in by_series(data, rows):
        color, run = series_style(data, series)
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


def throughput(data: ReportData) -> Section:
    """Tokens per second against tokens per call, log-log, one panel per layer shape."""
    key, title = "throughput", "Throughput"
    description = (
        "Tokens per second against tokens per call (log-log), one panel per layer shape; "
        "higher is better. One colour per implementation."
    )
    rows = positive_rows(data.ok, "tokens_per_s", "tokens")
    if rows.empty:
        return omitted(key, title, description, no_ok_reason(data, "throughput"))
    figure = against_tokens(
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
    rows = ok[ok["samples_ms"].map(has_items)]
    if rows.empty:
        return omitted(key, title, description, no_ok_reason(data, "latency samples"))
    panels = []
    for facet, part in by_facet(rows):
        categories = [f"T{int(t)}" for t in sorted(part["tokens"].unique())]
        traces = []
        for name, series in by_series(data, part):
            color, _ = series_style(data, series)
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


def run_speedups(data: ReportData) -> Section:
    """Each later run against the first, case by case; regressions in red."""
    key, title = "comparison", "Run against run"
    description = (
        "Speedup of each run over the first (R1) on the same case (time in R1 / time in the "
        f"run; > 1 is faster), cases sorted by it. Below 1/{REGRESSION_RATIO:g} is a "
        "regression (red)."
    )
    if not data.multi_run:
        return omitted(key, title, description, "one run: nothing to compare (name two or more)")
    table = run_comparison(data)
    if table.empty:
        reason = "no case finished ok in both the first run and a later one (nothing matched)"
        suites = {run.meta.get("suite") for run in data.runs}
        if len(suites) == 1 and None not in suites:
            # parts of one suite (each run filtered to some implementations, say): the
            # other sections compare implementations only within a run
            reason += (
                "; runs of one suite that hold different cases join into one run with"
                " `moebench merge RUN RUN ...`, whose report compares them case by case"
            )
        return omitted(key, title, description, reason)
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
