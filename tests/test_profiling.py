"""Where the time goes: the phase breakdown of every single-device implementation, the
--profile pass (traces, kernel table, columns) and the phase API a plugin uses."""

from __future__ import annotations

import gzip
import json
import math
import time

import pandas as pd
import pytest
import torch
from torch import nn

from moebench import registry
from moebench.cli import EXIT_BAD_INPUT, main
from moebench.distributed.group import EP_FAMILY
from moebench.measure.case_run import WeightCache, measure_case
from moebench.measure.phases import (
    NULL_TIMER,
    PHASES,
    SINGLE_DEVICE_PHASES,
    PhaseTimer,
    RangeTimer,
    nvtx_available,
    phase_breakdown,
    use_timer,
)
from moebench.measure.profile import CALL_RANGE, ProfileOptions, summarize_trace
from moebench.measure.timing import L2Flush, TimingPlan
from moebench.runner import run_cases
from moebench.store import read_kernels, read_run
from tests.conftest import FAST_PLAN, tiny_case

# The built-in single-device implementations that run on a CPU (triton is CUDA only, and
# plugins are the plugins' business).
SINGLE_DEVICE_IMPLS = sorted(
    name
    for name, info in registry.available().items()
    if info.source == "builtin" and info.family != EP_FAMILY and "cpu" in info.devices
)
PHASE_COLUMNS = [f"{name}_ms" for name in SINGLE_DEVICE_PHASES]
# 20 timed calls, so the phase pass gets its full 20 (medians of 5 noisy calls need not add up)
PHASE_PLAN = TimingPlan(budget_ms=1000, warmup=1, min_repeats=20, max_repeats=20)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine spinning worker threads make the
    median of a few tiny calls meaningless."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the phase API


def test_phase_timer_sums_phases_and_refuses_bad_ones():
    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("expert"):
        time.sleep(0.01)
    with timer.phase("expert"):
        time.sleep(0.01)
    with timer.phase("router"):
        pass
    totals = timer.collect()
    assert set(totals) == set(PHASES)
    assert totals["expert"] >= 20 and 0 <= totals["router"] < 5 and totals["combine"] == 0
    assert timer.collect()["expert"] == 0  # collect starts over
    with pytest.raises(ValueError, match="unknown phase"), timer.phase("nap"):
        pass
    nested = "'permute' opened inside phase 'expert'"
    with pytest.raises(ValueError, match=nested), timer.phase("expert"), timer.phase("permute"):
        pass
    with timer.phase("router"):  # a failed phase leaves the timer usable
        pass
    with pytest.raises(ValueError, match="unknown phase"), RangeTimer().phase("nap"):
        pass


class OwnPhases(nn.Module):
    """A plugin's layer that is no MoELayer and marks its own phases."""

    timer = NULL_TIMER

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        with self.timer.phase("router"):
            time.sleep(0.002)
        with self.timer.phase("expert"):
            time.sleep(0.006)
        time.sleep(0.002)  # unmarked: other_ms
        return self.inner(x)


def test_a_module_of_its_own_marks_phases_and_gets_its_timer_back():
    layer = OwnPhases()
    x = torch.randn(2, 8)
    columns = phase_breakdown(layer, lambda i: layer(x), torch.device("cpu"), repeats=3)
    assert set(columns) == {*PHASE_COLUMNS, "other_ms", "phase_latency_ms"}
    # sleeps last at least as long as asked; a loaded host may make them longer
    assert columns["router_ms"] >= 2 and columns["expert_ms"] >= 6
    assert columns["permute_ms"] == 0 and columns["other_ms"] >= 1.5
    assert layer.timer is NULL_TIMER  # restored after the pass
    with pytest.raises(RuntimeError, match="boom"), use_timer(layer, RangeTimer()):
        assert layer.timer is not NULL_TIMER
        raise RuntimeError("boom")
    assert layer.timer is NULL_TIMER


def test_the_l2_flush_reads_and_runs_before_every_call():
    """The flush reads its buffer and leaves it as it was (a zeroing flush leaves dirty
    lines that the timed call writes back: `L2Flush`), and the breakdown flushes before
    each call, as the timed loop does."""
    flush = L2Flush(torch.device("cpu"))
    flush.buffer.fill_(7)
    flush()
    low, high = int(flush.buffer.min()), int(flush.buffer.max())
    assert (low, high) == (7, 7)

    events: list[str] = []
    layer = OwnPhases()
    x = torch.randn(2, 8)

    def step(i: int) -> torch.Tensor:
        events.append(f"call {i}")
        return layer(x)

    phase_breakdown(
        layer, step, torch.device("cpu"), repeats=2, flush=lambda: events.append("flush")
    )
    assert events == ["flush", "call 0", "flush", "call 1"]


