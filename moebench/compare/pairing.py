"""Match cases between two runs (or two implementations of one run) and judge each pair.

Between runs, cases are matched on `case_id`, a hash of every case field: equal ids are
the same case. Within a run (`--impls a,b`) and for normalization (`--normalize IMPL`),
rows are matched on the case fields except `impl` (and `options` and `preset`, which
belong to an implementation or only label a shape).

Normalizing divides a case's metric (and its samples) by the normalizing implementation's
metric on the same case of the same run, so a runner that is uniformly slower (a busier
machine, a different card) changes nothing, while one slowed implementation still shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from moebench import provenance
from moebench.compare.aggregate import ImplSummary, summarize
from moebench.compare.bootstrap import (
    MIN_SAMPLES,
    Side,
    ratio_ci,
)
from moebench.compare.drift import (
    RunDrift,
    cpu_runs,
    environment_differences,
    measure_drift,
)
from moebench.compare.host_side import host_side_note
from moebench.compare.report import (
    JUDGED,
    CaseResult,
    Report,
    Settings,
    noise_note,
)
from moebench.compare.runs import (
    CompareError,
    Run,
    case_fields,
    case_label,
    impl_key,
    number,
    row_error,
    row_status,
    shape_label,
)
from moebench.compare.verdict import (
    METRICS,
    VERDICTS,
    Change,
    Decision,
    Metric,
    VerdictName,
    decide,
    fails_gate,
    status_decision,
)


@dataclass(frozen=True)
class _Value:
    """A metric's point value and samples for one row, maybe divided by a normalizer."""

    value: float | None
    side: Side
    raw: float | None
    problem: str | None = None


def _measure(
    row: Mapping[str, Any],
    metric: Metric,
    normalizer: Mapping[str, Any] | None,
    normalize: str | None,
    run_name: str,
) -> _Value:
    raw = number(row.get(metric.name))
    samples = tuple(metric.samples_of(row)) if metric.samples_of else ()
    if raw is None and samples:
        raw = float(pd.Series(samples).median())
    if normalize is None:
        return _Value(raw, Side(samples), raw)
    if normalizer is None:
        return _Value(
            None,
            Side(()),
            raw,
            f"no {normalize} case with the same fields in {run_name} to normalize by",
        )
    if normalizer.get("status") != "ok":
        return _Value(
            None,
            Side(()),
            raw,
            f"its normalizer {normalize} is {normalizer.get('status')} in {run_name}",
        )
    divisor = number(normalizer.get(metric.name))
    divisor_samples = tuple(metric.samples_of(normalizer)) if metric.samples_of else ()
    if divisor is None or divisor == 0 or raw is None:
        return _Value(None, Side(()), raw, f"{normalize} has no {metric.name} in {run_name}")
    return _Value(raw / divisor, Side(samples, divisor_samples if samples else None), raw)


def _format_value(value: float | None, metric: Metric) -> str:
    if value is None:
        return "-"
    return f"{value:.4g} {metric.unit}".rstrip()


