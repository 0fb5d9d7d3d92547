"""Per-implementation verdicts: the geometric mean of an implementation's case ratios.

One case's CI comes from its own repeats, taken back to back, so it cannot see what moves
a whole case between runs (cache and frequency state, a neighbour on a shared machine).
On a quiet GPU that is small next to the threshold; on a shared CPU runner a tiny case's
median moves by tens of percent from one run to the next. Across the cases of one
implementation those moves are mostly independent, so their geometric mean is far
steadier, and the spread between cases measures exactly the run-to-run noise the
per-case CI misses. `--gate impl` gates on these summaries instead of single cases.

The CI of the geometric mean is a seeded percentile bootstrap over the cases (resample
the cases' log ratios with replacement, average, exponentiate); the verdict follows the
same rule as a case's (`verdict.decide`): beyond the threshold and the CI excludes x1.

    >>> from moebench.compare.verdict import Threshold
    >>> ratios = [1.31, 1.28, 1.35, 1.25, 1.33, 1.29]
    >>> summary = summarize("grouped", ratios, Threshold.parse("5%"), higher_is_better=False)
    >>> summary.verdict, round(summary.ratio, 2)
    ('regressed', 1.3)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moebench.compare.bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    MIN_SAMPLES,
)
from moebench.compare.verdict import Change, Threshold, VerdictName, decide


@dataclass(frozen=True)
class ImplSummary:
    """One implementation's geometric-mean ratio over its judged cases, and its verdict."""

    name: str
    cases: int
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    verdict: VerdictName
    sentence: str
    fails_gate: bool = False
    failed_cases: int = 0  # cases that failed (not in the mean); any makes it "failed"

    def as_dict(self) -> dict[str, object]:
        return {
            "impl": self.name,
            "cases": self.cases,
            "failed_cases": self.failed_cases,
            "ratio": self.ratio,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "verdict": self.verdict,
            "sentence": self.sentence,
            "fails_gate": self.fails_gate,
        }


def summarize(
    name: str,
    ratios: Sequence[float],
    threshold: Threshold,
    *,
    higher_is_better: bool,
    gate: bool = False,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> ImplSummary:
    """The summary of `name` from its cases' ratios (finite and > 0 only are used).
    gate: whether a regression here fails the CI gate."""
    logs = np.log(np.asarray([r for r in ratios if 0 < r < math.inf], dtype=np.float64))
    if logs.size == 0:
        return ImplSummary(name, 0, None, None, None, "skipped", f"{name}: no judged case")
    ratio = float(np.exp(logs.mean()))
    low = high = None
    if logs.size >= MIN_SAMPLES:
        rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
        picks = rng.integers(0, logs.size, size=(resamples, logs.size))
        means = np.exp(logs[picks].mean(axis=1))
        tail = (1 - confidence) / 2
        low, high = (float(q) for q in np.quantile(means, [tail, 1 - tail]))
    change = Change(ratio, low, high, higher_is_better=higher_is_better, confidence=confidence)
    decision = decide(change, threshold)
    few = "" if low is not None else f" (fewer than {MIN_SAMPLES} cases: no CI)"
    return ImplSummary(
        name,
        int(logs.size),
        ratio,
        low,
        high,
        decision.verdict,
        f"{name}: geometric mean over {logs.size} cases{few}: {decision.reason}",
        fails_gate=gate and decision.verdict == "regressed",
    )
