"""The report's data: runs read from the store, joined into one table with the labels the
figures use, and the derived comparisons (speedup over the base implementation, speedup of
each run over the first, the implementation leaderboard).

Nothing here draws; `figures.py` reads what this module prepares.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moebench.case import ALL_FIELDS
from moebench.compare.drift import cpu_runs
from moebench.results_schema import COLUMNS
from moebench.store import read_metadata, read_run, resolve_run

# A case's fields except the implementation (and its labels/knobs): two rows with equal
# values here measured the same layer on the same tokens.
MATCH_FIELDS: tuple[str, ...] = tuple(
    name for name in (*ALL_FIELDS, "tokens") if name not in ("impl", "preset", "options")
)
# Fields that split a figure into facets when they vary (the shape always does).
FACET_FIELDS: tuple[str, ...] = (
    "mode",
    "dtype",
    "routing",
    "device",
    "world_size",
    "capacity_factor",
    "seed",
    "cuda_graph",
)
# The base layer that variants and the leaderboard are measured against, best first.
BASE_IMPLS: tuple[str, ...] = ("grouped", "reference")
MAX_SAMPLES = 200
REGRESSION_RATIO = 1.05


@dataclass(frozen=True)
class RunInfo:
    """One run named on the command line."""

    index: int
    label: str
    spec: str
    path: str
    run_id: str
    meta: dict[str, Any]
    cases: int

    @property
    def ceilings(self) -> dict[str, float]:
        """The run's measured ceilings (`run_ceilings`)."""
        return run_ceilings(self.meta)


def run_ceilings(meta: dict[str, Any]) -> dict[str, float]:
    """A run's measured ceilings from its run.json; for a merged run (`moebench merge`),
    the highest of each over the runs it joined (a roof is an upper bound; each row's
    roofline_frac used its own run's)."""
    own = meta.get("ceilings")
    if own:
        return dict(own)
    merged: dict[str, float] = {}
    for part in meta.get("merged_from") or []:
        for key, value in (part.get("ceilings") or {}).items():
            if isinstance(value, (int, float)):
                merged[key] = max(merged.get(key, value), value)
    return merged


def ceilings_parts(ceilings: dict[str, float]) -> list[str]:
    """A run's ceilings as text, matrix rates first: "bfloat16 686 TFLOP/s sustained (819
    burst)" (`measure.ceilings`; runs before the sustained rate have one figure, their
    burst), "copy 4242 GB/s", and the host's speed, "host 0.9 us a torch op"."""
    parts = []
    for key, rate in ceilings.items():
        if key.startswith("matmul_tflops_"):
            dtype = key.removeprefix("matmul_tflops_")
            burst = ceilings.get(f"matmul_burst_tflops_{dtype}")
            sustained = f" sustained ({burst:.4g} burst)" if burst else ""
            parts.append(f"{dtype} {rate:.4g} TFLOP/s{sustained}")
    if ceilings.get("copy_gbps"):
        parts.append(f"copy {ceilings['copy_gbps']:.4g} GB/s")
    if isinstance(ceilings.get("host_op_us"), (int, float)) and ceilings["host_op_us"] > 0:
        parts.append(f"host {ceilings['host_op_us']:.2g} us a torch op")
    return parts


def timing_text(meta: dict[str, Any]) -> str | None:
    """How a run timed each case, from its run.json `timing`: "2 warm-up calls, then 500
    ms of calls; 5-100 timed calls within 200 ms, L2 flushed before each" (the time and
    the flush on CUDA only, where the timer does them: `measure.timing`). None for a run
    from before moebench recorded it."""
    timing = meta.get("timing")
    if not isinstance(timing, dict):
        return None
    cuda = not cpu_runs(meta)
    calls = timing.get("warmup", "?")
    warm = f"{calls} warm-up call" + ("" if calls == 1 else "s")
    if cuda and timing.get("warmup_ms"):
        warm += f", then {timing['warmup_ms']:g} ms of calls"
    repeats = (
        f"{timing.get('min_repeats', '?')}-{timing.get('max_repeats', '?')} timed calls"
        f" within {timing.get('budget_ms', 0):g} ms"
    )
    flush = ", L2 flushed before each" if cuda and timing.get("flush_l2") else ""
    return f"{warm}; {repeats}{flush}"