def _judge(
    key: str,
    label: str,
    fields_: dict[str, Any],
    base: tuple[Mapping[str, Any] | None, Mapping[str, Any] | None],
    cand: tuple[Mapping[str, Any] | None, Mapping[str, Any] | None],
    names: tuple[str, str],
    settings: Settings,
    drift: RunDrift | None = None,
) -> CaseResult:
    """One case: (row, normalizer row) of each side -> a CaseResult. With `drift`, the
    run's shift is divided out (where `drift.divided`) and a change must exceed its band."""
    metric = settings.metric
    (base_row, base_norm), (cand_row, cand_norm) = base, cand
    statuses = (row_status(base_row), row_status(cand_row))
    common = {
        "key": key,
        "label": label,
        "fields": fields_,
        "baseline_status": statuses[0],
        "candidate_status": statuses[1],
        "normalized": settings.normalize is not None,
    }
    if base_row is None or cand_row is None:
        verdict: VerdictName = "new" if base_row is None else "missing"
        where = names[1] if base_row is None else names[0]
        other = names[0] if base_row is None else names[1]
        present = base_row if cand_row is None else cand_row
        raw = _measure(present, metric, None, None, where).raw  # the side that has it
        return CaseResult(
            verdict=verdict,
            sentence=f"{label}: only in {where}, not in {other}",
            baseline_raw=raw if cand_row is None else None,
            candidate_raw=raw if base_row is None else None,
            **common,
        )
    failed = status_decision(*statuses, (row_error(base_row), row_error(cand_row)))
    if failed is not None:
        return CaseResult(
            verdict="failed",
            sentence=f"{label}: {failed.reason}",
            fails_gate=fails_gate("failed", *statuses),
            **common,
        )
    b = _measure(base_row, metric, base_norm, settings.normalize, names[0])
    c = _measure(cand_row, metric, cand_norm, settings.normalize, names[1])
    values = {
        "baseline_value": b.value,
        "candidate_value": c.value,
        "baseline_raw": b.raw,
        "candidate_raw": c.raw,
        "baseline_samples": len(b.side.samples),
        "candidate_samples": len(c.side.samples),
    }
    change_text = f"{metric.name} {_format_value(b.raw, metric)} -> {_format_value(c.raw, metric)}"
    problem = b.problem or c.problem
    if problem or b.value is None or c.value is None:
        why = problem or f"no {metric.name} value in {names[0] if b.value is None else names[1]}"
        return CaseResult(
            verdict="skipped",
            sentence=f"{label}: {change_text}; not judged: {why}",
            **values,
            **common,
        )
    ratio = _ratio(c.value, b.value)
    ci = ratio_ci(
        b.side,
        c.side,
        key=key,
        confidence=settings.confidence,
        resamples=settings.resamples,
        seed=settings.seed,
    )
    shift = drift.shift if drift is not None and drift.divided else 1.0
    change = Change(
        ratio=ratio / shift,
        low=ci[0] / shift if ci else None,
        high=ci[1] / shift if ci else None,
        higher_is_better=metric.higher_is_better,
        confidence=settings.confidence,
    )
    band = drift.band_of(str(fields_.get("impl"))) if drift else None
    decision: Decision = decide(change, settings.threshold, band)
    if settings.normalize:
        change_text += f", relative to {settings.normalize}"
    if shift != 1.0:
        change_text += f", over the run's shift x{shift:.3g}"
    if ci is None and metric.has_samples:
        change_text += f" (fewer than {MIN_SAMPLES} samples: no CI)"
    noisy_in = _noisy_in(base_row, cand_row, names, metric)
    noisy_note = f"; {noise_note(noisy_in)}" if noisy_in else ""
    return CaseResult(
        verdict=decision.verdict,
        sentence=f"{label}: {change_text}: {decision.reason}{noisy_note}",
        noisy_in=noisy_in,
        ratio=ratio,
        ci_low=ci[0] if ci else None,
        ci_high=ci[1] if ci else None,
        shift=shift,
        fails_gate=fails_gate(decision.verdict, *statuses, regressions_count=settings.case_gate),
        **values,
        **common,
    )


def _noisy_in(
    base_row: Mapping[str, Any], cand_row: Mapping[str, Any], names: tuple[str, str], metric: Metric
) -> tuple[str, ...]:
    """The runs (of `names`) that flagged the case's timing as noise, for a timed metric:
    its own table says not to rank it, and the CI of its samples does not see a median
    that was still moving. Said, not judged: the verdict stays the samples'."""
    if not metric.has_samples:
        return ()
    rows = (base_row, cand_row)
    return tuple(name for row, name in zip(rows, names, strict=True) if row.get("noisy") is True)


def _ratio(candidate: float, baseline: float) -> float:
    if baseline == 0:
        return math.nan if candidate == 0 else math.copysign(math.inf, candidate)
    return candidate / baseline


def _impl_index(run: Run, impl: str) -> dict[str, dict[str, Any]]:
    """impl_key -> row, for the rows of `impl` in `run` (a key seen twice is dropped:
    an implementation swept over its own options cannot be a single yardstick)."""
    index: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for row in run.rows.values():
        if row.get("impl") != impl:
            continue
        key = impl_key(row)
        if key in seen:
            index.pop(key, None)
        else:
            index[key] = row
        seen.add(key)
    return index


# ----------------------------------------------------------------------------- entry points


