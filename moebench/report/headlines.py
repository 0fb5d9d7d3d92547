"""The sentences of "At a glance", one function per statement.

Each function reads the prepared table (`ReportData`) and returns a `Statement`: the
numbers it states, by name, and the plain-text sentence built from them, so a test can
recompute each number from the parquet and compare. The page only escapes and styles.

A variant's two errors are kept apart everywhere: `fidelity_err` is how far it is from
the base MoE layer (what a reader wants to know before choosing it), `rel_err` how far it
is from the reference of its own design (the correctness check of its implementation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moebench.report.data import ReportData, Standing, leaderboard


@dataclass(frozen=True)
class Statement:
    """One headline: a style ("win", "bad" or ""), the sentence and the numbers in it."""

    kind: str
    text: str
    values: dict[str, Any] = field(default_factory=dict)
    impl: str | None = None  # the implementation the sentence is about, if one


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def nothing_ok(data: ReportData) -> Statement | None:
    """When no case finished ok: say so (and nothing else is stated)."""
    if not data.ok.empty:
        return None
    total = len(data.frame)
    return Statement(
        "bad",
        f"No case finished ok ({total} cases): every figure is left out. "
        "The errors are listed below.",
        {"cases": total},
    )


def fastest_exact(standings: list[Standing]) -> Statement | None:
    """The exact implementation that was fastest beyond the noise on the most cases where
    two or more exact implementations ran the same case (`data.clear_winner`); when none
    was, that is said instead of a winner."""
    exact = [s for s in standings if s.exact and s.contests]
    if not exact:
        return None
    best = exact[0]
    ties = max(s.ties for s in exact)
    too_close = f" ({ties} too close to call: inside the noise)" if ties else ""
    if not best.wins:
        return Statement(
            "",
            f"No exact implementation is faster than the others beyond the noise{too_close}.",
            {"wins": 0, "ties": ties},
        )
    return Statement(
        "win",
        f"Fastest exact implementation: {best.impl}, faster beyond the noise on {best.wins} "
        f"of {best.contests} cases where exact implementations met{too_close}.",
        {"wins": best.wins, "contests": best.contests, "ties": ties},
        impl=best.impl,
    )


def noisy_cases(data: ReportData) -> Statement | None:
    """How many timed cases are noisy (moebench.measure.stats): never counted as wins."""
    if "noisy" not in data.ok:
        return None
    noisy = int(data.ok["noisy"].fillna(False).astype(bool).sum())
    if not noisy:
        return None
    return Statement(
        "bad",
        f"{noisy} of {len(data.ok)} timed cases are noisy (p90/p10 over the device's limit, "
        "or the median still moving): marked ~ in the cases table, never counted as a win.",
        {"noisy": noisy, "cases": len(data.ok)},
    )


def variant_summaries(data: ReportData, standings: list[Standing]) -> list[Statement]:
    """Per variant, fastest first: its speed against the base layer (geometric mean over
    the cases both ran), its median fidelity error (vs the base layer) and, where its
    design has a reference, its median own-design error."""
    base = " / ".join(sorted({b for b in data.base_impls.values() if b})) or "the base layer"
    variants = [s for s in standings if not s.exact and s.geomean_speedup]
    statements = []
    for s in sorted(variants, key=lambda v: -(v.geomean_speedup or 0.0)):
        text = (
            f"Variant {s.impl}: {s.geomean_speedup:.3g}x the speed of {base} (geometric "
            f"mean), median fidelity error vs {base} {_fmt(s.median_fidelity_err, '.2g')}"
        )
        if s.median_rel_err is not None:
            text += f"; median error vs its own design's reference {s.median_rel_err:.2g}"
        statements.append(
            Statement(
                "",
                text + ".",
                {
                    "geomean_speedup": s.geomean_speedup,
                    "median_fidelity_err": s.median_fidelity_err,
                    "median_rel_err": s.median_rel_err,
                },
                impl=s.impl,
            )
        )
    return statements


# Families whose experts per token follow the router's confidence.
DYNAMIC_K_FAMILIES = ("dynamic-k", "dense-train-sparse-infer")
# A router entropy above this share of ln(E) is close to uniform (random router weights).
NEAR_UNIFORM_ENTROPY = 0.9


def near_uniform_dynamic_k(data: ReportData) -> list[Statement]:
    """Per dynamic-k design (top-p, DS-MoE) whose cases ran on a near-uniform router (mean
    entropy over NEAR_UNIFORM_ENTROPY x ln E): its experts per token then say what random
    router weights do, not what a trained, sharper router would; `router_scale` sharpens
    the router."""
    ok = data.ok
    if "router_entropy" not in ok.columns or "family" not in ok.columns:
        return []
    rows = ok[ok["family"].isin(DYNAMIC_K_FAMILIES) & ok["router_entropy"].notna()]
    statements = []
    for impl, group in rows.groupby("impl", sort=True):
        share = (group["router_entropy"] / np.log(group["num_experts"].astype(float))).median()
        if share >= NEAR_UNIFORM_ENTROPY:
            statements.append(
                Statement(
                    "bad",
                    f"{impl} ran on a near-uniform router (median entropy {share:.0%} of "
                    "ln E): its experts per token reflect random router weights, not a "
                    "trained router; sweep router_scale to see a sharper one.",
                    {"entropy_share": float(share)},
                    impl=str(impl),
                )
            )
    return statements


def failed_cases(data: ReportData) -> Statement | None:
    """How many cases did not finish ok."""
    failed = int((data.frame["status"] != "ok").sum())
    if not failed:
        return None
    total = len(data.frame)
    return Statement(
        "bad", f"{failed} of {total} cases did not finish ok.", {"failed": failed, "cases": total}
    )


def headlines(data: ReportData, standings: list[Standing] | None = None) -> list[Statement]:
    """Every statement of "At a glance", in reading order."""
    empty = nothing_ok(data)
    if empty is not None:
        return [empty]
    standings = leaderboard(data) if standings is None else standings
    found = [
        fastest_exact(standings),
        noisy_cases(data),
        *variant_summaries(data, standings),
        *near_uniform_dynamic_k(data),
        failed_cases(data),
    ]
    return [s for s in found if s is not None]
