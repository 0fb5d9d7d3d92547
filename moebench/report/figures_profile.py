"""The profiling figures: where each call's time goes (the phase breakdown of every case,
with a launch-bound / sync-bound marker) and the top kernels of each case (from the
kernels.parquet of runs made with --profile).

Only imported while a report is built (imports plotly).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from moebench.report.data import ReportData
from moebench.report.facets import Axes, Panel, faceted
from moebench.report.figures import Section, TableData, _facets, _omitted, _positive
from moebench.store import StoreError, read_kernels

# Phase columns stacked bottom to top, with their colours.
PHASE_PARTS: dict[str, tuple[str, str]] = {
    "router": ("router_ms", "#72b7b2"),
    "permute": ("permute_ms", "#f58518"),
    "expert GEMMs": ("expert_ms", "#4c78a8"),
    "unpermute": ("unpermute_ms", "#e45756"),
    "shared experts": ("shared_ms", "#54a24b"),
    "backward": ("backward_ms", "#9d755d"),
    "other (gaps, host, sync)": ("other_ms", "#bab0ac"),
}
LOW_BUSY_FRAC = 0.5
"""Below this device_busy_frac a case is marked launch-bound or sync-bound."""
TOP_KERNELS = 3
MAX_KERNEL_CASES = 200


def bound_marker(busy_frac: Any, host_syncs: Any) -> str:
    """ "sync-bound" (the device idles and the host waits on it at least once a call),
    "launch-bound" (the device idles, no synchronisation: launches and host work), or ""
    (busy enough, or not profiled)."""
    if busy_frac is None or (isinstance(busy_frac, float) and math.isnan(busy_frac)):
        return ""
    if busy_frac >= LOW_BUSY_FRAC:
        return ""
    syncs = 0.0 if host_syncs is None or host_syncs != host_syncs else float(host_syncs)
    return "sync-bound" if syncs >= 1 else "launch-bound"


def profile_sections(data: ReportData) -> list[Section]:
    """The profiling sections, in reading order."""
    return [phases(data), kernels(data)]


def with_profile_sections(sections: list[Section], data: ReportData) -> list[Section]:
    """`sections` with the profiling sections after the communication section (at the
    end if there is none)."""
    keys = [s.key for s in sections]
    at = keys.index("communication") + 1 if "communication" in keys else len(sections)
    return [*sections[:at], *profile_sections(data), *sections[at:]]


def _markers(rows: pd.DataFrame) -> list[str]:
    busy = rows["device_busy_frac"] if "device_busy_frac" in rows else [None] * len(rows)
    syncs = rows["host_sync_count"] if "host_sync_count" in rows else [None] * len(rows)
    return [bound_marker(b, s) for b, s in zip(busy, syncs)]


def phases(data: ReportData) -> Section:
    """Each case's call split into its phases, stacked, per layer shape."""
    key, title = "phases", "Where the time goes"
    description = (
        "One call of each case split into router, permutation, expert GEMMs, "
        "un-permutation, shared experts (and backward in train mode) and other: launch "
        "gaps, host work and synchronisation, what no phase covers. Measured in a pass of "
        "its own after timing (CUDA events or wall clock per phase; the bar's height is "
        "that pass's time per call). A case marked launch-bound or sync-bound kept the "
        f"device busy less than {LOW_BUSY_FRAC:.0%} of the call (runs made with --profile)."
    )
    rows = _positive(data.ok, "phase_latency_ms")
    if rows.empty:
        return _omitted(
            key, title, description, "no case has a phase breakdown (runs made before it)"
        )
    panels = []
    for facet, part in _facets(rows):
        part = part.sort_values(["tokens", "impl", "run_index"])
        labels = [
            f"{impl} T{int(t)}" + (f" {r}" if data.multi_run else "")
            for impl, t, r in zip(part["impl"], part["tokens"], part["run_label"])
        ]
        traces: list[Any] = []
        for name, (column, color) in PHASE_PARTS.items():
            if column not in part:
                continue
            values = pd.to_numeric(part[column], errors="coerce").fillna(0).clip(lower=0)
            if not (values > 0).any():
                continue
            shares = values / part["phase_latency_ms"]
            traces.append(
                go.Bar(
                    x=labels,
                    y=values.round(6).tolist(),
                    name=name,
                    legendgroup=name,
                    marker_color=color,
                    customdata=shares.round(4).tolist(),
                    hovertext=part["case_label"].tolist(),
                    hovertemplate=(
                        f"%{{hovertext}}<br>{name}: %{{y:.3g}} ms "
                        "(%{customdata:.0%})<extra></extra>"
                    ),
                )
            )
        markers = _markers(part)
        if any(markers):
            traces.append(
                go.Scatter(
                    x=labels,
                    y=part["phase_latency_ms"].tolist(),
                    mode="text",
                    text=markers,
                    textposition="top center",
                    name="marker",
                    showlegend=False,
                    hoverinfo="skip",
                )
            )
        panels.append(Panel(facet, traces))
    figure = faceted(
        panels,
        Axes("case (implementation, tokens per call)", "time per call (ms)"),
        title="Where the time goes: phases of one call (ms)",
        layout={"barmode": "stack", "legend": {"title": {"text": "phase"}}},
    )
    notes = []
    marked = [m for m in _markers(rows) if m]
    if marked:
        notes.append(
            f"{marked.count('launch-bound')} case(s) launch-bound, "
            f"{marked.count('sync-bound')} sync-bound (device busy < {LOW_BUSY_FRAC:.0%})."
        )
    return Section(key, title, description, figures=[(f"fig-{key}", figure)], notes=notes)