def compare_runs(baseline: Run, candidate: Run, settings: Settings) -> Report:
    """Judge every case of `candidate` against the same case (case_id) of `baseline`."""
    _check_metric(settings.metric, [baseline, candidate])
    common = baseline.rows.keys() & candidate.rows.keys()
    if not common:
        raise CompareError(_no_common_cases(baseline, candidate))
    notes = provenance.differences(baseline.meta, candidate.meta)
    norms: tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]] = ({}, {})
    if settings.normalize:
        impl = settings.normalize
        if impl not in baseline.impls or impl not in candidate.impls:
            lacking = [r.name for r in (baseline, candidate) if impl not in r.impls]
            shared = ", ".join(sorted(set(baseline.impls) & set(candidate.impls)))
            raise CompareError(
                f"--normalize {impl}: unknown implementation in {', '.join(lacking)}; "
                f"implementations there: {shared}"
            )
        norms = (_impl_index(baseline, impl), _impl_index(candidate, impl))
        notes.append(
            f"normalized by {impl}: each case's {settings.metric.name} is divided by {impl}'s "
            f"on the same case of the same run; {impl}'s own cases are not judged"
        )
    names = (baseline.name, candidate.name)

    def judge_all(drift: RunDrift | None) -> list[CaseResult]:
        results = []
        for key in [*baseline.rows, *(k for k in candidate.rows if k not in baseline.rows)]:
            base_row, cand_row = baseline.rows.get(key), candidate.rows.get(key)
            row = base_row if base_row is not None else cand_row
            assert row is not None
            if settings.normalize and row.get("impl") == settings.normalize:
                results.append(_normalizer_result(key, row, base_row, cand_row, names, settings))
                continue
            norm_key = impl_key(row)
            results.append(
                _judge(
                    key,
                    case_label(row),
                    case_fields(row),
                    (base_row, norms[0].get(norm_key) if settings.normalize else None),
                    (cand_row, norms[1].get(norm_key) if settings.normalize else None),
                    names,
                    settings,
                    drift,
                )
            )
        return results

    results = judge_all(None)
    drift = None
    if settings.drift == "auto":
        ratios: dict[str, list[float]] = {}
        for r in results:
            if r.verdict in JUDGED and r.ratio is not None:
                ratios.setdefault(str(r.fields.get("impl")), []).append(r.ratio)
        drift = measure_drift(
            ratios,
            divide_shift=cpu_runs(baseline.meta, candidate.meta),
            normalizer=settings.normalize,
        )
        if drift is None:
            judged = sum(len(v) for v in ratios.values())
            notes.append(f"{judged} judged cases: too few to measure run-to-run drift")
        else:
            notes.append(drift.describe())
            results = judge_all(drift)
    host_note = host_side_note(results)
    if host_note is not None:
        notes.append(host_note)
    summaries = _summaries(results, settings, lambda r: str(r.fields.get("impl")))
    return Report(
        baseline.describe(),
        candidate.describe(),
        settings,
        _ordered(results),
        "runs",
        notes,
        summaries,
        {"baseline": baseline.meta, "candidate": candidate.meta},
        warnings=environment_differences(baseline.meta, candidate.meta),
        drift=drift,
    )


def _normalizer_result(
    key: str,
    row: Mapping[str, Any],
    base_row: Mapping[str, Any] | None,
    cand_row: Mapping[str, Any] | None,
    names: tuple[str, str],
    settings: Settings,
) -> CaseResult:
    """The normalizer's own case: its status still counts, its metric is only reported."""
    raw = replace(settings, normalize=None)
    judged = _judge(
        key, case_label(row), case_fields(row), (base_row, None), (cand_row, None), names, raw
    )
    if judged.verdict in ("failed", "new", "missing"):
        return judged
    ratio = "-" if judged.ratio is None else f"x{judged.ratio:.3g}"
    return CaseResult(
        key=key,
        label=judged.label,
        verdict="normalizer",
        fields=judged.fields,
        sentence=f"{judged.label}: the normalizer; its own {settings.metric.name} changed "
        f"{ratio} (not judged)",
        baseline_value=judged.baseline_value,
        candidate_value=judged.candidate_value,
        baseline_raw=judged.baseline_raw,
        candidate_raw=judged.candidate_raw,
        ratio=judged.ratio,
        ci_low=judged.ci_low,
        ci_high=judged.ci_high,
        baseline_samples=judged.baseline_samples,
        candidate_samples=judged.candidate_samples,
        baseline_status=judged.baseline_status,
        candidate_status=judged.candidate_status,
    )