# ------------------------------------------------------------------ every implementation


@pytest.mark.parametrize("impl", SINGLE_DEVICE_IMPLS)
def test_every_single_device_impl_reports_its_phases(impl, one_thread):
    # dsmoe's default rule (threshold 0) runs every expert densely: ask for its sparse path
    options = (("sparse", "topk"),) if impl == "dsmoe" else ()
    case = tiny_case(impl, shared_experts=1, batch=4, options=options)
    row = measure_case(case, PHASE_PLAN, WeightCache())
    assert row["status"] == "ok", row.get("error")
    for column in [*PHASE_COLUMNS, "other_ms", "phase_latency_ms"]:
        assert row[column] >= 0, column
    assert row["expert_ms"] > 0
    if impl != "dense":  # dense has no router, no permutation, its shared FFN is fused
        assert row["router_ms"] > 0 and row["shared_ms"] > 0
        assert row["permute_ms"] > 0 and row["unpermute_ms"] > 0
    accounted = sum(row[c] for c in PHASE_COLUMNS) + row["other_ms"]
    assert accounted == pytest.approx(row["phase_latency_ms"], rel=0.10)
    assert row["phase_repeats"] == row["repeats"] == 20
    assert "kernel_launches" not in row  # no profiler pass without --profile


def test_train_mode_marks_the_backward_call(one_thread):
    for impl in ("grouped", "reference"):
        row = measure_case(tiny_case(impl, mode="train", layers=2), PHASE_PLAN, WeightCache())
        assert row["status"] == "ok" and row["backward_ms"] > 0 and row["expert_ms"] > 0
        accounted = sum(row[c] for c in [*PHASE_COLUMNS, "backward_ms", "other_ms"])
        assert accounted == pytest.approx(row["phase_latency_ms"], rel=0.10)


# ------------------------------------------------------------------ --profile


def _run(tmp_path, cases, profile: ProfileOptions):
    return run_cases(
        cases,
        suite_name="prof",
        plan=FAST_PLAN,
        timeout_s=120,
        out_root=tmp_path,
        isolate=False,
        profile=profile,
    )


def test_profile_run_writes_traces_and_a_kernel_table(tmp_path, one_thread):
    cases = [tiny_case("grouped"), tiny_case("reference"), tiny_case("dense")]
    outcome = _run(tmp_path, cases, ProfileOptions(trace=True))
    frame = read_run(outcome.run_dir)
    assert (frame["status"] == "ok").all()
    assert not any(c.startswith("_profile") for c in frame.columns)
    for case_id, impl in zip(frame["case_id"], frame["impl"]):
        with gzip.open(outcome.run_dir / "traces" / f"{case_id}.json.gz", "rt") as stream:
            names = {e.get("name") for e in json.load(stream)["traceEvents"]}
        assert CALL_RANGE in names and "expert" in names
        if impl != "dense":
            assert {"router", "permute", "unpermute"} <= names
    kernels = read_kernels(outcome.run_dir)
    assert (outcome.run_dir / "kernels.parquet").is_file()
    joined = kernels.merge(frame[["case_id", "impl", "kernel_launches"]], on="case_id")
    assert len(joined) == len(kernels) and set(joined["impl"]) == {"grouped", "reference", "dense"}
    for _, part in joined.groupby("case_id"):
        assert part["share"].sum() == pytest.approx(1.0)
        assert part["calls_per_call"].sum() == pytest.approx(part["kernel_launches"].iloc[0])
        assert (part["kind"] == "cpu_op").all() and part["kernel"].str.startswith("aten::").all()
    assert "aten::matmul" in set(joined.loc[joined["impl"] == "dense", "kernel"])
    by_impl = frame.set_index("impl")
    # the per-expert loop launches more operators than the grouped layer
    assert by_impl.loc["reference", "kernel_launches"] > by_impl.loc["grouped", "kernel_launches"]
    assert ((frame["device_busy_frac"] > 0) & (frame["device_busy_frac"] <= 1.0)).all()
    assert frame["host_sync_count"].isna().all()  # CPU: nothing to synchronise with


