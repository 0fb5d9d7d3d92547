"""`moebench compare`'s warnings where two runs were not made on the same setup: torch,
GPU, CPU threads, the timer's L2 flush and timed warm-up, and whether moebench's own
kernels launched with programmatic dependent launch (CPU only; the runs are synthetic,
written as in tests/test_compare.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_compare import run_cli, synthetic_rows, write_run_meta


def _run(tmp_path: Path, rng: np.random.Generator, name: str, device: str, **meta) -> Path:
    """A synthetic run `name` on `device` whose run.json holds `meta`."""
    return write_run_meta(tmp_path, name, synthetic_rows(rng, name), device=device, **meta)


def test_compare_warns_when_the_setups_differ(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    env_a = {"torch": "2.11.0", "cpu": "AMD EPYC 9654", "gpus": [{"name": "NVIDIA H200"}]}
    env_b = {"torch": "2.13.0", "cpu": "AMD EPYC 9654", "gpus": [{"name": "NVIDIA H100"}]}
    base = _run(tmp_path, rng, "base", "cpu", environment=env_a, cpu_threads=1)
    cand = _run(tmp_path, rng, "cand", "cpu", environment=env_b, cpu_threads=2)
    summary = tmp_path / "summary.md"
    assert run_cli(str(base), str(cand), "--markdown", str(summary), "--quiet") == 0
    out = capsys.readouterr().out
    for what in ("torch: 2.11.0", "GPU: NVIDIA H200", "CPU threads: 1"):
        assert f"warning: the runs differ in {what}" in out
    assert "CPU model" not in out
    text = summary.read_text()
    assert text.count("⚠️ **warning:**") == 3


def test_compare_says_when_the_runs_are_of_different_suites(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs of two suites: the shared cases are compared, and the warning says so (it
    said only "N new, M missing")."""
    base = _run(tmp_path, rng, "base", "cpu", suite="smoke")
    cand = _run(tmp_path, rng, "cand", "cpu", suite="fused-moe")
    same = _run(tmp_path, rng, "same", "cpu", suite="smoke")
    assert run_cli(str(base), str(cand), "--quiet") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "warning: the runs are of different suites: smoke (baseline) vs fused-moe "
        "(candidate); only the cases both hold are compared"
    ) in out
    assert run_cli(str(base), str(same), "--quiet") == 0
    assert "different suites" not in capsys.readouterr().out


