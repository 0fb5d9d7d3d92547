"""A comparison as a rich table (terminal), Markdown (a CI job summary) and JSON."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.table import Table
from rich.text import Text

from moebench.compare.aggregate import ImplSummary
from moebench.compare.report import CaseResult, Report, noise_note
from moebench.compare.verdict import Metric

VERDICT_STYLE = {
    "failed": "bold red",
    "regressed": "red",
    "improved": "green",
    "unchanged": "",
    "new": "cyan",
    "missing": "yellow",
    "skipped": "dim",
    "normalizer": "dim",
}
VERDICT_ICON = {
    "failed": "❌",
    "regressed": "🔴",
    "improved": "🟢",
    "unchanged": "⚪",
    "new": "🆕",
    "missing": "❔",
    "skipped": "➖",
    "normalizer": "📏",
}
# Markdown: the full table only up to this many rows (GitHub caps a summary at 1 MiB).
MARKDOWN_MAX_ROWS = 500


def format_value(value: float | None, metric: Metric) -> str:
    """A metric value in its unit: '1.23 ms', '12.0 MiB', '4,513 tokens/s'."""
    if value is None:
        return "-"
    if metric.unit == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    if metric.unit == "tokens/s":
        return f"{value:,.0f}/s"
    return f"{value:.3g} {metric.unit}".rstrip()


def format_ratio(result: CaseResult | ImplSummary) -> str:
    """'x1.32' (candidate / baseline), '-' when there is none."""
    return "-" if result.ratio is None else f"x{result.ratio:.3g}"


def format_ci(result: CaseResult | ImplSummary) -> str:
    """'1.25-1.40', '-' when there is no CI."""
    if result.ci_low is None or result.ci_high is None:
        return "-"
    return f"{result.ci_low:.3g}-{result.ci_high:.3g}"


def _headings(report: Report) -> tuple[str, str, str, str]:
    """Column titles: baseline, candidate, ratio, CI (normalized values under a
    normalized heading, so a row never mixes raw values with a normalized ratio)."""
    s = report.settings
    ratio = "ratio" if not s.normalize else "ratio (normalized)"
    ci = f"{s.confidence:.0%} CI"
    base, cand = (
        (report.baseline, report.candidate) if report.mode == "impls" else ("baseline", "candidate")
    )
    if s.normalize:
        base, cand = f"{base} ÷ {s.normalize}", f"{cand} ÷ {s.normalize}"
    return base, cand, ratio, ci


def format_result_values(result: CaseResult, report: Report) -> tuple[str, str]:
    """(baseline, candidate) as the ratio compares them: the metric in its unit, or the
    metric divided by the normalizer's ('0.452x'). The normalizer's own row shows its raw
    metric, since it is not divided by itself."""
    metric = report.settings.metric
    if result.normalized and result.verdict != "normalizer":
        return tuple(  # type: ignore[return-value]
            "-" if v is None else f"{v:.3g}x"
            for v in (result.baseline_value, result.candidate_value)
        )
    return format_value(result.baseline_raw, metric), format_value(result.candidate_raw, metric)


def title(report: Report) -> str:
    """'moebench compare: latency_ms, normalized by reference'."""
    s = report.settings
    what = f"{report.candidate} vs {report.baseline}" if report.mode == "impls" else "compare"
    text = f"moebench {what}: {s.metric.name}"
    if s.normalize:
        text += f", normalized by {s.normalize}"
    return text


def method(report: Report) -> str:
    """One line on how verdicts are reached."""
    s = report.settings
    direction = "higher" if s.metric.higher_is_better else "lower"
    ci = (
        f"{s.confidence:.0%} CI of the ratio of medians by a seeded bootstrap of the kept "
        f"samples ({s.resamples} resamples, seed {s.seed})"
        if s.metric.has_samples
        else "no samples for this metric: judged on the threshold alone"
    )
    gate = (
        "the gate is on single cases"
        if s.case_gate
        else "the gate is on each implementation's geometric mean over its cases"
    )
    return (
        f"threshold {s.threshold}; {direction} is better; {ci}; regressed = beyond the "
        f"threshold and the CI excludes x1; {gate}"
    )


def _styled(verdict: str, fails: bool) -> str:
    style = VERDICT_STYLE[verdict]
    text = f"[{style}]{verdict}[/]" if style else verdict
    return text + (" [bold](gate)[/]" if fails else "")


# The case column's narrowest: the other five columns take 63 of an 80-column terminal
# with their borders and padding (verdicts up to "normalizer", a 95% CI up to
# "0.956-0.999"), and a table wider than the terminal is cut at its edge, not wrapped.
CASE_MIN_WIDTH = 14
VERDICT_MAX_WIDTH = len("normalizer")


def rich_table(report: Report) -> Table:
    """The terminal table, most severe verdicts first. It fits an 80-column terminal:
    the case labels wrap, the figures do not."""
    base_head, cand_head, ratio_head, ci_head = _headings(report)
    table = Table(title=title(report), caption=method(report))
    table.add_column("verdict", max_width=VERDICT_MAX_WIDTH)  # "(gate)" on a line of its own
    table.add_column("case", ratio=1, min_width=CASE_MIN_WIDTH)
    for head in (base_head, cand_head, ratio_head, ci_head):
        table.add_column(head, justify="right", no_wrap=True)
    for result in report.results:
        table.add_row(
            _styled(result.verdict, result.fails_gate),
            Text(result.label),
            *format_result_values(result, report),
            format_ratio(result),
            format_ci(result),
        )
    return table


def rich_impl_table(report: Report) -> Table:
    """One line per implementation: the geometric mean of its case ratios."""
    _, _, ratio_head, ci_head = _headings(report)
    table = Table(title="per implementation: geometric mean of the case ratios")
    table.add_column("verdict")
    table.add_column("implementation")
    table.add_column("cases", justify="right")
    table.add_column(ratio_head, justify="right", no_wrap=True)
    table.add_column(ci_head, justify="right", no_wrap=True)
    for summary in report.impl_summaries:
        table.add_row(
            _styled(summary.verdict, summary.fails_gate),
            summary.name,
            str(summary.cases),
            format_ratio(summary),
            format_ci(summary),
        )
    return table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


ENVIRONMENT_FACTS = (
    ("moebench commit", "git_sha"),
    ("moebench", "moebench"),
    ("torch", "torch"),
    ("CUDA", "torch_cuda"),
    ("driver", "driver"),
    ("device", "gpu"),
    ("CPU", "cpu"),
    ("started", "started_at"),
)


def _environment_fact(meta: dict[str, Any], key: str) -> str:
    if key == "gpu":
        gpus = meta.get("gpus") or []
        return str(gpus[0].get("name")) if gpus and isinstance(gpus[0], dict) else "-"
    env = meta.get("env") if isinstance(meta.get("env"), dict) else {}
    value = meta.get(key, env.get(key))
    return "-" if value in (None, "") else str(value)


def environment_rows(report: Report) -> list[tuple[str, list[str]]]:
    """(fact, value per side) for the top of the markdown: what each side ran on."""
    sides = list(report.environments.values())
    rows = []
    for label, key in ENVIRONMENT_FACTS:
        values = [_environment_fact(meta, key) for meta in sides]
        if any(v != "-" for v in values):
            rows.append((label, values))
    return rows


def markdown(report: Report) -> str:
    """A job summary: the outcome, the two sides (runs, commits, environments), how
    verdicts are reached, the per-implementation summary, one list of what changed or
    failed (each with its reason in the row), then every case in a collapsed table."""
    counts = report.counts
    outcome = (
        f"✅ passed ({report.settings.gate} gate)"
        if report.passed
        else f"❌ failed ({report.settings.gate} gate): {len(report.failing)} failing"
    )
    lines = [
        f"## {title(report)}",
        "",
        f"**{outcome}** · " + " · ".join(f"{n} {v}" for v, n in counts.items() if n),
        "",
    ]
    if report.mode == "runs":
        lines += ["| | baseline | candidate |", "|---|---|---|"]
        lines.append(f"| run | `{_cell(report.baseline)}` | `{_cell(report.candidate)}` |")
        for label, values in environment_rows(report):
            lines.append(f"| {label} | " + " | ".join(_cell(v) for v in values) + " |")
        lines.append("")
    lines.append(_cell(method(report)) + "  ")
    lines.extend(f"{_cell(note)}  " for note in report.notes)
    lines.append("")
    lines.extend(f"> ⚠️ **warning:** {_cell(warning)}\n" for warning in report.warnings)
    _, _, ratio_head, ci_head = _headings(report)
    if report.impl_summaries:
        lines.extend(
            [
                "### Per implementation (geometric mean of the case ratios)",
                "",
                f"| verdict | implementation | cases | failed | {ratio_head} | {ci_head} |",
                "|---|---|--:|--:|--:|--:|",
            ]
        )
        for summary in report.impl_summaries:
            gate = " (gate)" if summary.fails_gate else ""
            lines.append(
                f"| {VERDICT_ICON[summary.verdict]} {summary.verdict}{gate} | "
                f"{_cell(summary.name)} | {summary.cases} | {summary.failed_cases} | "
                f"{format_ratio(summary)} | {format_ci(summary)} |"
            )
        lines.append("")
    notable = [r for r in report.results if r.verdict in ("failed", "regressed", "improved")]
    if notable:
        heading = f"### Changed or failed ({len(notable)})"
        if not report.settings.case_gate:
            heading += ": single cases inform, the gate is per implementation"
        lines.extend([heading, "", *_md_table(report, notable), ""])
    shown = report.results[:MARKDOWN_MAX_ROWS]
    lines.extend(
        [
            f"<details><summary>All {len(report.results)} cases</summary>",
            "",
            *_md_table(report, shown),
            "",
        ]
    )
    if len(report.results) > len(shown):
        lines.append(f"({len(report.results) - len(shown)} more in the JSON output)")
    lines.extend(["</details>", ""])
    return "\n".join(lines)


def _md_table(report: Report, results: list[CaseResult]) -> list[str]:
    heads = _headings(report)
    rows = [
        f"| verdict | case | {' | '.join(heads)} | why |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for r in results:
        gate = " (gate)" if r.fails_gate else ""
        baseline, candidate = format_result_values(r, report)
        rows.append(
            f"| {VERDICT_ICON[r.verdict]} {r.verdict}{gate} | {_cell(r.label)} | "
            f"{baseline} | {candidate} | {format_ratio(r)} | {format_ci(r)} | "
            f"{_cell(_why(r, report))} |"
        )
    return rows


def _why(result: CaseResult, report: Report) -> str:
    """The reason in a table row, without repeating the row's numbers: the rule for a
    judged case, the message for a failed, skipped, new or missing one."""
    threshold = report.settings.threshold
    noise = f"; {noise_note(result.noisy_in)}" if result.noisy_in else ""
    if result.verdict in ("regressed", "improved"):
        return f"beyond {threshold} and the CI excludes x1{noise}"
    if result.verdict == "unchanged":
        return f"within {threshold}, or the CI includes x1{noise}"
    if result.verdict == "normalizer":
        return "the normalizer: shown raw, not judged"
    return result.reason


def as_json(report: Report) -> dict[str, Any]:
    """Everything in the report, for machines (the exit status is `passed`)."""
    s = report.settings
    return {
        "mode": report.mode,
        "baseline": report.baseline,
        "candidate": report.candidate,
        "metric": s.metric.name,
        "higher_is_better": s.metric.higher_is_better,
        "unit": s.metric.unit,
        "threshold": s.threshold.fraction,
        "normalize": s.normalize,
        "confidence": s.confidence,
        "bootstrap": {"resamples": s.resamples, "seed": s.seed, "statistic": "ratio of medians"},
        "passed": report.passed,
        "gate": s.gate,
        "counts": report.counts,
        "impls": [summary.as_dict() for summary in report.impl_summaries],
        "summary": report.summary(),
        "notes": report.notes,
        "warnings": report.warnings,
        "drift": None
        if report.drift is None
        else {
            "cases": report.drift.cases,
            "shift": report.drift.shift,
            "scatter": report.drift.scatter,
            "band": report.drift.band,
            "divided": report.drift.divided,
        },
        "cases": [r.as_dict() for r in report.results],
    }


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def dumps(report: Report) -> str:
    """The report as strict JSON text."""
    return json.dumps(_finite(as_json(report)), indent=2, default=str, allow_nan=False)