def test_the_report_draws_phases_top_kernels_and_markers(tmp_path, one_thread):
    pytest.importorskip("plotly")
    from moebench.report.build import write_report
    from moebench.report.figures_profile import bound_marker

    assert bound_marker(0.2, 3.0) == "sync-bound"
    assert bound_marker(0.2, None) == bound_marker(0.2, 0.0) == "launch-bound"
    assert bound_marker(0.9, 3.0) == bound_marker(None, 3.0) == bound_marker(math.nan, 0) == ""
    cases = [tiny_case("grouped"), tiny_case("reference", shared_experts=1)]
    outcome = _run(tmp_path, cases, ProfileOptions(trace=True))
    # A host that is busy a tenth of the call: the case must be marked launch-bound.
    part = next((outcome.run_dir / "parts").glob("*.parquet"))
    row = pd.read_parquet(part)
    row["device_busy_frac"] = 0.1
    row.to_parquet(part)
    (outcome.run_dir / "results.parquet").unlink()
    result = write_report([outcome.run_dir], tmp_path / "report.html")
    page = result.path.read_text()
    figures = {f["id"]: f for f in result.manifest["figures"]}
    assert figures["fig-phases"]["traces"] >= 5  # router ... other, and the marker text
    assert not {o["section"] for o in result.manifest["omitted"]} & {"phases", "kernels"}
    assert "shared experts" in page and "launch-bound" in page
    assert 'id="kernels"' in page and "aten::" in page


def test_the_kernel_table_puts_each_case_against_its_floor(tmp_path):
    """A profiled GPU run (the fused layer's version 10, graphed at 64 tokens on
    Qwen3-30B-A3B): the report's kernel table gives the case's kernel time per call
    beside its latency and its floor, where its own kernels.parquet and row say."""
    pytest.importorskip("plotly")
    from pathlib import Path

    from moebench.report.build import write_report

    run = Path(__file__).parent.parent / "results" / "reference" / "h200-triton-v10"
    page = write_report([run], tmp_path / "report.html").path.read_text()
    rows, kernels = read_run(run / "results.parquet"), read_kernels(run)
    row = rows[(rows["preset"] == "qwen3-30b-a3b") & (rows["tokens"] == 64)].iloc[0]
    kernels_ms = kernels.loc[kernels["case_id"] == row["case_id"], "device_ms"].sum()
    floor_ms = row["latency_ms"] * row["roofline_frac"]
    assert 0.9 * row["latency_ms"] < kernels_ms < row["latency_ms"]  # graphed: busy
    assert (
        f"kernels {kernels_ms:.4g} of {row['latency_ms']:.4g} ms a call, floor {floor_ms:.4g}"
        in page
    )


def test_kernels_over_the_latency_are_said_to_be_so(tmp_path):
    """The fused layer's version 11 run: Mixtral-8x7B at 1024 tokens, graphed, whose
    profiled pass (after the timed calls) took longer than its median call."""
    pytest.importorskip("plotly")
    from pathlib import Path

    from moebench.report.build import write_report
    from moebench.report.figures_profile import PROFILED_SLOWER

    run = Path(__file__).parent.parent / "results" / "reference" / "h200-triton-v11"
    page = write_report([run], tmp_path / "report.html").path.read_text()
    rows, kernels = read_run(run / "results.parquet"), read_kernels(run)
    by_case = kernels.groupby("case_id")["device_ms"].sum()
    rows = rows.assign(kernels_ms=rows["case_id"].map(by_case)).dropna(subset=["kernels_ms"])
    slower = PROFILED_SLOWER * rows["latency_ms"]
    over = rows[rows["kernels_ms"] > slower]  # Mixtral 1024 and 8192, OLMoE 1024
    within = rows[(rows["kernels_ms"] > rows["latency_ms"]) & ~rows.index.isin(over.index)]
    assert len(over) == 3 and len(within) >= 1  # within 2%: noise, not said
    note = "(the profiled pass ran slower than the timed calls)"
    assert page.count(note) == len(over)
    row = over.iloc[0]
    assert f"kernels {row['kernels_ms']:.4g} of {row['latency_ms']:.4g} ms a call" in page


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("aten::mm", "aten::mm"),
        (
            "void at::native::vectorized_elementwise_kernel<8, at::native::BinaryFunctor<float, "
            "float, float, at::native::binary_internal::MulFunctor<float> >, std::array<char*, "
            "3ul> >(int, at::native::BinaryFunctor<float>, std::array<char*, 3ul>)",
            "at::native::vectorized_elementwise_kernel [MulFunctor]",
        ),
        (
            "void (anonymous namespace)::softmax_warp_forward<float, float, float, 3, false>"
            "(float*, float const*, int)",
            "(anonymous namespace)::softmax_warp_forward",
        ),
        (
            "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6"
            "kernel13GemmUniversalINS5_17GroupProblemShapeIN4cute5tupleIJiiiEEEEEEEEEvNT_6ParamsE",
            "cutlass::device_kernel<enable_3x_kernel_for_sm9x, GemmUniversal, "
            "GroupProblemShape...>",
        ),
    ],
)
def test_kernel_names_are_shortened_for_the_report(name, short):
    pytest.importorskip("plotly")
    from moebench.report.figures_profile import short_kernel_name

    assert short_kernel_name(name) == short
    assert len(short_kernel_name("k" * 500)) == 90


