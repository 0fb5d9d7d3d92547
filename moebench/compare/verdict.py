"""Regression verdicts: a threshold parsed from a spec, the metrics and their direction,
and the small pure rule that turns one case's change into a verdict and a sentence.

The rule (for a metric where lower is better; mirrored where higher is better), with
`ratio` = candidate / baseline of the metric and [low, high] its confidence interval:

- regressed: ratio > 1 + threshold AND low > 1 (the slowdown is both large enough to
  matter and statistically significant: noise alone rarely moves a whole CI past 1);
- improved:  ratio < 1 / (1 + threshold) AND high < 1 (symmetric in log space);
- unchanged: anything else (within the threshold, or beyond it with a CI that still
  contains 1: "too noisy to tell", said so in the sentence).

A metric without samples (peak memory, say) has no CI; it is judged on the threshold
alone, which suits metrics that do not vary from run to run.

The default threshold is 5%: the run-to-run noise of a GPU median over many repeats is
typically 1-3% (clocks and temperature, other tenants, allocator state), so 5% sits above
it and still catches slowdowns worth a look. The CI cannot replace the threshold: it is
built from one run's back-to-back repeats, which share that run's state, so it misses the
between-run part of the noise. Shared CPU runners are far noisier (a tiny case's median
moves by tens of percent between runs): there, pass a larger threshold and gate on
implementations (`--gate impl`, see `aggregate`).

    >>> threshold = Threshold.parse("5%")
    >>> decide(Change(ratio=1.30, low=1.22, high=1.41), threshold).verdict
    'regressed'
    >>> decide(Change(ratio=1.30, low=0.95, high=1.70), threshold).reason
    'x1.3 (95% CI x0.95-x1.7) is beyond +5% but its CI contains x1: too noisy to tell'
    >>> decide(Change(ratio=1.02, low=1.01, high=1.03), threshold).verdict
    'unchanged'
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from moebench.console import brief_error

VerdictName = Literal[
    "failed", "regressed", "improved", "unchanged", "new", "missing", "skipped", "normalizer"
]
# Most severe first: the order of tables and summaries.
VERDICTS: tuple[VerdictName, ...] = (
    "failed",
    "regressed",
    "improved",
    "unchanged",
    "new",
    "missing",
    "skipped",
    "normalizer",  # the --normalize implementation's own cases: shown, not judged
)
# Above the 1-3% run-to-run noise of GPU medians (see the module docstring).
DEFAULT_THRESHOLD = "5%"


class ThresholdError(ValueError):
    """A threshold spec that does not parse."""


@dataclass(frozen=True)
class Threshold:
    """How large a change must be to count: a fraction (0.05 = 5%).

    Parsed like pytest-benchmark's `--benchmark-compare-fail` values: "5%" or "0.05".

    >>> Threshold.parse("5%"), Threshold.parse("0.25"), str(Threshold.parse("12.5%"))
    (Threshold(fraction=0.05), Threshold(fraction=0.25), '12.5%')
    >>> Threshold.parse("five")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    moebench.compare.verdict.ThresholdError: threshold 'five' is not a percentage or a ...
    """

    fraction: float

    @classmethod
    def parse(cls, spec: str) -> Threshold:
        text = str(spec).strip()
        match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(%?)", text)
        problem = f"threshold {spec!r} is not a percentage or a fraction; allowed: e.g. 5% or 0.05"
        if not match:
            raise ThresholdError(problem)
        value = float(match.group(1))
        fraction = value / 100 if match.group(2) else value
        if not math.isfinite(fraction):
            raise ThresholdError(problem)
        return cls(round(fraction, 12))

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%"


@dataclass(frozen=True)
class Metric:
    """A column that can be compared, its direction and, where it has them, its samples.

    samples_of: the per-repeat values behind the column's point value (the median), or
    None for metrics measured once.
    """

    name: str
    higher_is_better: bool
    unit: str
    samples_of: Callable[[Mapping[str, Any]], Sequence[float]] | None = None

    @property
    def has_samples(self) -> bool:
        return self.samples_of is not None


def _latency_samples(row: Mapping[str, Any]) -> Sequence[float]:
    return _floats(row.get("samples_ms"))


def _throughput_samples(row: Mapping[str, Any]) -> Sequence[float]:
    """tokens / latency per repeat: the median of these is tokens_per_s."""
    tokens = row.get("tokens")
    if tokens is None or tokens != tokens:
        return ()
    return tuple(float(tokens) * 1e3 / s for s in _floats(row.get("samples_ms")) if s > 0)


def _floats(value: Any) -> tuple[float, ...]:
    if value is None or isinstance(value, float):  # None or NaN: no samples stored
        return ()
    return tuple(float(v) for v in value if v is not None and v == v)


def _metric(name: str, higher: bool, unit: str, samples: Any = None) -> tuple[str, Metric]:
    return name, Metric(name, higher, unit, samples)


METRICS: dict[str, Metric] = dict(
    [
        _metric("latency_ms", False, "ms", _latency_samples),
        _metric("tokens_per_s", True, "tokens/s", _throughput_samples),
        _metric("latency_p10_ms", False, "ms"),
        _metric("latency_p90_ms", False, "ms"),
        _metric("wall_s", False, "s"),
        _metric("peak_mem_bytes", False, "bytes"),
        _metric("activation_bytes", False, "bytes"),
        _metric("weight_bytes", False, "bytes"),
        _metric("device_mem_used_bytes", False, "bytes"),
        _metric("achieved_tflops", True, "TFLOP/s"),
        _metric("achieved_gbps", True, "GB/s"),
        _metric("roofline_frac", True, ""),
        _metric("comm_ms", False, "ms"),
        _metric("dispatch_ms", False, "ms"),
        _metric("combine_ms", False, "ms"),
        _metric("comm_bytes", False, "bytes"),
        _metric("energy_j", False, "J"),
        _metric("j_per_token", False, "J"),
        _metric("imbalance", False, ""),
        _metric("dropped_frac", False, ""),
        _metric("rel_err", False, ""),
        _metric("fidelity_err", False, ""),
    ]
)


@dataclass(frozen=True)
class Change:
    """candidate / baseline of a metric, with its confidence interval (None: no CI)."""

    ratio: float
    low: float | None = None
    high: float | None = None
    higher_is_better: bool = False
    confidence: float = 0.95

    @property
    def has_ci(self) -> bool:
        return self.low is not None and self.high is not None

    def worse(self) -> tuple[float, float | None, float | None]:
        """(factor, low, high) oriented so that > 1 is worse, whatever the direction."""
        if not self.higher_is_better:
            return self.ratio, self.low, self.high
        return _inv(self.ratio), _inv(self.high), _inv(self.low)

    def describe(self) -> str:
        """'x1.3 (95% CI x1.2-x1.4)'."""
        text = f"x{_g(self.ratio)}"
        if self.has_ci:
            text += f" ({self.confidence:.0%} CI x{_g(self.low)}-x{_g(self.high)})"
        return text


def _inv(value: float | None) -> float | None:
    if value is None:
        return None
    return math.inf if value == 0 else 1 / value


def _g(value: float | None) -> str:
    return "-" if value is None else format(value, ".3g")


@dataclass(frozen=True)
class Decision:
    """A verdict and the reason for it, as a person reads it in a CI log."""

    verdict: VerdictName
    reason: str


def decide(change: Change, threshold: Threshold, band: float | None = None) -> Decision:
    """The verdict on one case's change (see the module docstring for the rule). band:
    the run-to-run drift (moebench.compare.drift) a change must also exceed, or None."""
    worse, low, high = change.worse()
    if band is not None and 1 / band <= worse <= band and not math.isnan(worse):
        verdict = decide(change, threshold)
        if verdict.verdict in ("regressed", "improved"):
            return Decision(
                "unchanged",
                f"{verdict.reason}, but within the run-to-run drift (x{band:.3g}): too "
                "noisy to tell",
            )
        return verdict
    limit = 1 + threshold.fraction
    side = "+" if not change.higher_is_better else "-"
    what = change.describe()
    if math.isnan(worse):
        return Decision("skipped", f"{what}: undefined ratio")
    if worse > limit:
        if low is None or low > 1:
            return Decision("regressed", _beyond(what, side, threshold, change.has_ci))
        return Decision(
            "unchanged",
            f"{what} is beyond {side}{threshold} but its CI contains x1: too noisy to tell",
        )
    if worse < 1 / limit:
        better_side = "-" if side == "+" else "+"
        if high is None or high < 1:
            return Decision("improved", _beyond(what, better_side, threshold, change.has_ci))
        return Decision(
            "unchanged",
            f"{what} is beyond {better_side}{threshold} but its CI contains x1: too noisy to tell",
        )
    return Decision("unchanged", f"{what} is within {threshold}")


def _beyond(what: str, side: str, threshold: Threshold, has_ci: bool) -> str:
    if has_ci:
        return f"{what} is beyond {side}{threshold} and its CI excludes x1"
    return f"{what} is beyond {side}{threshold} (no samples: no CI)"


def status_decision(
    baseline_status: str | None, candidate_status: str | None, errors: tuple[str, str]
) -> Decision | None:
    """'failed' when either side did not finish ok (None when both did)."""
    sides = []
    for side, status, error in zip(
        ("baseline", "candidate"), (baseline_status, candidate_status), errors
    ):
        if status != "ok":
            detail = f": {brief_error(error)}" if error else ""
            sides.append(f"{status} in {side}{detail}")
    if not sides:
        return None
    return Decision("failed", "; ".join(sides))


def fails_gate(
    verdict: VerdictName,
    baseline_status: str | None,
    candidate_status: str | None,
    *,
    regressions_count: bool = True,
) -> bool:
    """Whether a result fails the CI gate: a regression (where `regressions_count`: the
    gate is at this level, case or implementation), or a case that was ok in the baseline
    and is not in the candidate (an error, a mismatch, an OOM, a timeout)."""
    if verdict == "regressed":
        return regressions_count
    return verdict == "failed" and baseline_status == "ok" and candidate_status != "ok"