def ok_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that finished and were timed."""
    return frame[(frame["status"] == "ok") & frame["latency_ms"].notna()]


@dataclass(frozen=True)
class ReportData:
    """Everything the figures and the page read (built by `prepare`; not changed after)."""

    frame: pd.DataFrame
    runs: list[RunInfo]
    colors: dict[str, str]
    base_impls: dict[int, str | None] = field(default_factory=dict)

    @cached_property
    def ok(self) -> pd.DataFrame:
        """Rows that finished and were timed."""
        return ok_rows(self.frame)

    @property
    def multi_run(self) -> bool:
        """True when several runs are compared."""
        return len(self.runs) > 1


def load_runs(specs: Sequence[str | Path], root: str | Path = "results") -> ReportData:
    """Read the runs (ids, folders, parquet files or "latest") into one `ReportData`.

    Raises `moebench.store.StoreError` naming a run that cannot be found or read.
    """
    frames, metas, paths = [], [], []
    for spec in specs:
        path = resolve_run(spec, root)
        frames.append(read_run(path))
        metas.append(read_metadata(path))
        paths.append(str(path))
    return prepare(frames, metas, [str(s) for s in specs], paths)


def prepare(
    frames: list[pd.DataFrame],
    metas: list[dict[str, Any]],
    specs: list[str] | None = None,
    paths: list[str] | None = None,
) -> ReportData:
    """Join run tables (in the order given; the first is the baseline of comparisons)."""
    specs = specs or [str(i) for i in range(len(frames))]
    paths = paths or specs
    runs, parts = [], []
    for index, (frame, meta) in enumerate(zip(frames, metas)):
        frame = _with_all_columns(frame)
        run_id = meta.get("run_id") or _first(frame["run_id"]) or specs[index]
        runs.append(
            RunInfo(index, f"R{index + 1}", specs[index], paths[index], run_id, meta, len(frame))
        )
        frame = frame.assign(run_index=index, run_label=f"R{index + 1}")
        parts.append(frame)
    joined = pd.concat(parts, ignore_index=True) if parts else _with_all_columns(pd.DataFrame())
    joined = _labelled(joined, multi_run=len(runs) > 1)
    from moebench.report.style import impl_colors

    colors = impl_colors(sorted(set(joined["impl"].dropna().astype(str))))
    ok = ok_rows(joined)
    base_impls = {run.index: _base_impl(ok, run.index) for run in runs}
    joined["base_speedup"], joined["base_impl"] = _base_speedups(joined, ok, base_impls)
    return ReportData(frame=joined, runs=runs, colors=colors, base_impls=base_impls)


def _first(series: pd.Series) -> Any:
    values = series.dropna()
    return values.iloc[0] if len(values) else None


def _with_all_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Every schema column present (an old or empty file may lack some)."""
    missing = {name: None for name in COLUMNS if name not in frame.columns}
    frame = frame.assign(**missing) if missing else frame.copy()
    for name, kind in (("latency_ms", float), ("tokens_per_s", float), ("tokens", float)):
        if frame[name].dtype == object:
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(kind)
    return frame


def varies(frame: pd.DataFrame, name: str) -> bool:
    """Whether column `name` takes more than one value in `frame`."""
    return name in frame.columns and frame[name].astype(str).nunique(dropna=False) > 1


def shape_label(row: dict[str, Any]) -> str:
    """The layer shape in a few characters: the preset name, or D/F/E/k (+ shared)."""
    if row.get("preset"):
        return str(row["preset"])
    label = f"D{_int(row.get('hidden'))} F{_int(row.get('ffn'))} "
    label += f"E{_int(row.get('num_experts'))} k{_int(row.get('top_k'))}"
    shared = row.get("shared_experts")
    if shared is not None and shared == shared and shared > 0:
        label += f" +{_int(shared)}s"
    return label