def test_a_run_without_profile_has_no_sidecar(tmp_path, one_thread):
    outcome = _run(tmp_path, [tiny_case("grouped")], ProfileOptions())
    assert read_kernels(outcome.run_dir) is None
    assert not (outcome.run_dir / "traces").exists()
    assert read_run(outcome.run_dir)["expert_ms"].iloc[0] > 0


def _x(name, cat, ts, dur, tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1}


def test_cuda_trace_counts_kernels_and_syncs_inside_calls_only():
    events = [
        _x(CALL_RANGE, "user_annotation", 0, 100),
        _x("cudaLaunchKernel", "cuda_runtime", 10, 2),
        _x("cudaStreamSynchronize", "cuda_runtime", 50, 20),  # .item() inside a call
        _x(CALL_RANGE, "user_annotation", 200, 100),
        _x(CALL_RANGE, "gpu_user_annotation", 20, 1, tid=7),  # the ranges' device twins
        _x(CALL_RANGE, "gpu_user_annotation", 220, 1, tid=7),
        _x("cudaStreamSynchronize", "cuda_runtime", 250, 20),
        _x("cudaDeviceSynchronize", "cuda_runtime", 400, 5),  # the harness's own: outside
        _x("gemm_kernel", "kernel", 20, 30, tid=7),
        _x("gemm_kernel", "kernel", 220, 30, tid=7),
        _x("scatter_kernel", "kernel", 60, 10, tid=7),
        _x("scatter_kernel", "kernel", 260, 10, tid=7),
        _x("Memcpy DtoH (Device -> Pageable)", "gpu_memcpy", 70, 2, tid=7),
        _x("Memcpy DtoH (Device -> Pageable)", "gpu_memcpy", 270, 2, tid=7),
    ]
    summary = summarize_trace({"traceEvents": events}, on_cuda=True, latency_ms=0.084)
    assert summary.columns["profile_calls"] == 2
    assert summary.columns["kernel_launches"] == 2  # per call; copies are not launches
    assert summary.columns["host_sync_count"] == 1
    assert summary.columns["device_busy_frac"] == pytest.approx(0.042 / 0.084)
    table = {k["kernel"]: k for k in summary.kernels}
    assert table["gemm_kernel"]["calls_per_call"] == 1 and table["gemm_kernel"]["kind"] == "kernel"
    assert table["gemm_kernel"]["device_ms"] == pytest.approx(0.030)
    assert table["gemm_kernel"]["share"] == pytest.approx(30 / 42)
    assert table["Memcpy DtoH (Device -> Pageable)"]["kind"] == "memcpy"
    assert summary.kernels[0]["kernel"] == "gemm_kernel"  # largest first


def test_kernels_side_by_side_count_once_in_the_busy_time():
    """Kernels on two streams (the shared expert beside the routed ones) and a kernel
    started under its predecessor's tail (dependent launch): device_busy_frac is the
    time some kernel runs, the kernel table each kernel's own time."""
    events = [
        _x(CALL_RANGE, "user_annotation", 0, 100),
        _x("gate_up_kernel", "kernel", 10, 40, tid=7),
        _x("down_kernel", "kernel", 45, 20, tid=7),  # starts 5 us under gate_up's tail
        _x("shared_gemm", "kernel", 20, 30, tid=8),  # another stream, inside gate_up
        _x("token_sum_kernel", "kernel", 70, 5, tid=7),
    ]
    summary = summarize_trace({"traceEvents": events}, on_cuda=True, latency_ms=0.1)
    assert summary.columns["device_busy_frac"] == pytest.approx((65 - 10 + 5) / 100)
    table = {k["kernel"]: k["device_ms"] for k in summary.kernels}
    assert sum(table.values()) == pytest.approx(0.095)  # 40 + 20 + 30 + 5 us


