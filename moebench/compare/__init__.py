"""Baseline vs candidate, case by case, with noise-aware verdicts (`moebench compare`).

    moebench compare BASELINE CANDIDATE                  # latency, 5% threshold
    moebench compare BASELINE CANDIDATE --normalize reference --gate impl --threshold 40%
    moebench compare RUN --impls reference,grouped       # grouped's speedup over reference
    moebench compare A B --metric peak_mem_bytes --markdown summary.md --json out.json

BASELINE and CANDIDATE are run ids (under --root), run folders, parquet files or 'latest'.
Cases are matched on `case_id` (a hash of every case field). Per case:

- ratio = candidate / baseline of the metric's median (latency_ms by default);
- a confidence interval of that ratio from the kept samples (`samples_ms`): a seeded
  percentile bootstrap of the ratio of medians (2000 resamples, 95%; see `bootstrap`).
  Metrics measured once (peak_mem_bytes, ...) have no CI; tokens_per_s gets its samples
  from samples_ms (tokens / each repeat's latency);
- a verdict (see `verdict`): regressed when the ratio is beyond the threshold AND its CI
  excludes x1 (both large and significant), improved symmetrically, else unchanged;
  failed when a side's status is not ok; new / missing when a case is on one side only;
  skipped when it cannot be judged (no value, no normalizer case, or it is the
  normalizer). Higher-is-better metrics (tokens_per_s, achieved_tflops, ...) are mirrored.

`--normalize IMPL` divides each case's metric and samples by IMPL's on the same case of the
same run (fields equal except impl), so a uniformly slower machine flags nothing, while
one implementation slowed down still does. The CI then resamples all four sample sets.

`--gate impl` gates on each implementation's geometric mean ratio over its cases (CI by a
bootstrap over the cases) instead of on single cases: on noisy CPU runners single cases
move by tens of percent between runs, their mean over cases far less (see `aggregate`).
Per-implementation summaries are always reported.

Exit status: 0 nothing fails the gate; 1 a regression, or a case ok in the baseline that
is not ok in the candidate; 2 bad input (missing run, no common cases, unknown metric,
unknown --normalize implementation, unreadable parquet, bad threshold).

The same from Python:

    >>> from moebench.compare import Settings, Threshold, compare_runs, load_run
    >>> from moebench.compare.verdict import METRICS
    >>> settings = Settings(METRICS["latency_ms"], Threshold.parse("5%"))
    >>> report = compare_runs(load_run(a), load_run(b), settings)  # doctest: +SKIP
    >>> report.passed, report.summary()  # doctest: +SKIP
"""

from moebench.compare.command import COMMAND, HELP, add_arguments, build_report, main
from moebench.compare.pairing import compare_impls, compare_runs
from moebench.compare.report import CaseResult, Report, Settings
from moebench.compare.runs import CompareError, Run, load_run, run_from_frame
from moebench.compare.verdict import METRICS, Change, Decision, Threshold, ThresholdError, decide

__all__ = [
    "COMMAND",
    "HELP",
    "METRICS",
    "CaseResult",
    "Change",
    "CompareError",
    "Decision",
    "Report",
    "Run",
    "Settings",
    "Threshold",
    "ThresholdError",
    "add_arguments",
    "build_report",
    "compare_impls",
    "compare_runs",
    "decide",
    "load_run",
    "main",
    "run_from_frame",
]
