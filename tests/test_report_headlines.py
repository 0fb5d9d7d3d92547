""" "At a glance" states what the parquet says: each headline number recomputed here, from
the parquet of a real small run, by code independent of the report's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moebench.case import Case, LayerShape, Workload
from moebench.measure.timing import TimingPlan
from moebench.report.data import load_runs, prepare
from moebench.report.headlines import headlines
from moebench.runner import run_cases
from moebench.store import read_run, resolve_run

PLAN = TimingPlan(budget_ms=20, warmup=1, min_repeats=3, max_repeats=5)
SAME_CASE = ["hidden", "ffn", "num_experts", "top_k", "tokens", "mode", "dtype", "routing"]


def _cases() -> list[Case]:
    cases = []
    for experts in (4, 8):
        for batch in (1, 4):
            shape = LayerShape(hidden=32, ffn=64, num_experts=experts, top_k=2)
            workload = Workload(batch=batch, seq_len=8)
            for impl in ("reference", "grouped", "capacity"):
                cases.append(Case(shape, workload, impl=impl))
            cases.append(Case(shape, workload, impl="topp", options=(("p", 0.6),)))
    # one case that fails: an option out of range is an error row
    bad = Case(
        LayerShape(hidden=32, ffn=64, num_experts=4, top_k=2),
        Workload(batch=1, seq_len=8),
        impl="topp",
        options=(("p", 7.0),),
    )
    return [*cases, bad]


@pytest.fixture(scope="module")
def run_parquet(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("results")
    outcome = run_cases(
        _cases(), suite_name="glance", plan=PLAN, timeout_s=60, out_root=root, isolate=False
    )
    return root / outcome.run_id, read_run(resolve_run(outcome.run_id, root))


def test_headlines_match_numbers_recomputed_from_the_parquet(run_parquet):
    path, frame = run_parquet
    statements = {
        s.impl or s.text.split(" ")[0]: s
        for s in headlines(load_runs([path]))
        if "near-uniform" not in s.text  # its own test below
    }
    ok = frame[frame["status"] == "ok"]

    # Fastest exact: count, per case, which exact impl had the smallest median latency,
    # when it is faster beyond the noise (no noisy row, its median's CI below the others').
    exact = ok[ok["exact"]]
    wins: dict[str, int] = {}
    ties = 0
    for _, case in exact.groupby(SAME_CASE):
        if case["impl"].nunique() < 2:
            continue
        best_row = case.loc[case["latency_ms"].idxmin()]
        others = case.drop(index=best_row.name)
        apart = (others["latency_ci_low_ms"] > best_row["latency_ci_high_ms"]).all()
        if case["noisy"].any() or not apart:
            ties += 1
        else:
            wins[best_row["impl"]] = wins.get(best_row["impl"], 0) + 1
    contests = exact.groupby(SAME_CASE)["impl"].nunique()
    if wins:
        fastest = next(s for s in statements.values() if s.kind == "win")
        assert wins[fastest.impl] == max(wins.values()) == fastest.values["wins"]
        assert fastest.values["contests"] == int((contests >= 2).sum())
    else:  # a busy machine: every case inside the noise, and no winner is named
        assert not any(s.kind == "win" for s in statements.values())
        assert any("beyond the noise" in s.text for s in statements.values())
    said = next(s for s in statements.values() if "beyond the noise" in s.text)
    assert said.values["ties"] == ties

    # Each variant: geometric mean of grouped's latency / its latency on the same cases,
    # median fidelity_err (vs the base layer) and median rel_err (vs its own design).
    grouped = ok[ok["impl"] == "grouped"].set_index(SAME_CASE)["latency_ms"]
    for impl in ("topp", "capacity"):
        rows = ok[ok["impl"] == impl]
        ratios = [
            grouped.loc[tuple(r[k] for k in SAME_CASE)] / r["latency_ms"]
            for _, r in rows.iterrows()
        ]
        statement = statements[impl]
        assert statement.values["geomean_speedup"] == pytest.approx(
            math.exp(np.mean(np.log(ratios)))
        )
        assert statement.values["median_fidelity_err"] == pytest.approx(
            rows["fidelity_err"].median()
        )
        assert f"{rows['fidelity_err'].median():.2g}" in statement.text
        own = rows["rel_err"].dropna()
        if len(own):
            assert statement.values["median_rel_err"] == pytest.approx(own.median())
            assert "own design" in statement.text
        else:
            assert statement.values["median_rel_err"] is None
    # topp is far from the base layer, exactly equal to its own design: a sentence that
    # gave its own-design error as "fidelity" would claim it is nearly exact.
    topp = statements["topp"].values
    assert topp["median_fidelity_err"] > 100 * max(topp["median_rel_err"], 1e-12)

    failed = next(s for s in statements.values() if s.kind == "bad" and "failed" in s.values)
    assert failed.values == {"failed": int((frame["status"] != "ok").sum()), "cases": len(frame)}
    assert failed.values["failed"] == 1


def test_no_case_ok_says_only_that():
    frame = pd.DataFrame(
        {"impl": ["grouped"], "status": ["error"], "latency_ms": [None], "case_id": ["x"]}
    )
    statements = headlines(prepare([frame], [{"run_id": "r"}]))
    assert [s.kind for s in statements] == ["bad"]
    assert statements[0].values == {"cases": 1}


def test_a_dynamic_k_design_on_a_near_uniform_router_is_flagged(run_parquet):
    """topp at the default router_scale (0.02) routes almost uniformly: the report says
    its experts per token are not what a trained router would give."""
    path, frame = run_parquet
    topp = frame[(frame["impl"] == "topp") & (frame["status"] == "ok")]
    share = float(np.median(topp["router_entropy"] / np.log(topp["num_experts"])))
    statements = [s for s in headlines(load_runs([path])) if "near-uniform" in s.text]
    assert share >= 0.9
    assert [s.impl for s in statements] == ["topp"]
    assert statements[0].values["entropy_share"] == pytest.approx(share)


def test_a_sharp_router_is_not_flagged():
    frame = pd.DataFrame(
        {
            "impl": ["topp"],
            "family": ["dynamic-k"],
            "status": ["ok"],
            "latency_ms": [1.0],
            "case_id": ["a"],
            "router_entropy": [0.5],
            "num_experts": [16],
        }
    )
    statements = headlines(prepare([frame], [{"run_id": "r"}]))
    assert not any("near-uniform" in s.text for s in statements)
