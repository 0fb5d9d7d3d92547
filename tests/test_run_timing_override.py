"""`moebench run SUITE --budget-ms MS --max-repeats N`: each case timed for longer (or
shorter) than the suite says, end to end with run.json and the parquet read back; and the
values `run` refuses, each named, before any case runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moebench.cli import main as cli_main
from moebench.store import read_run
from tests.test_bad_input import TINY_SUITE


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_SUITE)
    argv = ["run", str(suite), "--out", str(tmp_path / "results"), "--in-process", "--quiet"]
    code = cli_main([*argv, *extra])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def test_budget_and_max_repeats_override_the_suites_timing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny suite times for 5 ms and at most 3 calls; the flags make it 200 ms and at
    most 7 calls: run.json's timing says so, and every case took more samples than the
    suite's cap allows (a tiny CPU case runs far under 200 / 7 ms)."""
    code, said = _run(tmp_path, capsys, "--budget-ms", "200", "--max-repeats", "7")
    assert code == 0, said
    assert "timed 200 ms, at most 7 calls a case" in said
    (run_dir,) = (tmp_path / "results").iterdir()
    timing = json.loads((run_dir / "run.json").read_text())["timing"]
    assert timing["budget_ms"] == 200 and timing["max_repeats"] == 7
    assert timing["min_repeats"] == 2  # the suite's, untouched
    frame = read_run(run_dir)
    assert (frame["status"] == "ok").all()
    assert (frame["repeats"] > 3).all() and (frame["repeats"] <= 7).all()


def test_without_the_flags_the_suites_timing_stands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, said = _run(tmp_path, capsys)
    assert code == 0, said
    assert "timed" not in said
    (run_dir,) = (tmp_path / "results").iterdir()
    timing = json.loads((run_dir / "run.json").read_text())["timing"]
    assert timing["budget_ms"] == 5 and timing["max_repeats"] == 3
    assert (read_run(run_dir)["repeats"] <= 3).all()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget-ms", "0"], "--budget-ms must be a positive number of milliseconds, got 0"),
        (["--budget-ms", "-5"], "--budget-ms must be a positive number of milliseconds, got -5"),
        (["--budget-ms", "nan"], "--budget-ms must be a positive number of milliseconds, got nan"),
        (["--budget-ms", "inf"], "--budget-ms must be a positive number of milliseconds, got inf"),
        (
            ["--budget-ms", "300000"],
            "--budget-ms 300000 is not under the suite's timeout of 300 s a case",
        ),
        (["--max-repeats", "1"], "--max-repeats 1 is below the suite's min_repeats (2)"),
        (["--budget-ms", "ten"], "argument --budget-ms: invalid float value: 'ten'"),
        (["--max-repeats", "2.5"], "argument --max-repeats: invalid int value: '2.5'"),
    ],
)
def test_bad_timing_overrides_are_refused_by_name_before_any_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    try:
        code, said = _run(tmp_path, capsys, *flags)
    except SystemExit as exit_:  # argparse's own refusal of a value of the wrong type
        code, said = exit_.code, " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert message in said
    assert "Traceback" not in said
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_a_resume_that_would_time_its_cases_otherwise_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run started with --budget-ms 50 and resumed without it (or with its suite's
    budget edited since) would time its cases two ways under one run.json: refused,
    naming both timings and the command that finishes it as it started; with the same
    flags it resumes."""
    code, said = _run(tmp_path, capsys, "--budget-ms", "50")
    assert code == 0, said
    (run_dir,) = (tmp_path / "results").iterdir()
    code, said = _run(tmp_path, capsys, "--resume", run_dir.name)
    assert code == 2
    assert f"cannot resume {run_dir.name}: it was timed with budget_ms 50, this command" in said
    assert "times with budget_ms 5 (its cases would be timed two ways)" in said
    assert "--budget-ms 50" in said and f"--resume {run_dir.name}" in said
    code, said = _run(tmp_path, capsys, "--budget-ms", "50", "--resume", run_dir.name)
    assert code == 0, said
    assert "already done" in said
