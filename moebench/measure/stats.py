"""Statistics derived from kept samples (never from other statistics), and whether they
are noise.

A case is `noisy` when its latency cannot be trusted to a few percent:

- its spread p90 / p10 is over NOISY_SPREAD for the device kind. A quiet GPU times one
  kernel sequence to within a few percent (p90/p10 about 1.01-1.10 on an H100/H200), so
  1.25 is already a disturbed card; a CPU is far less regular (caches, frequency, other
  processes: 1.1-1.6 on an idle machine for the smoke suite's millisecond cases), so 2.0;
- or its median did not settle: the median of all samples is more than
  MEDIAN_DRIFT_LIMIT away from the median of the first half (the machine changed
  under the case; the timing loop stops early when they agree within 1%).

`latency_ci_low_ms` / `latency_ci_high_ms` bracket the median with a distribution-free
confidence interval (order statistics of the samples, binomial): the report names a
winner only when intervals do not overlap. The interval comes from one run's repeats; it
does not see what moves a whole case between runs (see moebench.compare).
"""

from __future__ import annotations

import math
import statistics

# p90 / p10 above which a case is noisy, per device kind (module docstring).
NOISY_SPREAD = {"cuda": 1.25, "cpu": 2.0}
MEDIAN_DRIFT_LIMIT = 0.05
MEDIAN_CONFIDENCE = 0.95


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median_drift(samples: list[float]) -> float:
    """|median(all) - median(first half)| / median(all); 0 with fewer than 4 samples."""
    if len(samples) < 4:
        return 0.0
    whole = statistics.median(samples)
    half = statistics.median(samples[: len(samples) // 2])
    return abs(whole - half) / whole if whole else 0.0


def median_ci(samples: list[float], confidence: float = MEDIAN_CONFIDENCE) -> tuple[float, float]:
    """Distribution-free CI of the median: the order statistics x_(j), x_(k) that hold
    the median with probability >= `confidence` (binomial(n, 1/2)); the whole range when
    there are too few samples for that."""
    ordered = sorted(samples)
    n = len(ordered)
    cdf, j = 0.0, 0
    tail = (1 - confidence) / 2
    # Largest j with P(Binomial(n, 1/2) < j) <= tail: x_(j) (0-based j) is the low end.
    while j < n and cdf + math.comb(n, j) / 2**n <= tail:
        cdf += math.comb(n, j) / 2**n
        j += 1
    return ordered[j - 1] if j else ordered[0], ordered[n - j] if j else ordered[-1]


def summarize(samples_ms: list[float], device_kind: str = "cuda") -> dict[str, float | bool]:
    """median, p10, p90, standard deviation, spread (p90/p10), the median's CI and the
    noisy flag (module docstring) of latency samples in ms; device_kind "cpu" or "cuda"."""
    p10, p90 = percentile(samples_ms, 10), percentile(samples_ms, 90)
    spread = p90 / p10 if p10 > 0 else math.inf
    low, high = median_ci(samples_ms)
    limit = NOISY_SPREAD.get(device_kind, NOISY_SPREAD["cpu"])
    return {
        "latency_ms": statistics.median(samples_ms),
        "latency_p10_ms": p10,
        "latency_p90_ms": p90,
        "latency_std_ms": statistics.stdev(samples_ms) if len(samples_ms) > 1 else 0.0,
        "latency_ci_low_ms": low,
        "latency_ci_high_ms": high,
        "spread": spread,
        "noisy": bool(spread > limit or median_drift(samples_ms) > MEDIAN_DRIFT_LIMIT),
    }


STABLE_MIN_SAMPLES = 30


def is_stable(samples: list[float], tolerance: float = 0.01) -> bool:
    """True when there are enough samples for percentiles and a confidence interval
    (STABLE_MIN_SAMPLES) and the median of all is within `tolerance` of the median of the
    first half: more repeats would not move the answer."""
    return len(samples) >= STABLE_MIN_SAMPLES and median_drift(samples) <= tolerance
