"""The profiling figures: where each call's time goes (the phase breakdown of every case,
with a launch-bound / sync-bound marker) and the top kernels of each case (from the
kernels.parquet of runs made with --profile).

Only imported while a report is built (imports plotly).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from moebench.report.data import ReportData
from moebench.report.facets import Axes, Panel, faceted
from moebench.report.sections import (
    Section,
    TableData,
    case_bars,
    omitted,
    positive_rows,
)
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
MARKER_SYMBOLS = {"launch-bound": "triangle-down-open", "sync-bound": "triangle-down"}
MARKER_COLOR = "#333333"
LOW_BUSY_FRAC = 0.5
"""Below this device_busy_frac a case is marked launch-bound or sync-bound."""
TOP_KERNELS = 3
ANON = "(anonymous namespace)"
MAX_KERNEL_CASES = 200
# Kernels this much over the median call: more than a graphed call's own noise (its
# kernels are its whole time).
PROFILED_SLOWER = 1.02


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


def short_kernel_name(name: str, most: int = 90) -> str:
    """A kernel's name a person can read in a table: C++ template arguments and parameter
    lists dropped ("void at::native::foo<float, 4>(int, ...)" -> "at::native::foo"; a
    generic elementwise or reduce kernel keeps the functor it runs); a mangled name
    ("_ZN7cutlass13device_kernel...") spelled out from its first identifiers. The full
    name stays in kernels.parquet."""
    if name.startswith("_Z"):
        short = _mangled_name(name)
    else:
        plain = name.removeprefix("void ").replace(ANON, "{anonymous}")
        short, depth, end = "", 0, len(plain)
        for index, char in enumerate(plain):
            if char == "(" and depth == 0 and short:
                end = index
                break
            if char == "<":
                depth += 1
            elif char == ">" and depth:
                depth -= 1
            elif depth == 0:
                short += char
        short = short.strip().replace("{anonymous}", ANON)
        functors = re.findall(r"[A-Za-z_]\w*(?:[Ff]unctor\w*|_kernel\w*)", plain[:end])
        functors = [f for f in functors if f not in short]
        if functors and ("elementwise" in short or "reduce" in short):
            short += f" [{functors[-1]}]"
    return short if len(short) <= most else short[: most - 3] + "..."


def _mangled_name(name: str) -> str:
    """ "ns::function<Long, Identifiers...>" from an Itanium-mangled name's first
    length-prefixed identifiers (no demangler needed)."""
    words, i = [], 2
    while i < len(name) and len(words) < 16:
        reference = re.match(r"[ST]\d*_", name[i:])  # a back-reference, not a length
        if reference is not None:
            i += len(reference.group())
            continue
        match = re.match(r"\d+", name[i:])
        if match is None:
            i += 1
            continue
        start = i + len(match.group())
        words.append(name[start : start + int(match.group())])
        i = start + int(match.group())
    inner = [w for w in words[2:] if len(w) >= 8][:3]
    head = "::".join(words[:2])
    return f"{head}<{', '.join(inner)}...>" if inner else head


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


def _marker_traces(labels: list[str], part: pd.DataFrame) -> list[go.Scatter]:
    """A mark above each launch-bound or sync-bound bar (one legend entry per kind)."""
    traces = []
    for kind, symbol in MARKER_SYMBOLS.items():
        marked = [
            (x, busy)
            for x, m, busy in zip(labels, _markers(part), part["device_busy_frac"])
            if m == kind
        ]
        if marked:
            traces.append(
                go.Scatter(
                    x=[x for x, _ in marked],
                    y=[1.05] * len(marked),
                    mode="markers",
                    name=kind,
                    legendgroup=kind,
                    legendrank=len(PHASE_PARTS) + len(traces),
                    marker={"symbol": symbol, "size": 10, "color": MARKER_COLOR},
                    customdata=[busy for _, busy in marked],
                    hovertemplate=f"{kind}: device busy %{{customdata:.0%}}<extra></extra>",
                )
            )
    return traces


def phases(data: ReportData) -> Section:
    """Each case's call split into its phases, stacked, per layer shape."""
    key, title = "phases", "Where the time goes"
    description = (
        "One call of each case split into router, permutation, expert GEMMs, "
        "un-permutation, shared experts (and backward in train mode) and other: launch "
        "gaps, host work and synchronisation, what no phase covers; as shares of the call "
        "(hover for milliseconds). Measured in a pass of its own after timing (CUDA events "
        "or wall clock per phase). A triangle marks a case that kept the device busy less "
        f"than {LOW_BUSY_FRAC:.0%} of the call (runs made with --profile): filled, "
        "sync-bound (the host waited on the device at least once a call); open, "
        "launch-bound."
    )
    rows = positive_rows(data.ok, "phase_latency_ms")
    if rows.empty:
        return omitted(
            key, title, description, "no case has a phase breakdown (runs made before it)"
        )
    panels = []
    for facet, part, labels in case_bars(data, rows):
        traces: list[Any] = []
        for rank, (name, (column, color)) in enumerate(PHASE_PARTS.items()):
            if column not in part:
                continue
            values = pd.to_numeric(part[column], errors="coerce").fillna(0).clip(lower=0)
            if not (values > 0).any():
                continue
            shares = values / part["phase_latency_ms"]
            traces.append(
                go.Bar(
                    x=labels,
                    y=shares.round(5).tolist(),
                    name=name,
                    legendgroup=name,
                    legendrank=rank,
                    marker_color=color,
                    customdata=list(zip(values.round(5), part["phase_latency_ms"].round(5))),
                    hovertext=part["case_label"].tolist(),
                    hovertemplate=(
                        f"%{{hovertext}}<br>{name}: %{{customdata[0]:.3g}} ms "
                        "(%{y:.0%} of %{customdata[1]:.3g} ms)<extra></extra>"
                    ),
                )
            )
        traces += _marker_traces(labels, part)
        panels.append(Panel(facet, traces))
    figure = faceted(
        panels,
        Axes("case (implementation, tokens per call)", "share of one call"),
        title="Where the time goes: each phase's share of one call",
        layout={"barmode": "stack", "legend": {"title": {"text": "phase"}}},
    )
    figure.update_yaxes(tickformat=".0%")
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
        "device busy fraction and host synchronisations per call, and where its time goes "
        "against the floor: all its kernels' time per call beside its latency and its "
        "floor (latency x roofline_frac), so a case whose kernels sit at the floor while "
        "its latency does not spends the rest outside them (kernels that ran side by "
        "side, on two streams, also give the time some kernel ran; a device busy over "
        "2% above the latency: the profiled pass, run after the timed calls, was "
        "slower). The full "
        "table is "
        "kernels.parquet in the run folder; each case's trace is traces/<case_id>.json.gz "
        "(open it in ui.perfetto.dev or chrome://tracing)."
    )
    table = _run_kernels(data)
    if table.empty:
        return omitted(key, title, description, "no run was made with --profile")
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
        ) + _against_floor(part["device_ms"].sum(), case)
        for rank, kernel in enumerate(part.nlargest(TOP_KERNELS, "device_ms").itertuples()):
            rows.append(
                [
                    str(case["case_label"]) if rank == 0 else "",
                    summary if rank == 0 else "",
                    short_kernel_name(str(kernel.kernel)),
                    f"{kernel.calls_per_call:g}",
                    f"{kernel.device_ms:.4g}",
                    f"{kernel.share:.0%}",
                ]
            )
    if not rows:
        return omitted(key, title, description, "no profiled case finished ok")
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