def _run_kernels(data: ReportData) -> pd.DataFrame:
    """The kernel tables of the runs that have one, with run_index."""
    parts = []
    for run in data.runs:
        try:
            table = read_kernels(Path(run.path))
        except StoreError:
            table = None
        if table is not None and not table.empty:
            parts.append(table.assign(run_index=run.index))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def kernels(data: ReportData) -> Section:
    """The top kernels of each profiled case, with its launch / busy / sync figures."""
    key, title = "kernels", "Top kernels"
    description = (
        f"The {TOP_KERNELS} kernels (CPU: top-level aten operators) with the most device "
        "time per call in each case profiled with --profile, their calls per layer call "
        "and share of the case's kernel time; with each case's kernel launches per call, "
        "device busy fraction and host synchronisations per call. The full table is "
        "kernels.parquet in the run folder; each case's trace is traces/<case_id>.json.gz "
        "(open it in ui.perfetto.dev or chrome://tracing)."
    )
    table = _run_kernels(data)
    if table.empty:
        return _omitted(key, title, description, "no run was made with --profile")
    cases = data.ok.set_index(["run_index", "case_id"])
    rows: list[list[str]] = []
    seen = 0
    for (run_index, case_id), part in table.groupby(["run_index", "case_id"], sort=False):
        if (run_index, case_id) not in cases.index or seen >= MAX_KERNEL_CASES:
            continue
        seen += 1
        case = cases.loc[(run_index, case_id)]
        marker = bound_marker(case.get("device_busy_frac"), case.get("host_sync_count"))
        summary = (
            f"{_num(case.get('kernel_launches'), '.0f')} launches, busy "
            f"{_num(case.get('device_busy_frac'), '.0%')}, syncs "
            f"{_num(case.get('host_sync_count'), '.0f')}" + (f" — {marker}" if marker else "")
        )
        for rank, kernel in enumerate(part.nlargest(TOP_KERNELS, "device_ms").itertuples()):
            rows.append(
                [
                    str(case["case_label"]) if rank == 0 else "",
                    summary if rank == 0 else "",
                    str(kernel.kernel),
                    f"{kernel.calls_per_call:g}",
                    f"{kernel.device_ms:.4g}",
                    f"{kernel.share:.0%}",
                ]
            )
    if not rows:
        return _omitted(key, title, description, "no profiled case finished ok")
    notes = []
    if seen >= MAX_KERNEL_CASES:
        notes.append(f"The first {MAX_KERNEL_CASES} profiled cases are listed.")
    return Section(
        key,
        title,
        description,
        notes=notes,
        table=TableData(
            ["case", "per call", "kernel", "calls / call", "device ms / call", "share"],
            rows,
        ),
    )


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)
