"""`moebench compare`'s note on cases that moved on the host's side
(`moebench/compare/host_side.py`): an un-graphed case that moved while its CUDA-graphed
twin held is named; one whose twin moved too, or that has no twin, is not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moebench.compare import Settings, Threshold, compare_runs, load_run
from moebench.compare.host_side import host_side_moves
from tests.test_compare import LATENCY, make_case, make_row, run_cli, write_run_meta


def _rows(rng: np.random.Generator, run_id: str, center_ms: dict[tuple[str, int, bool], float]):
    """One row a (impl, batch, graphed) of `center_ms`, 20 samples 1% around its value."""
    rows = []
    for (impl, batch, graphed), ms in center_ms.items():
        case = make_case(impl, batch=batch, device="cuda", cuda_graph=graphed)
        rows.append(make_row(case, (ms * rng.lognormal(0.0, 0.01, size=20)).tolist(), run_id))
    return rows


# grouped at batch 1: the un-graphed call halves, its graphed twin holds (the host moved);
# grouped at batch 8: both halve (the GPU's work moved); dense at batch 1: no twin;
# capacity at batch 1: nothing moves (20 cases hold steady for the drift's measure)
BASELINE = {
    ("grouped", 1, False): 0.40, ("grouped", 1, True): 0.10,
    ("grouped", 8, False): 0.80, ("grouped", 8, True): 0.60,
    ("dense", 1, False): 0.50,
    **{("capacity", b, g): 0.3 + 0.01 * b for b in range(1, 11) for g in (False, True)},
}  # fmt: skip
CANDIDATE = {
    **BASELINE,
    ("grouped", 1, False): 0.20,
    ("grouped", 8, False): 0.40, ("grouped", 8, True): 0.30,
    ("dense", 1, False): 0.25,
}  # fmt: skip


@pytest.fixture
def runs(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    """Two CUDA runs (no shift divided out, as for CPU runs)."""
    return tuple(
        write_run_meta(tmp_path, name, _rows(rng, name, centers), device="cuda")
        for name, centers in (("base", BASELINE), ("cand", CANDIDATE))
    )


def test_only_a_case_whose_graphed_twin_held_is_named(runs: tuple[Path, Path]) -> None:
    report = compare_runs(*(load_run(run) for run in runs), Settings(LATENCY, Threshold(0.05)))
    moved = {r.label: r.verdict for r in report.results if r.verdict == "improved"}
    assert len(moved) == 4, moved  # grouped 1 and 8, its graphed 8, dense 1
    pairs = host_side_moves(report.results)
    assert [(case.fields["impl"], case.fields["batch"]) for case, _ in pairs] == [("grouped", 1)]
    case, twin = pairs[0]
    assert twin.fields["cuda_graph"] is True and twin.verdict == "unchanged"
    assert case.ratio == pytest.approx(0.5, rel=0.05)
    notes = [note for note in report.notes if "un-graphed" in note]
    assert len(notes) == 1
    assert notes[0].startswith("1 un-graphed case moved while its twin under a CUDA graph held")
    assert f"{case.label} x{case.ratio:.3g} (graphed x{twin.ratio:.3g})" in notes[0]
    assert twin.ratio == pytest.approx(1.0, rel=0.05)


def test_the_note_is_printed_and_absent_without_such_a_case(
    runs: tuple[Path, Path],
    tmp_path: Path,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, cand = runs
    assert run_cli(str(base), str(cand), "--quiet") == 0  # improvements pass the gate
    assert "what moved is the host's share of the call" in capsys.readouterr().out
    again = write_run_meta(tmp_path, "again", _rows(rng, "again", BASELINE), device="cuda")
    assert run_cli(str(base), str(again), "--quiet") == 0
    assert "un-graphed" not in capsys.readouterr().out
