"""Compiling a tuning's candidates at once (`tuning._precompile`, `fast_launch.compile_only`),
on a CPU: a launch in a compile-only pass compiles (Triton's `warmup`) and runs nothing,
the tuner's CUDA loop compiles first and times after, a failure in the pass is left to
the timed loop, a library's GEMM is not run in it, a `run` that tunes is refused, and the
tuning log holds how long each part took. Whether it pays is measured on a card
(`MOEBENCH_TRITON_PARALLEL_COMPILE`, tuning.py)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton", reason="the compile-only pass drives Triton's JIT")

import triton.language as tl
from triton.runtime.jit import JITFunction

from moebench import fast_launch
from moebench.env import usable_cpus
from moebench.impls.triton import tuning


def _fill(out_ptr, n, value, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, value, mask=offs < n)


@pytest.fixture
def kernel(monkeypatch):
    """A JIT function (made directly: under the interpreter `triton.jit` makes another
    kind) whose `warmup` records what it was asked to compile instead of compiling."""
    jit = JITFunction(_fill)
    compiled: list[tuple] = []
    monkeypatch.setattr(
        jit, "warmup", lambda *args, grid, **kwargs: compiled.append((args, grid, kwargs))
    )
    jit.compiled = compiled
    return jit


def test_a_launch_in_a_compile_only_pass_compiles_and_runs_nothing(kernel):
    out = torch.zeros(4)
    assert not fast_launch.compiling_only()
    with fast_launch.compile_only():
        assert fast_launch.compiling_only()
        fast_launch.launch(kernel, (2,), out, 4, 1.5, BLOCK=4, num_warps=1)
        fast_launch.launch(_fill, (1,), out, 4, 1.5, BLOCK=4)  # not a JIT function: nothing
    assert not fast_launch.compiling_only()
    assert kernel.compiled == [((out, 4, 1.5), (2,), {"BLOCK": 4, "num_warps": 1})]
    assert (out == 0).all()
    assert id(kernel) not in fast_launch._launchers  # nothing kept for the fast path


def test_compile_workers_reads_the_switch(monkeypatch):
    for value, workers in (("0", 1), ("1", 1), ("6", 6), ("x", 1), ("-3", 1)):
        monkeypatch.setenv(tuning.PARALLEL_COMPILE_SWITCH, value)
        assert tuning.compile_workers() == workers, value
    for value in ("auto", ""):
        monkeypatch.setenv(tuning.PARALLEL_COMPILE_SWITCH, value)
        assert tuning.compile_workers() == len(usable_cpus())
    monkeypatch.delenv(tuning.PARALLEL_COMPILE_SWITCH)
    assert tuning.compile_workers() == len(usable_cpus())  # the default: measured faster


def _cuda_tuner(monkeypatch, tmp_path, timed: list) -> tuning.Tuner:
    """A Tuner that takes a CPU for a card: no cache file name from the device, and
    triton's do_bench calling the candidate once and reading its time from it; one pass,
    no run-off (these tests count the compiles and timings of that pass)."""
    import triton.testing

    monkeypatch.setenv(tuning.TRITON_RUNOFF_SWITCH, "0")
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MOEBENCH_TRITON_TUNE_LOG", str(tmp_path / "log.jsonl"))
    monkeypatch.setattr(tuning, "device_file_name", lambda device: "card.json")

    def do_bench(fn, warmup, rep):
        timed.append(fn())
        return timed[-1]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return tuning.Tuner()


def test_the_tuner_compiles_every_candidate_first_then_times_each(monkeypatch, tmp_path, kernel):
    """With 4 workers: each Triton candidate compiled once in the pass (the grouped
    GEMM's not run there), then each timed; a candidate failing in the pass is timed
    (and fails) as before, and the log says so with the pass's and the tuning's time."""
    monkeypatch.setenv(tuning.PARALLEL_COMPILE_SWITCH, "4")
    events: list[str] = []
    timed: list[float] = []
    configs = [{"BLOCK": 4}, {"BLOCK": 8}, {"BLOCK": 16}, {"kernel": "grouped_mm"}]
    out = torch.zeros(16)

    def run(config: dict) -> float:
        phase = "compile" if fast_launch.compiling_only() else "time"
        events.append(f"{phase} {config}")
        if config.get("BLOCK") == 8:
            raise RuntimeError("out of shared memory")
        if "BLOCK" in config:
            fast_launch.launch(kernel, (1,), out, 16, 1.0, BLOCK=config["BLOCK"])
        return 1.0 / (1 + len(events))  # later candidates are faster

    tuner = _cuda_tuner(monkeypatch, tmp_path, timed)
    choice = tuner.choose(
        torch.device("cuda"), "k", lambda: configs, run, code=(_fill,), precompile=True
    )
    assert events == [
        "compile {'BLOCK': 4}",
        "compile {'BLOCK': 8}",
        "compile {'BLOCK': 16}",
        "time {'BLOCK': 4}",
        "time {'BLOCK': 8}",
        "time {'BLOCK': 16}",
        "time {'kernel': 'grouped_mm'}",
    ]
    assert choice == {"kernel": "grouped_mm"}
    # compiled in the pass only: the timed launches went through the kernel's JIT
    assert [args[2]["BLOCK"] for args in kernel.compiled] == [4, 16]
    (line,) = [json.loads(text) for text in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "out of shared memory" in line["trials"][1][1]
    assert 0 <= line["precompile_s"] <= line["tune_s"]


def test_no_pass_with_one_worker_nor_unless_asked(monkeypatch, tmp_path, kernel):
    events: list[bool] = []

    def run(config: dict) -> float:
        events.append(fast_launch.compiling_only())
        return 1.0

    for workers, precompile in (("1", True), ("4", False)):
        monkeypatch.setenv(tuning.PARALLEL_COMPILE_SWITCH, workers)
        (tmp_path / workers).mkdir()
        tuner = _cuda_tuner(monkeypatch, tmp_path / workers, [])
        tuner.choose(
            torch.device("cuda"), "k", lambda: [{"B": 1}, {"B": 2}], run, precompile=precompile
        )
        line = json.loads((tmp_path / workers / "log.jsonl").read_text())
        assert "precompile_s" not in line and line["tune_s"] >= 0
    assert events == [False] * 4


def test_a_run_that_tunes_is_refused_in_the_pass(monkeypatch, tmp_path):
    tuner = tuning.Tuner()
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    with fast_launch.compile_only(), pytest.raises(RuntimeError, match="compile-only pass"):
        tuner.choose(torch.device("cpu"), "k", lambda: [{"B": 1}], print)