@pytest.mark.parametrize(
    ("device", "kernels_ms", "busy_frac", "side_by_side", "slower"),
    [
        ("cuda", 0.431, 0.95, True, False),  # two streams: the sum passes the latency
        ("cuda", 0.300, 0.300 / 0.285, False, True),  # one stream, the profiled pass slower
        ("cuda", 0.280, 0.280 / 0.285, False, False),
        ("cpu", 0.280, 0.5, False, False),  # the CPU's fraction is of its own calls' time
    ],
)
def test_the_floor_line_tells_side_by_side_kernels_from_a_slower_pass(
    device, kernels_ms, busy_frac, side_by_side, slower
):
    pytest.importorskip("plotly")  # the report's figures draw with it
    from moebench.report.figures_profile import _against_floor

    case = pd.Series(
        {"device": device, "latency_ms": 0.285, "roofline_frac": 0.9, "device_busy_frac": busy_frac}
    )
    line = _against_floor(kernels_ms, case)
    assert line.startswith(f"; kernels {kernels_ms:.4g} of 0.285 ms a call, floor 0.2565")
    assert ("side by side: 0.2707 ms with a kernel running" in line) is side_by_side
    assert ("the profiled pass ran slower" in line) is slower


def test_cpu_trace_counts_top_level_ops_of_the_calls():
    events = [
        _x(CALL_RANGE, "user_annotation", 0, 100),
        _x("expert", "user_annotation", 5, 60),
        _x("aten::matmul", "cpu_op", 10, 40),
        _x("aten::mm", "cpu_op", 12, 35),  # inside matmul: not top level
        _x("aten::index_add", "cpu_op", 60, 20),
        _x("aten::matmul", "cpu_op", 10, 40, tid=2),  # another thread, no call range
        _x("aten::empty", "cpu_op", 150, 1),  # outside the call
    ]
    summary = summarize_trace({"traceEvents": events}, on_cuda=False, latency_ms=99.0)
    assert summary.columns["kernel_launches"] == 2
    assert summary.columns["device_busy_frac"] == pytest.approx(60 / 100)
    assert summary.columns["host_sync_count"] is None
    assert [k["kernel"] for k in summary.kernels] == ["aten::matmul", "aten::index_add"]


def test_a_trace_without_calls_is_refused():
    with pytest.raises(ValueError, match="no 'moebench call' range"):
        summarize_trace({"traceEvents": [_x("aten::mm", "cpu_op", 0, 1)]}, False, 1.0)


@pytest.mark.skipif(nvtx_available(), reason="this torch has NVTX")
def test_nvtx_without_a_cuda_build_is_bad_input(tmp_path, capsys):
    code = main(["run", "suites/smoke.toml", "--nvtx", "--out", str(tmp_path), "--quiet"])
    assert code == EXIT_BAD_INPUT
    assert "--nvtx needs a CUDA build of torch" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile_sees_kernels_and_syncs(tmp_path):
    cases = [
        tiny_case(impl, device="cuda", hidden=256, ffn=512, batch=8)
        for impl in ("grouped", "offload")
    ]
    outcome = _run(tmp_path, cases, ProfileOptions(trace=True, nvtx=True))
    frame = read_run(outcome.run_dir).set_index("impl")
    assert (frame["status"] == "ok").all()
    assert (frame["kernel_launches"] > 0).all()
    assert ((frame["device_busy_frac"] > 0) & (frame["device_busy_frac"] < 2)).all()
    assert frame.loc["offload", "host_sync_count"] >= 1  # its counts .tolist()
    kernels = read_kernels(outcome.run_dir)
    assert "kernel" in set(kernels["kind"]) and not kernels["kernel"].str.startswith("aten::").any()
    assert isinstance(kernels, pd.DataFrame)


@pytest.mark.parametrize("bad", ["bogus:3", "olmoe-1b-7b", "olmoe-1b-7b:0", "olmoe-1b-7b:x"])
def test_ncu_layer_refuses_a_case_it_cannot_build(bad, monkeypatch, capsys):
    """scripts/ncu_layer.py (the layer profiled under Nsight Compute) names the bad
    PRESET:TOKENS and the presets, and exits 2, before it touches a device."""
    import runpy
    import sys
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "ncu_layer.py"))
    monkeypatch.setattr(sys, "argv", ["ncu_layer.py", "olmoe-1b-7b:64", bad])
    with pytest.raises(SystemExit) as exited:
        script["main"]()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert repr(bad) in err and "olmoe-1b-7b" in err and "PRESET:TOKENS" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_ncu_layer_without_cuda_says_so(monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "ncu_layer.py"))
    monkeypatch.setattr(sys, "argv", ["ncu_layer.py", "olmoe-1b-7b:64"])
    with pytest.raises(SystemExit) as exited:
        script["main"]()
    assert exited.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err