def _int(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    return str(int(value))


def _labelled(frame: pd.DataFrame, *, multi_run: bool) -> pd.DataFrame:
    """Add shape, facet and case labels, the error column, and the series name."""
    facet_extra = [name for name in FACET_FIELDS if varies(frame, name)]
    records = frame.to_dict("records")
    shapes, facets, cases = [], [], []
    for row in records:
        shape = shape_label(row)
        parts = [shape] + [_facet_value(name, row.get(name)) for name in facet_extra]
        shapes.append(shape)
        facets.append(" · ".join(parts))
        cases.append(case_label(row, run=row["run_label"] if multi_run else None))
    frame = frame.assign(shape_label=shapes, facet_label=facets, case_label=cases)
    frame["impl"] = frame["impl"].astype(object).where(frame["impl"].notna(), "?")
    short = short_series_names(frame["impl"].tolist(), frame["options"].tolist())
    frame["series"] = [
        f"{name} · {run}" if multi_run else name for name, run in zip(short, frame["run_label"])
    ]
    return frame


def options_text(options: Any) -> str:
    """An options cell (JSON object text) as 'k=v k=v'; '' when there are none."""
    if not options or options == "{}" or (isinstance(options, float) and math.isnan(options)):
        return ""
    try:
        return " ".join(f"{k}={v}" for k, v in json.loads(options).items())
    except (ValueError, AttributeError, TypeError):
        return str(options)


def short_series_names(impls: list[Any], options: list[Any]) -> list[str]:
    """Legend names that stay short: the implementation's name when it ran with one set of
    options (or none), `impl·1`, `impl·2`, ... when it ran with several. The options go
    to hover text and to the note under each figure (`series_options`): a legend entry or
    axis category that carries them squeezes the plot."""
    texts = [options_text(o) for o in options]
    variants: dict[str, list[str]] = {}
    for impl, text in zip(impls, texts):
        seen = variants.setdefault(str(impl), [])
        if text not in seen:
            seen.append(text)
    names = []
    for impl, text in zip(impls, texts):
        seen = variants[str(impl)]
        names.append(str(impl) if len(seen) == 1 else f"{impl}·{seen.index(text) + 1}")
    return names


def series_options(frame: pd.DataFrame) -> dict[str, str]:
    """Short legend name (without the run) -> the options it stands for, for the series
    that ran with options."""
    short = short_series_names(frame["impl"].tolist(), frame["options"].tolist())
    legend: dict[str, str] = {}
    for name, options in zip(short, frame["options"]):
        text = options_text(options)
        if text:
            legend.setdefault(name, text)
    return legend


def _facet_value(name: str, value: Any) -> str:
    if name == "world_size":
        return f"{_int(value)} GPUs"
    if name == "capacity_factor":
        return f"cf {value:g}" if isinstance(value, float) else f"cf {value}"
    if name == "seed":
        return f"seed {value}"
    if name == "cuda_graph":
        return "CUDA graph" if is_true(value) else "no graph"
    return str(value)


def is_true(value: Any) -> bool:
    """A boolean cell (numpy's too) that may be missing (NaN, None) in rows of older runs."""
    return bool(value) if isinstance(value, (bool, np.bool_)) else False


def case_label(row: dict[str, Any], run: str | None = None) -> str:
    """What a person needs to recognise a case: impl, shape, tokens, mode, dtype, routing
    (and options, GPUs, a CUDA graph, the run where they apply)."""
    parts = [
        str(row.get("impl")),
        shape_label(row),
        f"T{_int(row.get('tokens'))}",
        str(row.get("mode")),
        str(row.get("dtype")),
        str(row.get("routing")),
    ]
    options = options_text(row.get("options"))
    if options:
        parts.append(options)
    if row.get("world_size") not in (None, 1) and row.get("world_size") == row.get("world_size"):
        parts.append(f"{_int(row['world_size'])} GPUs")
    if is_true(row.get("cuda_graph")):
        parts.append("CUDA graph")
    if run:
        parts.append(run)
    return " · ".join(parts)


def thin_samples(samples: Any, max_points: int = MAX_SAMPLES) -> list[float]:
    """At most `max_points` of a case's latency samples, spread evenly over their sorted
    order (the box plot's quartiles and whiskers barely move), rounded to 4 digits."""
    if samples is None:
        return []
    values = np.sort(np.asarray(samples, dtype=float))
    values = values[np.isfinite(values)]
    if len(values) > max_points:
        values = values[np.linspace(0, len(values) - 1, max_points).round().astype(int)]
    return [float(f"{v:.4g}") for v in values]


def _base_impl(ok: pd.DataFrame, run_index: int) -> str | None:
    impls = set(ok.loc[ok["run_index"] == run_index, "impl"])
    return next((name for name in BASE_IMPLS if name in impls), None)


def _match_columns(frame: pd.DataFrame, *, drop: tuple[str, ...] = ()) -> list[str]:
    return [name for name in MATCH_FIELDS if name in frame.columns and name not in drop]


def _base_speedups(
    frame: pd.DataFrame, ok: pd.DataFrame, base_impls: dict[int, str | None]
) -> tuple[pd.Series, pd.Series]:
    """Per row: latency of the base impl on the same case (same run) / the row's latency,
    and the base impl's name. A capacity-factor sweep of one impl falls back to the base
    measured at any capacity factor (the base reads no capacity factor)."""
    speedup = pd.Series(np.nan, index=frame.index, dtype=float)
    base_name = pd.Series(None, index=frame.index, dtype=object)
    for run_index, base in base_impls.items():
        if base is None:
            continue
        rows = ok[ok["run_index"] == run_index]
        base_rows = rows[rows["impl"] == base]
        for drop in ((), ("capacity_factor",)):
            keys = _match_columns(frame, drop=drop)
            lookup = {_key(r, keys): r["latency_ms"] for r in base_rows.to_dict("records")}
            for index, r in zip(rows.index, rows.to_dict("records")):
                if not math.isnan(speedup[index]):
                    continue
                base_ms = lookup.get(_key(r, keys))
                if base_ms is not None and r["latency_ms"] > 0:
                    speedup[index] = base_ms / r["latency_ms"]
                    base_name[index] = base
    return speedup, base_name


def _key(row: dict[str, Any], keys: list[str]) -> tuple:
    return tuple(
        None if (isinstance(row.get(k), float) and math.isnan(row[k])) else row.get(k) for k in keys
    )


def run_comparison(data: ReportData) -> pd.DataFrame:
    """Each later run against the first, case by case (matched on `case_id`, which hashes
    the case's fields): columns run_label, impl, case_label, facet_label, base_ms,
    latency_ms, speedup (> 1: the later run is faster) and verdict."""
    ok = data.ok
    first = ok[ok["run_index"] == 0].drop_duplicates("case_id").set_index("case_id")
    out = []
    for run in data.runs[1:]:
        rows = ok[ok["run_index"] == run.index].drop_duplicates("case_id")
        rows = rows[rows["case_id"].isin(first.index)]
        for r in rows.to_dict("records"):
            base_ms = first.at[r["case_id"], "latency_ms"]
            speedup = base_ms / r["latency_ms"] if r["latency_ms"] > 0 else math.nan
            out.append(
                {
                    "run_label": run.label,
                    "run_index": run.index,
                    "impl": r["impl"],
                    "case_id": r["case_id"],
                    "case_label": case_label(r),
                    "facet_label": r["facet_label"],
                    "base_ms": base_ms,
                    "latency_ms": r["latency_ms"],
                    "speedup": speedup,
                    "verdict": verdict(speedup),
                }
            )
    columns = [
        "run_label",
        "run_index",
        "impl",
        "case_id",
        "case_label",
        "facet_label",
        "base_ms",
        "latency_ms",
        "speedup",
        "verdict",
    ]
    return pd.DataFrame(out, columns=columns)


def verdict(speedup: float) -> str:
    """The verdict on a speedup: regression below 1/1.05, improvement above 1.05, else same."""
    if speedup < 1 / REGRESSION_RATIO:
        return "regression"
    if speedup > REGRESSION_RATIO:
        return "improvement"
    return "same"


@dataclass(frozen=True)
class Standing:
    """One implementation's line in the leaderboard."""

    impl: str
    exact: bool
    ok: int
    total: int
    wins: int
    contests: int
    geomean_speedup: float | None
    median_rel_err: float | None  # vs the reference (exact) or its own design's (variant)
    median_fidelity_err: float | None  # variants: vs the base MoE layer
    ties: int = 0  # contests where no one was faster beyond the noise


def clear_winner(group: pd.DataFrame) -> str | None:
    """The fastest implementation of one case's rows, when it is faster beyond the noise:
    no row is `noisy` and the fastest's interval (the median's CI, or p10-p90 for runs
    without one) lies below every other's. None otherwise."""
    if "noisy" in group and group["noisy"].fillna(False).astype(bool).any():
        return None
    low_col, high_col = "latency_ci_low_ms", "latency_ci_high_ms"
    if low_col not in group or group[low_col].isna().any():
        low_col, high_col = "latency_p10_ms", "latency_p90_ms"
    if low_col not in group or group[low_col].isna().any():
        return None
    best = group["latency_ms"].idxmin()
    others = group.drop(index=best)
    if (others[low_col] > group.loc[best, high_col]).all():
        return str(group.loc[best, "impl"])
    return None


def leaderboard(data: ReportData) -> list[Standing]:
    """Per implementation: cases ok, how often it was the fastest exact implementation on a
    case (same run, same case fields), the geometric mean of its speedup over the base
    layer, and its median errors (rel_err and fidelity_err apart). Sorted by wins, then
    speedup. A case is won only beyond the noise (`clear_winner`); otherwise it is a tie
    for everyone in it."""
    frame, ok = data.frame, data.ok
    keys = ["run_index", *_match_columns(frame)]
    wins: dict[str, int] = {}
    contests: dict[str, int] = {}
    ties: dict[str, int] = {}
    exact_ok = ok[ok["exact"].fillna(True).astype(bool)]
    for _, group in exact_ok.groupby(keys, dropna=False, sort=False):
        if group["impl"].nunique() < 2:
            continue
        for name in group["impl"].unique():
            contests[name] = contests.get(name, 0) + 1
        fastest = clear_winner(group)
        if fastest is None:
            for name in group["impl"].unique():
                ties[name] = ties.get(name, 0) + 1
        else:
            wins[fastest] = wins.get(fastest, 0) + 1
    standings = []
    for name in data.colors:
        rows = frame[frame["impl"] == name]
        done = ok[ok["impl"] == name]
        speedups = done["base_speedup"].dropna()
        speedups = speedups[speedups > 0]
        rel_errors = pd.to_numeric(done["rel_err"], errors="coerce").dropna()
        fidelity_errors = pd.to_numeric(done["fidelity_err"], errors="coerce").dropna()
        exact_values = rows["exact"].dropna()
        standings.append(
            Standing(
                impl=name,
                exact=bool(exact_values.iloc[0]) if len(exact_values) else True,
                ok=len(done),
                total=len(rows),
                wins=wins.get(name, 0),
                contests=contests.get(name, 0),
                geomean_speedup=float(np.exp(np.log(speedups).mean())) if len(speedups) else None,
                median_rel_err=float(rel_errors.median()) if len(rel_errors) else None,
                median_fidelity_err=(
                    float(fidelity_errors.median()) if len(fidelity_errors) else None
                ),
                ties=ties.get(name, 0),
            )
        )
    standings.sort(key=lambda s: (-s.wins, -(s.geomean_speedup or 0.0), s.impl))
    return standings
