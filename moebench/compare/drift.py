"""Run-to-run drift: what moves every case between two runs of the same code.

A case's confidence interval comes from its own back-to-back repeats, so it cannot see
what moves a whole case from one run to the next: on a shared CPU a neighbour's load, the
frequency governor, caches (a tiny case's median moves by tens of percent, its p90/p10 up
to hundreds); on a GPU clocks, temperature and other tenants (1-3%). Two runs of the same
code must not fail on that, so a comparison of two runs measures it across all their
judged cases, from the log ratios log(candidate / baseline):

- shift: the whole candidate run being faster or slower: the median over implementations
  of each implementation's median (with `--normalize`, the normalizer counts as one more,
  at 1), so a change confined to fewer than half of the implementations does not move it
  (one implementation 5x slower beside grouped and the reference), while a normalizer that
  happens to move does not read as every other implementation moving. On CPU runs it is
  divided out before judging
  (a case's `ratio` stays the raw one, its `shift` is recorded and its sentence gives the
  judged ratio): each case is then judged against the run as a whole, so a busier machine
  flags nothing, one implementation or case slower than the rest still does, and a change
  that slows every case alike is not seen, by design. On GPU runs it is kept (a uniform
  slowdown of a card is real) and reported.
- scatter: the robust standard deviation of the log ratios (1.4826 x their median
  absolute deviation), each around the median of its own implementation's cases: a real
  change tends to move one implementation's cases together, which then does not widen it
  (an implementation with fewer than 3 cases is measured around the overall median;
  so are all when fewer than MIN_CASES cases are in such groups). Cases differ in how
  much they move (a 0.2 ms case far more than one of 20 ms), so an implementation with
  at least MIN_GROUP cases whose own scatter is larger gets that (never less than the
  pooled one: a few cases that happened to agree are no evidence of a quiet case). A case
  is judged regressed or improved only when its change is also beyond DRIFT_Z scatters:
  `band` = exp(DRIFT_Z x scatter), the smallest change a single case can show.

The smallest effect a comparison can detect is therefore max(threshold, band) per case;
an implementation's geometric mean over n cases (`--gate impl`) resolves about
band / sqrt(n), though its cases also move together between runs (on the busy CPU below,
a same-code implementation mean moved by up to 15%, and a 10% slowdown once read as 46%).
Measured by benchmarks/noise.sh on this project's shared 2-core CPU at a load average of
12-14: the smoke suite's band is x2.8-x6.4 per case (scatter 0.25-0.47), so only a
slowdown of x4-x6 shows in single cases, and a 50% one in `--gate impl`; on an idle GPU
the band is under the 5% threshold, which then decides.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Scatters a single case must exceed. A normal tail would be 6e-5 per case, but the log
# ratios of a shared CPU have heavy tails: at 3 scatters, one case in 44 of two same-code
# smoke runs beside a CPU hog still passed the band (x2.87 against x2.76).
DRIFT_Z = 4.0
MIN_GROUP = 4
# Fewer judged cases than this: the drift is not estimated (no band, no shift removed).
MIN_CASES = 8
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class RunDrift:
    """Shift and scatter of the log ratios of two runs' cases (module docstring)."""

    cases: int
    shift: float  # exp(median log ratio): x1.2 = the candidate run 20% slower overall
    scatter: float  # robust standard deviation of the log ratios, pooled
    divided: bool  # whether the shift is divided out of each case's ratio
    impl_scatter: Mapping[str, float] = field(default_factory=dict)

    @property
    def band(self) -> float:
        """The smallest ratio (or its inverse) a single case must reach to count."""
        return math.exp(DRIFT_Z * self.scatter)

    def band_of(self, impl: str) -> float:
        """The band of one implementation's cases (its own scatter where it has one)."""
        return math.exp(DRIFT_Z * self.impl_scatter.get(impl, self.scatter))

    def describe(self) -> str:
        shift = f"the candidate run is x{self.shift:.3g} the baseline (median implementation)"
        shift += ", divided out (CPU runs)" if self.divided else ", kept"
        bands = ", ".join(f"{impl} x{self.band_of(impl):.3g}" for impl in self.impl_scatter)
        return (
            f"run-to-run drift over {self.cases} cases: {shift}; scatter {self.scatter:.3g} "
            f"in log ratio, so a single case must move beyond x{self.band:.3g} to count"
            + (f" (per implementation: {bands})" if bands else "")
        )


def measure_drift(
    ratios_by_impl: Mapping[str, Iterable[float]],
    divide_shift: bool,
    normalizer: str | None = None,
) -> RunDrift | None:
    """The drift of the finite positive ratios (grouped by implementation), or None with
    fewer than MIN_CASES of them. normalizer: the implementation the ratios are divided by
    (it counts as one more implementation whose ratio is 1)."""
    groups = {
        impl: [math.log(r) for r in ratios if 0 < r < math.inf]
        for impl, ratios in ratios_by_impl.items()
    }
    logs = [v for values in groups.values() for v in values]
    if len(logs) < MIN_CASES:
        return None
    # The machine's shift: the median over implementations of each one's median, so a
    # change confined to fewer than half of the implementations does not move it.
    impl_medians = [statistics.median(values) for values in groups.values() if values]
    if normalizer is not None:  # the normalizer's own ratio to itself is 1 on every case
        impl_medians.append(0.0)
    center = statistics.median(impl_medians)
    deviations = []
    for values in groups.values():
        middle = statistics.median(values) if len(values) >= 3 else center
        deviations += [abs(v - middle) for v in values]
    if sum(len(v) for v in groups.values() if len(v) >= 3) < MIN_CASES:
        deviations = [abs(v - center) for v in logs]
    scatter = MAD_TO_SIGMA * statistics.median(deviations)
    own = {
        impl: max(
            scatter,
            MAD_TO_SIGMA * statistics.median(abs(v - statistics.median(values)) for v in values),
        )
        for impl, values in groups.items()
        if len(values) >= MIN_GROUP
    }
    return RunDrift(len(logs), math.exp(center), scatter, divide_shift, own)


