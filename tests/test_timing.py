"""The timer's warm-up: a count of calls, then on CUDA a time (`TimingPlan.warmup_ms`).

The CUDA branch runs here on a CPU with `torch.cuda.synchronize` stubbed out: the calls
sleep, so the host's clock is the "device's" clock."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from moebench.measure import timing
from moebench.measure.timing import TimingPlan, in_turns, time_once, time_repeats, warm_up

CUDA = torch.device("cuda")


class SleepingCall:
    """fn(i) that sleeps `first_s` on its first call (compiling, tuning) and `each_s` on
    the others, and records every index it was called with."""

    def __init__(self, each_s: float, first_s: float | None = None):
        self.each_s, self.first_s = each_s, each_s if first_s is None else first_s
        self.indices: list[int] = []

    def __call__(self, i: int) -> None:
        time.sleep(self.first_s if not self.indices else self.each_s)
        self.indices.append(i)


@pytest.fixture
def no_sync(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    synced: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    return synced


def test_cuda_warm_up_runs_for_its_time_after_the_first_call(no_sync: list) -> None:
    """The first call's 200 ms (what compiling takes) do not count toward the 60 ms: the
    calls after it must fill them."""
    fn = SleepingCall(each_s=0.002, first_s=0.2)
    started = time.perf_counter()
    calls = warm_up(fn, CUDA, TimingPlan(warmup=2, warmup_ms=60))
    after_first_ms = (time.perf_counter() - started) * 1e3 - 200
    assert fn.indices == list(range(calls))
    assert after_first_ms >= 60
    assert 20 <= calls <= 40  # 60 ms of 2 ms calls (sleeps overshoot: fewer, never more)
    assert no_sync, "the warm-up reads the clock after synchronising the device"


def test_warm_up_time_is_cuda_only_and_zero_means_the_count(no_sync: list) -> None:
    for device, plan in (
        (torch.device("cpu"), TimingPlan(warmup=3, warmup_ms=1000)),
        (CUDA, TimingPlan(warmup=3, warmup_ms=0)),
    ):
        fn = SleepingCall(each_s=0.001)
        assert warm_up(fn, device, plan) == 3
        assert fn.indices == [0, 1, 2]


def test_warm_up_acts_on_the_agreed_time(no_sync: list) -> None:
    """Ranks act on the max over ranks of the time spent, so they make the same number of
    calls: a rank told that another took the whole time stops after its count."""
    fn = SleepingCall(each_s=0.001)
    assert warm_up(fn, CUDA, TimingPlan(warmup=2, warmup_ms=50), agree=lambda ms: ms + 50) == 2
    seen: list[float] = []
    fn = SleepingCall(each_s=0.001)
    calls = warm_up(
        fn, CUDA, TimingPlan(warmup=0, warmup_ms=30), agree=lambda ms: seen.append(ms) or ms
    )
    assert calls >= 2 and seen[-1] >= 30 and all(ms < 30 for ms in seen[:-1])


def test_timed_calls_follow_the_warm_up_on_cpu() -> None:
    fn = SleepingCall(each_s=0.0)
    samples = time_repeats(
        fn, torch.device("cpu"), TimingPlan(warmup=2, min_repeats=3, max_repeats=3, warmup_ms=500)
    )
    assert len(samples) == 3
    assert fn.indices == [0, 1, 0, 1, 2]  # warm-up calls, then the timed ones from index 0


REFERENCE = Path(__file__).parent.parent / "results" / "reference"
V12_TIMING = (
    "2 warm-up calls, then 500 ms of calls; 5-100 timed calls within 200 ms, L2 flushed before each"
)


def test_a_run_says_how_it_timed_its_cases(capsys: pytest.CaptureFixture[str]) -> None:
    """`moebench show`, the markdown export and the report header of the committed peers
    run give its timing; a run from before moebench recorded it gives none."""
    from moebench.cli import main as cli_main
    from moebench.markdown_table import to_markdown
    from moebench.store import read_metadata, read_run

    run = REFERENCE / "h200-peers-v12"
    assert cli_main(["show", str(run)]) == 0
    assert f"timing {V12_TIMING}" in " ".join(capsys.readouterr().out.split())
    markdown = to_markdown(read_run(str(run)), read_metadata(str(run)))
    assert f"; timing: {V12_TIMING}." in markdown
    old = REFERENCE / "h200-triton-v11"
    assert cli_main(["show", str(old)]) == 0
    assert "timing" not in capsys.readouterr().out
    assert "timing:" not in to_markdown(read_run(str(old)), read_metadata(str(old)))


def test_timing_on_a_cpu_names_neither_the_timed_warm_up_nor_the_flush() -> None:
    from moebench.report.data import timing_text

    timing = {"warmup": 1, "warmup_ms": 500.0, "budget_ms": 20.0, "min_repeats": 2,
              "max_repeats": 5, "flush_l2": True}  # fmt: skip
    assert timing_text({"device": "cpu", "timing": timing}) == (
        "1 warm-up call; 2-5 timed calls within 20 ms"
    )
    assert timing_text({"device": "cuda", "timing": timing}) == (
        "1 warm-up call, then 500 ms of calls; 2-5 timed calls within 20 ms, L2 flushed before each"
    )


def test_the_report_header_gives_the_timing(tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    from moebench.cli import main as cli_main

    out = tmp_path / "report.html"
    assert cli_main(["report", str(REFERENCE / "h200-triton-v12"), "-o", str(out)]) == 0
    html = out.read_text()
    assert ">timing<" in html
    assert "3 warm-up calls, then 500 ms of calls; 5-200 timed calls within 300 ms" in html


def test_in_turns_alternates_the_order_and_takes_each_sides_median():
    order: list[str] = []
    samples = {"a": iter([5.0, 1.0, 3.0, 100.0]), "b": iter([2.0, 2.0, 2.0, 2.0])}

    def side(name: str):
        def sample() -> float:
            order.append(name)
            return next(samples[name])

        return sample

    medians = in_turns({"a": side("a"), "b": side("b")}, rounds=4)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]  # reversed every other round
    assert medians == {"a": 4.0, "b": 2.0}


def test_time_once_times_one_call_on_the_host():
    calls = []
    ms = time_once(lambda: (calls.append(1), time.sleep(0.01)), torch.device("cpu"))
    assert calls == [1]
    assert 9.0 <= ms < 1000.0


def test_back_to_back_calls_last_the_whole_duration_when_the_first_ones_are_slow(monkeypatch):
    """A card whose first calls run slower than its later ones (a clock still ramping)
    still gets `duration_ms` of calls: the batches are sized from the latest pace."""
    calls = []

    def fake_cuda_batch(fn, start, n, device, flush):
        indices = range(start, start + n)
        calls.extend(indices)
        return [2.0 if i < 30 else 1.0 for i in indices]  # 2 ms, then 1 ms a call

    monkeypatch.setattr(timing, "_cuda_batch", fake_cuda_batch)
    samples = timing.time_back_to_back(lambda i: None, torch.device("cuda"), 1000.0, 30)
    assert sum(samples) >= 1000.0
    assert sum(samples) < 1000.0 + 30 * 2.0  # no more than one batch past it
    assert calls == list(range(len(samples)))  # each call's index once, in order
    assert len(samples) >= 60
