"""The card's ceilings: the floor's matrix rate is the one the card sustains, with the
first products' burst rate kept beside it (measure.ceilings)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from moebench.measure import ceilings
from moebench.report.data import ceilings_parts


def test_the_floor_rate_is_what_the_card_keeps_not_its_first_burst():
    # A card that runs its first products at 1.0 ms and settles at 1.25 ms (power cap).
    samples_ms = [1.0] * ceilings.BURST_CALLS + [1.25] * 300
    sustained, burst = ceilings.sustained_and_burst(1.0, samples_ms)
    assert sustained == pytest.approx(800.0)
    assert burst == pytest.approx(1000.0)
    # One slow outlier among the later calls does not move the sustained rate.
    sustained, _ = ceilings.sustained_and_burst(1.0, [*samples_ms[:-1], 9.0])
    assert sustained == pytest.approx(800.0)


def test_cpu_ceilings_name_both_rates_per_dtype():
    found = ceilings.measure_ceilings("cpu", ["float32"])
    assert set(found) == {
        "copy_gbps", "matmul_tflops_float32", "matmul_burst_tflops_float32", "host_op_us"
    }  # fmt: skip
    assert all(value > 0 for value in found.values())


def test_the_host_speed_is_a_dispatch_time_that_grows_with_host_work(monkeypatch):
    """host_op_us is microseconds an op, and a host that spends 20 us more on each
    round of three ops reads about 6.7 us slower: at least half that, and less than the
    20 us a round would read (a loaded host stretches the 20 us busy wait: 14.7 us more
    beside seven pytest workers compiling kernels, version 35)."""
    quick = ceilings.host_op_us()
    assert 0 < quick < 1000
    empty = torch.empty

    def slower_empty(*args, **kwargs):
        started = time.perf_counter()
        while time.perf_counter() - started < 20e-6:
            pass
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", slower_empty)
    slow = ceilings.host_op_us()
    assert 20 / 3 * 0.5 <= slow - quick < 20


def test_ceilings_text_gives_the_sustained_rate_and_the_burst():
    both = {"copy_gbps": 4242.0, "matmul_tflops_bfloat16": 686.1,
            "matmul_burst_tflops_bfloat16": 818.6}  # fmt: skip
    assert ceilings_parts(both) == [
        "bfloat16 686.1 TFLOP/s sustained (818.6 burst)",
        "copy 4242 GB/s",
    ]
    assert ceilings_parts({**both, "host_op_us": 0.912})[-1] == "host 0.91 us a torch op"
    assert ceilings_parts({**both, "host_op_us": "fast"}) == ceilings_parts(both)
    # A run from before the sustained rate: its one figure, unlabelled.
    assert ceilings_parts({"matmul_tflops_bfloat16": 790.0}) == ["bfloat16 790 TFLOP/s"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matrix_rate_is_read_after_a_second_of_products():
    started = time.perf_counter()
    found = ceilings.measure_ceilings("cuda", ["bfloat16"])
    assert time.perf_counter() - started >= ceilings.SUSTAINED_MS / 1e3
    sustained, burst = found["matmul_tflops_bfloat16"], found["matmul_burst_tflops_bfloat16"]
    assert 0 < sustained <= burst * 1.02


@pytest.mark.parametrize(
    ("run", "roofs"),
    [
        ("h200-triton-v11", {"roof bfloat16": 670.1, "burst roof bfloat16": 802.4}),
        ("h200-triton-v10", {"roof bfloat16": 799.0}),  # measured before: its burst alone
    ],
)
def test_the_roofline_draws_the_sustained_roof_and_the_burst_above_it(run, roofs):
    """The committed GPU runs' roofline figures: the sustained matrix rate as the roof
    and, where the run measured it, the burst rate above it."""
    pytest.importorskip("plotly")
    from moebench.report.data import load_runs
    from moebench.report.figures_cost import roofline

    data = load_runs([str(Path(__file__).parent.parent / "results" / "reference" / run)])
    figure = roofline(data).figures[0][1]
    drawn = {trace.name: max(trace.y) for trace in figure.data if "roof" in trace.name}
    assert drawn == pytest.approx(roofs, abs=0.05)


def test_show_prints_the_runs_ceilings(capsys):
    """`moebench show` of the committed v11 GPU run names both matrix rates and the copy
    bandwidth under its header."""
    from moebench.cli import main as cli_main

    run = Path(__file__).parent.parent / "results" / "reference" / "h200-triton-v11"
    assert cli_main(["show", str(run / "results.parquet")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console may wrap the line
    assert "ceilings bfloat16 670.1 TFLOP/s sustained (802.4 burst), copy 4260 GB/s" in out