def compare_impls(run: Run, baseline_impl: str, candidate_impl: str, settings: Settings) -> Report:
    """Judge `candidate_impl` against `baseline_impl` on each case of one run (matched on
    the case fields except impl): a ratio < 1 of latency is a speedup of the candidate."""
    _check_metric(settings.metric, [run])
    for impl in (baseline_impl, candidate_impl):
        if impl not in run.impls:
            raise CompareError(
                f"--impls: no implementation {impl!r} in {run.name}; it has {', '.join(run.impls)}"
            )
    if baseline_impl == candidate_impl:
        raise CompareError(f"--impls: two different implementations, not {baseline_impl} twice")
    base, cand = _impl_index(run, baseline_impl), _impl_index(run, candidate_impl)
    if not base.keys() & cand.keys():
        raise CompareError(
            f"{run.name}: {baseline_impl} and {candidate_impl} share no case "
            "(same fields except impl)"
        )
    results = []
    for key in [*base, *(k for k in cand if k not in base)]:
        row = base.get(key) or cand[key]
        label = shape_label(row)
        results.append(
            _judge(
                str(row.get("case_id")),
                label,
                case_fields(row),
                (base.get(key), None),
                (cand.get(key), None),
                (baseline_impl, candidate_impl),
                settings,
            )
        )
    notes = [f"{candidate_impl} vs {baseline_impl} within run {run.name}"]
    summaries = _summaries(results, settings, lambda r: f"{candidate_impl} vs {baseline_impl}")
    return Report(
        baseline_impl,
        candidate_impl,
        settings,
        _ordered(results),
        "impls",
        notes,
        summaries,
        {"run": run.meta},
    )


def _summaries(
    results: list[CaseResult], settings: Settings, group: Callable[[CaseResult], str]
) -> list[ImplSummary]:
    """The geometric-mean summary of each group of judged cases (see `aggregate`)."""
    groups: dict[str, list[float]] = {}
    failed: dict[str, int] = {}
    for result in results:
        if result.verdict in JUDGED and result.ratio is not None:
            groups.setdefault(group(result), []).append(result.ratio / result.shift)
        elif result.verdict == "failed":
            failed[group(result)] = failed.get(group(result), 0) + 1
            groups.setdefault(group(result), [])
    summaries = []
    for name, ratios in groups.items():
        summary = summarize(
            name,
            ratios,
            settings.threshold,
            higher_is_better=settings.metric.higher_is_better,
            gate=not settings.case_gate,
            confidence=settings.confidence,
            resamples=settings.resamples,
            seed=settings.seed,
        )
        if failed.get(name):
            # Failed cases are left out of the mean, so the mean alone cannot speak for
            # the implementation: with any failed case it is never "improved".
            summary = replace(
                summary,
                verdict="failed",
                failed_cases=failed[name],
                sentence=f"{name}: {failed[name]} failed case(s); " + summary.sentence,
            )
        summaries.append(summary)
    return summaries


def _ordered(results: Iterable[CaseResult]) -> list[CaseResult]:
    rank = {v: i for i, v in enumerate(VERDICTS)}
    return sorted(results, key=lambda r: rank[r.verdict])  # stable: run order within


def _check_metric(metric: Metric, runs: list[Run]) -> None:
    for run in runs:
        ok_rows = [r for r in run.rows.values() if r.get("status") == "ok"]
        if not ok_rows:
            continue
        if not any(number(r.get(metric.name)) is not None for r in ok_rows):
            raise CompareError(
                f"metric {metric.name!r} has no values in {run.name} "
                "(not measured on this device or in this version?)"
            )


def _no_common_cases(baseline: Run, candidate: Run) -> str:
    def facts(run: Run) -> str:
        rows = list(run.rows.values())
        devices = sorted({str(r.get("device")) for r in rows})
        suites = sorted({str(r.get("suite")) for r in rows})
        return f"{run.name}: {len(rows)} cases, suite {suites}, device {devices}"

    return (
        "no common cases (case ids hash every case field, device and dtype included); "
        f"{facts(baseline)}; {facts(candidate)}"
    )


def get_metric(name: str) -> Metric:
    """The metric called `name`, or CompareError listing the known ones."""
    if name not in METRICS:
        raise CompareError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name]
