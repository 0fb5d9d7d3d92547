"""What a comparison found: each case's result (`CaseResult`), how it was judged
(`Settings`) and the whole `Report` that `moebench compare` renders (render.py).
`pairing.py` makes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from moebench.compare.aggregate import ImplSummary
from moebench.compare.bootstrap import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED
from moebench.compare.drift import RunDrift
from moebench.compare.verdict import VERDICTS, Metric, Threshold, VerdictName

Gate = Literal["case", "impl"]
GATES: tuple[str, ...] = ("case", "impl")
DRIFT_MODES: tuple[str, ...] = ("auto", "off")
JUDGED = ("regressed", "improved", "unchanged")


def noise_note(noisy_in: tuple[str, ...]) -> str:
    """'noisy in RUN (...): rerun ...': what a case's sentence and table row say when the
    runs `noisy_in` flagged its timing as noise."""
    return (
        f"noisy in {' and '.join(noisy_in)} (p90/p10 over the device's limit, or the median "
        "still moving): rerun on a quieter machine to rank it"
    )


@dataclass(frozen=True)
class CaseResult:
    """The comparison of one case: values, ratio, CI, verdict and its sentence."""

    key: str
    label: str
    verdict: VerdictName
    sentence: str
    fields: dict[str, Any]
    # The values the ratio compares: the metric, or the metric / the normalizer's metric.
    baseline_value: float | None = None
    candidate_value: float | None = None
    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    baseline_samples: int = 0
    candidate_samples: int = 0
    baseline_status: str | None = None
    candidate_status: str | None = None
    fails_gate: bool = False
    normalized: bool = False
    # The metric itself (equal to the values above unless normalized).
    baseline_raw: float | None = None
    candidate_raw: float | None = None
    # The run's overall shift divided out of `ratio` before judging (CPU runs; 1.0: none).
    shift: float = 1.0
    # The runs (by name) that flagged the case's timing as noise (`noisy`): said, not judged.
    noisy_in: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """The sentence without the case label: why it got its verdict."""
        prefix = f"{self.label}: "
        return self.sentence[len(prefix) :] if self.sentence.startswith(prefix) else self.sentence

    def as_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.key,
            "label": self.label,
            "verdict": self.verdict,
            "sentence": self.sentence,
            "fails_gate": self.fails_gate,
            "baseline_value": self.baseline_value,
            "candidate_value": self.candidate_value,
            "ratio": self.ratio,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "normalized": self.normalized,
            "baseline_raw": self.baseline_raw,
            "candidate_raw": self.candidate_raw,
            "shift": self.shift,
            "noisy_in": list(self.noisy_in),
            "baseline_samples": self.baseline_samples,
            "candidate_samples": self.candidate_samples,
            "baseline_status": self.baseline_status,
            "candidate_status": self.candidate_status,
            "fields": self.fields,
        }


@dataclass(frozen=True)
class Settings:
    """How to judge: metric, threshold, normalizer and the bootstrap's parameters."""

    metric: Metric
    threshold: Threshold
    normalize: str | None = None
    confidence: float = DEFAULT_CONFIDENCE
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    gate: Gate = "case"
    # "auto": measure the run-to-run drift of two runs (moebench.compare.drift); "off": not.
    drift: Literal["auto", "off"] = "auto"

    @property
    def case_gate(self) -> bool:
        """Whether single cases' regressions fail the gate (else implementations')."""
        return self.gate == "case"


@dataclass(frozen=True)
class Report:
    """Every case's result, and what the comparison was."""

    baseline: str
    candidate: str
    settings: Settings
    results: list[CaseResult]
    mode: str = "runs"  # "runs": baseline vs candidate run; "impls": two impls of one run
    notes: list[str] = field(default_factory=list)
    impl_summaries: list[ImplSummary] = field(default_factory=list)
    # run.json of each side ("baseline", "candidate"): commits and environments
    environments: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Differences of setup between the runs (torch, CUDA, driver, GPU, CPU, threads).
    warnings: list[str] = field(default_factory=list)
    drift: RunDrift | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {v: sum(r.verdict == v for r in self.results) for v in VERDICTS}

    @property
    def failing(self) -> list[CaseResult | ImplSummary]:
        """What fails the gate: cases, then implementations (with --gate impl)."""
        return [r for r in (*self.results, *self.impl_summaries) if r.fails_gate]

    @property
    def passed(self) -> bool:
        return not self.failing

    def summary(self) -> str:
        """'cases: 1 regressed, 30 unchanged (44); implementations: ...; gate: FAIL ...'."""
        parts = [f"{n} {v}" for v, n in self.counts.items() if n]
        text = f"cases: {', '.join(parts) or 'none'} ({len(self.results)})"
        if self.impl_summaries:
            by_impl = ", ".join(f"{s.name} {s.verdict}" for s in self.impl_summaries)
            text += f"; implementations: {by_impl}"
        outcome = "ok" if self.passed else f"FAIL ({len(self.failing)} failing)"
        return f"{text}; gate ({self.settings.gate}): {outcome}"
