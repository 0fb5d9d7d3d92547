"""The `moebench compare` markdown says what the numbers say: one list of changes, values
of the same kind as the ratio beside it, the normalizer's cases named as such, failed
cases with their reason in the row and counted in the implementation's verdict, and the
commits and environments of both sides at the top."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moebench.compare import METRICS, Settings, Threshold, compare_runs, load_run
from moebench.compare.render import markdown
from moebench.store import ResultStore
from tests.test_compare import IMPLS, SHAPES, make_case, make_row, synthetic_rows

LATENCY = METRICS["latency_ms"]


def write(root: Path, run_id: str, rows: list[dict], meta: dict) -> Path:
    store = ResultStore.create(root, run_id)
    store.write_meta({"run_id": run_id, "suite": "synthetic", "device": "cpu", **meta})
    for row in rows:
        store.write_row({**row, "run_id": run_id})
    return store.consolidate()


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    """grouped 2x faster in the candidate but failing on one case; capacity 1.5x slower."""
    rng = np.random.default_rng(7)
    base_meta = {"git_sha": "aaaa111", "torch": "2.11.0", "gpus": [{"name": "NVIDIA H200"}]}
    cand_meta = {"git_sha": "bbbb222", "torch": "2.11.0", "gpus": [{"name": "NVIDIA H200"}]}
    base = write(tmp_path, "base", synthetic_rows(rng, "base"), base_meta)
    factors = {"grouped": 0.5, "capacity": 1.5}
    rows = synthetic_rows(rng, "cand", lambda impl: factors.get(impl, 1.0))
    failing = make_case("grouped", *SHAPES[0])
    rows = [r for r in rows if r["case_id"] != failing.case_id]
    rows.append(make_row(failing, None, "cand", status="error", error="CUDA error: boom [x]"))
    return base, write(tmp_path, "cand", rows, cand_meta)


def test_normalized_rows_show_normalized_values_and_name_the_normalizer(runs):
    base, cand = runs
    settings = Settings(LATENCY, Threshold(0.05), normalize="reference")
    report = compare_runs(load_run(base), load_run(cand), settings)
    for result in report.results:
        if result.verdict in ("regressed", "improved", "unchanged"):
            # the values shown are the ones the ratio divides
            assert result.ratio == pytest.approx(result.candidate_value / result.baseline_value)
            assert result.baseline_raw != pytest.approx(result.baseline_value)
    normalizer = [r for r in report.results if r.fields["impl"] == "reference"]
    assert {r.verdict for r in normalizer} == {"normalizer"}
    text = markdown(report)
    assert "baseline ÷ reference" in text
    assert "📏 normalizer" in text
    assert " ms | " not in text.split("<details>")[0].split("### Changed")[1]


def test_one_list_of_changes_with_failure_reasons_in_the_row(runs):
    base, cand = runs
    report = compare_runs(load_run(base), load_run(cand), Settings(LATENCY, Threshold(0.05)))
    text = markdown(report)
    changed = text.split("### Changed or failed")[1].split("<details>")[0]
    regressed = [r for r in report.results if r.verdict == "regressed"]
    assert regressed
    for result in regressed:
        assert changed.count(result.label) == 1  # listed once, not in a table and a list
    assert "\n- " not in changed
    failed_row = next(line for line in changed.splitlines() if "❌ failed" in line)
    assert "CUDA error: boom [x]" in failed_row


def test_an_implementation_with_a_failed_case_is_never_improved(runs):
    base, cand = runs
    settings = Settings(LATENCY, Threshold(0.05), gate="impl")
    report = compare_runs(load_run(base), load_run(cand), settings)
    summaries = {s.name: s for s in report.impl_summaries}
    assert summaries["grouped"].ratio < 0.6  # 2x faster on the cases that ran ...
    assert summaries["grouped"].verdict == "failed"  # ... but one case failed
    assert summaries["grouped"].failed_cases == 1
    assert summaries["capacity"].verdict == "regressed"
    assert summaries["dense"].verdict == "unchanged"
    assert "| ❌ failed | grouped | 2 | 1 |" in markdown(report)


def test_commits_and_environments_at_the_top(runs):
    base, cand = runs
    text = markdown(
        compare_runs(load_run(base), load_run(cand), Settings(LATENCY, Threshold(0.05)))
    )
    top = text.split("### ")[0]
    assert "| moebench commit | aaaa111 | bbbb222 |" in top
    assert "| torch | 2.11.0 | 2.11.0 |" in top
    assert "| device | NVIDIA H200 | NVIDIA H200 |" in top
    assert len(IMPLS) == 4


def test_the_run_shift_is_the_median_implementation_not_the_median_case():
    """One implementation 5x slower beside grouped (and the normalizer) is not absorbed
    into the run's shift; a normalizer that moved alone is."""
    from moebench.compare.drift import measure_drift

    slowed = measure_drift(
        {"grouped": [1.0, 1.02, 0.98, 1.01], "plugin": [5.0, 5.1, 4.9, 5.05]},
        divide_shift=True,
        normalizer="reference",
    )
    assert slowed.shift == pytest.approx(1.0, rel=0.03)
    moved_normalizer = measure_drift(
        {"grouped": [2.4, 2.5, 2.45, 2.5], "plugin": [2.5, 2.4, 2.47, 2.46]},
        divide_shift=True,
        normalizer="reference",
    )
    assert moved_normalizer.shift == pytest.approx(2.46, rel=0.03)
    three = measure_drift({"a": [1.0] * 4, "b": [1.05] * 4, "c": [6.0] * 4}, divide_shift=True)
    assert three.shift == pytest.approx(1.05, rel=0.01)
