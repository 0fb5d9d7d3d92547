"""Confidence interval of a ratio of medians, by a seeded percentile bootstrap.

One side of a comparison is a set of kept samples (every timed repeat of a case), or,
when normalized, two sets: the case's samples and the normalizing implementation's
samples on the same case, whose statistic is median(case) / median(normalizer). The
ratio compared is statistic(candidate) / statistic(baseline).

Each of the (two or four) sample sets is resampled with replacement, independently,
`resamples` times; the ratio is recomputed each time; the CI is the (1-confidence)/2 and
(1+confidence)/2 quantiles of those ratios. Medians, not means: a few preempted or
stalled repeats do not move a median. The generator is seeded (by `seed` and the case
key), so the same inputs always give the same interval and a CI log can be reproduced.

    >>> base = Side((10.0, 10.2, 9.9, 10.1, 10.0))
    >>> cand = Side((13.0, 13.1, 12.9, 13.2, 13.0))
    >>> low, high = ratio_ci(base, cand, key="case")
    >>> 1.25 < low < 1.3 < high < 1.35
    True
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
# Below this many samples on a set, a bootstrap says nothing useful: no CI.
MIN_SAMPLES = 3


@dataclass(frozen=True)
class Side:
    """The kept samples of one case in one run, and of its normalizer (if normalized)."""

    samples: tuple[float, ...]
    normalizer_samples: tuple[float, ...] | None = None

    def can_bootstrap(self) -> bool:
        sets = (
            [self.samples]
            if self.normalizer_samples is None
            else [
                self.samples,
                self.normalizer_samples,
            ]
        )
        return all(len(s) >= MIN_SAMPLES for s in sets)


def _resampled_medians(
    samples: tuple[float, ...], rng: np.random.Generator, resamples: int
) -> np.ndarray:
    values = np.asarray(samples, dtype=np.float64)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return np.median(values[picks], axis=1)


def _statistic(side: Side, rng: np.random.Generator, resamples: int) -> np.ndarray:
    medians = _resampled_medians(side.samples, rng, resamples)
    if side.normalizer_samples is not None:
        medians = medians / _resampled_medians(side.normalizer_samples, rng, resamples)
    return medians


def ratio_ci(
    baseline: Side,
    candidate: Side,
    *,
    key: str,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float] | None:
    """(low, high) of statistic(candidate) / statistic(baseline), or None when a side has
    fewer than MIN_SAMPLES samples. `key` (the case id) seeds the generator with `seed`."""
    if not (baseline.can_bootstrap() and candidate.can_bootstrap()):
        return None
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(key.encode())]))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = _statistic(candidate, rng, resamples) / _statistic(baseline, rng, resamples)
    ratios = ratios[~np.isnan(ratios)]
    if ratios.size == 0:
        return None
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return float(low), float(high)
