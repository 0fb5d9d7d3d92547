"""Statistics derived from kept samples (never from other statistics)."""

from __future__ import annotations

import statistics


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """median, p10, p90 and standard deviation of latency samples, in ms."""
    return {
        "latency_ms": statistics.median(samples_ms),
        "latency_p10_ms": percentile(samples_ms, 10),
        "latency_p90_ms": percentile(samples_ms, 90),
        "latency_std_ms": statistics.stdev(samples_ms) if len(samples_ms) > 1 else 0.0,
    }


STABLE_MIN_SAMPLES = 30


def is_stable(samples: list[float], tolerance: float = 0.01) -> bool:
    """True when there are enough samples for percentiles and a confidence interval
    (STABLE_MIN_SAMPLES) and the median of all is within `tolerance` of the median of the
    first half: more repeats would not move the answer."""
    if len(samples) < STABLE_MIN_SAMPLES:
        return False
    whole = statistics.median(samples)
    half = statistics.median(samples[: len(samples) // 2])
    return abs(whole - half) <= tolerance * whole