def test_compare_warns_when_the_l2_flush_differs(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CUDA run from before run.json held `l2_flush` zeroed its flush buffer: against a
    run that reads it, small cases differ by the write-back alone."""
    gpus = [{"name": "NVIDIA H200"}]
    old = _run(tmp_path, rng, "old", "cuda", environment={"gpus": gpus})
    new = {"gpus": gpus, "l2_flush": "read"}
    runs = [_run(tmp_path, rng, name, "cuda", environment=new) for name in ("new", "newer")]
    assert run_cli(str(old), str(runs[0]), "--quiet") == 0
    out = capsys.readouterr().out
    assert "warning: the runs differ in L2 flush: zero (baseline) vs read (candidate)" in out
    assert run_cli(str(runs[0]), str(runs[1]), "--quiet") == 0
    assert "L2 flush" not in capsys.readouterr().out


def test_compare_warns_when_the_timed_warm_up_differs(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CUDA run from before run.json held `timing` had no timed warm-up: its
    compute-bound cases were timed partly before the card's clock settled."""
    env = {"gpus": [{"name": "NVIDIA H200"}], "l2_flush": "read"}
    old = _run(tmp_path, rng, "old", "cuda", environment=env)
    timing = {"warmup": 3, "warmup_ms": 500.0}
    runs = [
        _run(tmp_path, rng, name, "cuda", environment=env, timing=timing)
        for name in ("new", "newer")
    ]
    assert run_cli(str(old), str(runs[0]), "--quiet") == 0
    out = capsys.readouterr().out
    assert "warning: the runs differ in timed warm-up: none (baseline) vs 500 ms" in out
    assert run_cli(str(runs[0]), str(runs[1]), "--quiet") == 0
    assert "warm-up" not in capsys.readouterr().out
    cpu = [
        _run(tmp_path, rng, f"cpu{i}", "cpu", timing={"warmup_ms": ms})
        for i, ms in enumerate((0.0, 500.0))
    ]
    assert run_cli(str(cpu[0]), str(cpu[1]), "--quiet") == 0
    assert "warm-up" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("key", "label"),
    [
        ("dependent_launch", "dependent launch (PDL)"),  # $MOEBENCH_PDL=0
        ("fast_launch", "fast launch of moebench's kernels"),  # $MOEBENCH_FAST_LAUNCH=0
        ("gluon_ws", "Gluon kernels in the triton tuner's race"),  # $MOEBENCH_GLUON_WS=0
        ("merge_tail", "merged-tail tiles in the triton tuner's race"),  # $MOEBENCH_MERGE_TAIL=0
        ("triton_runoff", "the triton tuner's run-off"),  # $MOEBENCH_TRITON_RUNOFF=0
        ("shared_stream", "the triton layer's shared experts on a side stream"),
    ],
)
def test_compare_warns_when_a_launch_switch_differs(
    key: str,
    label: str,
    tmp_path: Path,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each switch moves the small calls of moebench's Triton kernels; a run from before
    run.json recorded it is not compared on it."""
    gpus = [{"name": "NVIDIA H200"}]
    environments = {
        name: {"gpus": gpus, **({key: value} if value else {})}
        for name, value in (("on", "on"), ("off", "off"), ("old", None))
    }
    runs = {
        name: _run(tmp_path, rng, name, "cuda", environment=environment)
        for name, environment in environments.items()
    }
    assert run_cli(str(runs["off"]), str(runs["on"]), "--quiet") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"warning: the runs differ in {label}: off (baseline) vs on" in out
    assert run_cli(str(runs["old"]), str(runs["on"]), "--quiet") == 0
    assert label.split(" (")[0] not in capsys.readouterr().out


def test_compare_names_hosts_of_different_speed(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs whose hosts took 0.8 and 1.6 us a torch op (run.json's ceilings): the
    launch-bound cases move with the host, and the comparison says so; hosts 10% apart,
    or a run from before the figure, are not named."""
    env = {"gpus": [{"name": "NVIDIA H200"}], "l2_flush": "read"}
    runs = {
        name: _run(tmp_path, rng, name, "cuda", environment=env, ceilings=ceilings)
        for name, ceilings in (
            ("fast", {"copy_gbps": 4200.0, "host_op_us": 0.8}),
            ("slow", {"copy_gbps": 4200.0, "host_op_us": 1.6}),
            ("near", {"copy_gbps": 4200.0, "host_op_us": 0.88}),
            ("older", {"copy_gbps": 4200.0}),
            ("garbled", {"copy_gbps": 4200.0, "host_op_us": "fast"}),
        )
    }
    assert run_cli(str(runs["fast"]), str(runs["slow"]), "--quiet") == 0
    out = capsys.readouterr().out
    assert "warning: the runs' hosts differ in speed: 0.8 us a torch op (baseline) vs 1.6" in out
    assert "x2.00" in out
    for other in ("near", "older", "garbled"):  # a garbled figure is not a difference
        assert run_cli(str(runs["fast"]), str(runs[other]), "--quiet") == 0
        assert "hosts differ" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("key", "unusual", "words"),
    [
        ("gluon_ws", "off", "Gluon race off"),
        ("merge_tail", "off", "merged-tail race off"),
        ("triton_runoff", "off", "tuner run-off off"),
        ("shared_stream", "off", "shared experts after the routed ones"),
    ],
)
def test_show_says_when_a_race_switch_was_not_in_its_default_state(
    key: str,
    unusual: str,
    words: str,
    tmp_path: Path,
    rng: np.random.Generator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`moebench show` names a switch of the triton layer (the Gluon race, the merged-tail
    race: on by default; route-and-align: off) of a run that had it in the state that is
    not today's default, and says nothing of it in the default state or not recorded."""
    from moebench.cli import main as cli_main

    usual = {"on": "off", "off": "on"}[unusual]
    gpus = [{"name": "NVIDIA H200"}]
    states = ((unusual, unusual, True), (usual, usual, False), ("old", None, False))
    for name, state, said in states:
        environment = {"gpus": gpus, **({key: state} if state else {})}
        run = _run(tmp_path, rng, name, "cuda", environment=environment)
        assert cli_main(["show", str(run)]) == 0
        assert (words in " ".join(capsys.readouterr().out.split())) is said
