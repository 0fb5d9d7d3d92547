"""scripts/gluon_probe.py's watchdog, without a card: a child that goes quiet is
killed and called a hang, the config it was checking is skipped by the next child, a
hang while timing ends the point, and bad points are refused before anything runs."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "gluon_probe.py"


@pytest.fixture()
def probe() -> dict:
    return runpy.run_path(str(SCRIPT))


def test_a_quiet_child_is_killed_and_called_a_hang(probe):
    code = "import time; print('START 3', flush=True); time.sleep(60)"
    lines, status, _ = probe["_child_lines"]([sys.executable, "-c", code], 2.0)
    assert lines == ["START 3"] and status == "hang"
    lines, status, error = probe["_child_lines"](
        [sys.executable, "-c", "print('START 0'); raise SystemExit('boom')"], 10.0
    )
    assert lines == ["START 0"] and status == "crash" and "boom" in error
    lines, status, _ = probe["_child_lines"]([sys.executable, "-c", "print('RESULT {}')"], 10.0)
    assert lines == ["RESULT {}"] and status is None


def _fake_children(probe: dict, outputs: list[tuple[list[str], str | None]]) -> list[list[str]]:
    """Replace the children with `outputs` in turn; returns the commands they were given."""
    commands = []

    def child_lines(command, timeout_s):
        commands.append(command)
        lines, status = outputs[len(commands) - 1]
        return lines, status, "stderr"

    probe["probe_point"].__globals__["_child_lines"] = child_lines
    return commands


def test_a_hung_config_is_skipped_by_the_next_child(probe):
    result = '{"point": "p:8", "index": 0, "config": {"GLUON_WS": true}, "ms": 1.5}'
    commands = _fake_children(
        probe,
        [
            (["START 0", 'CHECKED {"index": 0}', 'START 1 {"GLUON_WS": true}'], "hang"),
            (["START 0", "CHECKED {}", "TIMING", f"RESULT {result}"], None),
        ],
    )
    records = probe["probe_point"]("qwen3-30b-a3b:64", 5.0, 1)
    assert "--skip" not in commands[0] and commands[1][-2:] == ["--skip", "1"]
    assert commands[0][commands[0].index("--gemm") + 1] == "down"
    assert records[0]["index"] == 1 and records[0]["hang"] and records[0]["config"]
    assert records[1]["ms"] == 1.5
    assert "p:8 down: gluon 1500.0 us" in probe["summary"](records)
    assert "1 Gluon config(s) wrong or ended, 0 other(s) ended" in probe["summary"](records)
    records[0]["config"] = {"TMA": True}  # a TMA tile's crash is not the Gluon kernels'
    assert "0 Gluon config(s) wrong or ended, 1 other(s) ended" in probe["summary"](records)


def test_a_crash_while_timing_ends_the_point(probe):
    _fake_children(probe, [(["START 0", "CHECKED {}", "TIMING", "WARMED 0"], "crash")])
    records = probe["probe_point"]("qwen3-30b-a3b:64", 5.0, 1)
    assert records == [{"point": "qwen3-30b-a3b:64", "gemm": "down", "index": None,
                        "crash": True, "error": "stderr"}]  # fmt: skip


def test_a_child_failing_before_any_config_is_an_error(probe):
    _fake_children(probe, [([], "crash")])
    with pytest.raises(RuntimeError, match="before any config"):
        probe["probe_point"]("qwen3-30b-a3b:64", 5.0, 1)


def test_gate_up_is_probed_when_asked(probe):
    result = '{"point": "p:8", "gemm": "gate_up", "index": 0, "config": {}, "ms": 2.0}'
    commands = _fake_children(
        probe, [(["START 0", "CHECKED {}", "TIMING", f"RESULT {result}"], None)]
    )
    records = probe["probe_point"]("qwen3-30b-a3b:64", 5.0, 1, gemm="gate_up")
    assert commands[0][commands[0].index("--gemm") + 1] == "gate_up"
    assert "p:8 gate_up: pointer 2000.0 us" in probe["summary"](records)


def test_an_unknown_gemm_is_refused(probe, capsys):
    with pytest.raises(SystemExit) as exit_:
        probe["main"](["--gemm", "up"])
    assert exit_.value.code == 2 and "invalid choice: 'up'" in capsys.readouterr().err


@pytest.mark.parametrize("point", ["nope:12", "qwen3-30b-a3b", "qwen3-30b-a3b:0"])
def test_bad_points_are_refused(probe, point, capsys):
    with pytest.raises(SystemExit) as exit_:
        probe["main"](["--points", point])
    assert exit_.value.code == 2
    assert "want PRESET:TOKENS" in capsys.readouterr().err


def test_the_shipped_choice_is_found_under_the_layers_key():
    """The probe races the Gluon configs against the config moebench ships (down's and
    gate_up's) on both cards, looked up under the key and a fingerprint the layer
    computes (under the card's versions, in a process without Triton's interpreter, as
    tests/test_shipped_tuning.py does)."""
    pytest.importorskip("triton", reason="the fingerprints take the kernels' Triton cache keys")
    from tests.conftest import without_interpreter
    from tests.test_shipped_tuning import CARD_TORCH, CARD_TRITON

    code = f"""
import runpy, torch
from moebench.impls.triton import tuning
tuning._version = lambda distribution: {CARD_TRITON!r}
torch.__version__ = {CARD_TORCH!r}
probe = runpy.run_path({str(SCRIPT)!r})
for card in ("NVIDIA H200", "NVIDIA H100 80GB HBM3"):
    for gemm in ("down", "gate_up"):
        found = probe["shipped_choice"]("qwen3-30b-a3b", 8192, 128, card, gemm)
        assert found is not None and found["BLOCK_M"] == 128, (card, gemm, found)
assert probe["shipped_choice"]("qwen3-30b-a3b", 8192, 128, "no such card") is None
"""
    done = subprocess.run(
        [sys.executable, "-c", code], env=without_interpreter(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