def _against_floor(kernels_ms: float, case: pd.Series) -> str:
    """'; kernels 0.295 of 0.297 ms a call, floor 0.281': a case's kernel time per call
    beside its latency and its floor (latency x roofline_frac; '-' where either is
    missing). Kernels that ran side by side (summed more than PROFILED_SLOWER times the
    time some kernel ran, `device_busy_frac`) add that time: their sum may pass the
    latency without anything being slow. A device busy over the latency by more than
    PROFILED_SLOWER is said to be so: the profiled pass runs after the timed calls, in
    another state of the card (its clock under a power cap, say)."""
    latency, fraction = case.get("latency_ms"), case.get("roofline_frac")
    floor = None
    if isinstance(latency, (int, float)) and isinstance(fraction, (int, float)):
        floor = latency * fraction
    # On CUDA device_busy_frac is of the timed latency (on the CPU, of the profiled
    # calls' own time, and operators there never overlap)
    busy_ms, busy_frac = kernels_ms, case.get("device_busy_frac")
    if (
        str(case.get("device", "")).startswith("cuda")
        and isinstance(latency, (int, float))
        and isinstance(busy_frac, (int, float))
        and busy_frac * latency < kernels_ms
    ):
        busy_ms = busy_frac * latency  # the union of the kernels' intervals
    side_by_side = kernels_ms > PROFILED_SLOWER * busy_ms
    slower = isinstance(latency, (int, float)) and busy_ms > PROFILED_SLOWER * latency
    return (
        f"; kernels {_num(kernels_ms, '.4g')} of {_num(latency, '.4g')} ms a call, "
        f"floor {_num(floor, '.4g')}"
        + (
            f" (side by side: {_num(busy_ms, '.4g')} ms with a kernel running)"
            if side_by_side
            else ""
        )
        + (" (the profiled pass ran slower than the timed calls)" if slower else "")
    )


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)