def cpu_runs(*metas: Mapping[str, Any]) -> bool:
    """Whether every run's device is a CPU (its run.json `device`)."""
    return all(str(meta.get("device") or "").startswith("cpu") for meta in metas)


# run.json facts that make two runs' timings incomparable when they differ.
ENVIRONMENT_FACTS = (
    ("torch", "torch"),
    ("CUDA", "torch_cuda"),
    ("driver", "driver"),
    ("CPU model", "cpu"),
    ("dependent launch (PDL)", "dependent_launch"),
    ("fast launch of moebench's kernels", "fast_launch"),
    ("Gluon kernels in the triton tuner's race", "gluon_ws"),
    ("merged-tail tiles in the triton tuner's race", "merge_tail"),
    ("the triton tuner's run-off", "triton_runoff"),
    ("the triton layer's shared experts on a side stream", "shared_stream"),
)


# Hosts this far apart in their time per torch op (`ceilings.host_op_us`, either way)
# are named: every call bound by its host's launches moves with that, whatever the code.
HOST_SPEED_NOTE = 1.25


def environment_differences(baseline: Mapping[str, Any], candidate: Mapping[str, Any]) -> list[str]:
    """Sentences naming what differs between two runs' setups: the suite they ran, then
    their environments: torch, CUDA, driver, GPU, the timer's L2 flush and timed warm-up,
    CPU model, dependent launch and fast launch of moebench's Triton kernels, CPU threads
    (facts one of them lacks are not compared); and hosts whose speed differs by
    HOST_SPEED_NOTE or more."""
    suites = [baseline.get("suite"), candidate.get("suite")]
    other_suite = (
        [
            f"the runs are of different suites: {suites[0]} (baseline) vs {suites[1]} "
            "(candidate); only the cases both hold are compared"
        ]
        if all(suites) and suites[0] != suites[1]
        else []
    )
    base_env = baseline.get("environment") or {}
    cand_env = candidate.get("environment") or {}
    pairs = [(label, base_env.get(key), cand_env.get(key)) for label, key in ENVIRONMENT_FACTS]
    pairs.append(("GPU", _gpus(base_env), _gpus(cand_env)))
    pairs.append(("L2 flush", _l2_flush(baseline), _l2_flush(candidate)))
    pairs.append(("timed warm-up", _timed_warmup(baseline), _timed_warmup(candidate)))
    pairs.append(("CPU threads", baseline.get("cpu_threads"), candidate.get("cpu_threads")))
    found = [
        f"the runs differ in {label}: {base} (baseline) vs {cand} (candidate); their "
        "timings are not of the same setup"
        for label, base, cand in pairs
        if base not in (None, "") and cand not in (None, "") and base != cand
    ]
    host = _host_speed(baseline, candidate)
    return [*other_suite, *found] if host is None else [*other_suite, *found, host]


def _host_speed(baseline: Mapping[str, Any], candidate: Mapping[str, Any]) -> str | None:
    """A sentence where the two runs' hosts took HOST_SPEED_NOTE times as long or longer
    than each other to dispatch a torch op (run.json's `ceilings.host_op_us`; runs from
    before it was measured, and merged runs, have none)."""
    base = (baseline.get("ceilings") or {}).get("host_op_us")
    cand = (candidate.get("ceilings") or {}).get("host_op_us")
    if not all(_positive_number(value) for value in (base, cand)):  # absent, or not a time
        return None
    if max(base, cand) / min(base, cand) < HOST_SPEED_NOTE:
        return None
    return (
        f"the runs' hosts differ in speed: {base:.2g} us a torch op (baseline) vs"
        f" {cand:.2g} (candidate), x{cand / base:.2f}; calls bound by their host (un-graphed,"
        " a few tokens) move with it, whatever the code"
    )


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _l2_flush(meta: Mapping[str, Any]) -> str | None:
    """How a CUDA run's timer flushed L2 before each repeat: its environment's `l2_flush`,
    or "zero" for a run made on a GPU machine before that was recorded (the timer zeroed
    its buffer, whose write-back added 6-8 us to small calls: `L2Flush`). None for runs
    on the CPU, which no flush precedes."""
    if cpu_runs(meta):
        return None
    env = meta.get("environment") or {}
    return env.get("l2_flush") or ("zero" if env.get("gpus") else None)


def _timed_warmup(meta: Mapping[str, Any]) -> str | None:
    """How long a CUDA run's timer warmed each case up before its samples (run.json's
    `timing.warmup_ms`): "none" for a run made on a GPU machine before that was recorded,
    whose compute-bound cases were timed partly before the card's clock settled under its
    power cap (`measure.timing`). None for runs on the CPU, where it does not apply."""
    if cpu_runs(meta):
        return None
    warmup_ms = (meta.get("timing") or {}).get("warmup_ms")
    if warmup_ms is None:  # not recorded: a GPU run from before, or no device known
        return "none" if (meta.get("environment") or {}).get("gpus") else None
    return f"{warmup_ms:g} ms" if warmup_ms else "none"


def _gpus(env: Mapping[str, Any]) -> str | None:
    names = [str(g.get("name")) for g in env.get("gpus") or []]
    return ", ".join(names) or None
