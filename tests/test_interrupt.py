"""Ctrl-C reaches the whole foreground process group: the run, its worker and its
expert-parallel ranks. The run alone decides: it stops the others, keeps what finished
and prints the resume command; no traceback of a child's, whenever the key is pressed
(while a child still imports torch, while ranks join their group, mid-case)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import time

import pytest

from moebench.interrupt import ctrl_c_held, ignore_ctrl_c
from tests.test_runner import _moebench

EP_SUITE = """
[suite]
name = "ep-interrupt"
device = "cpu"
warmup = 1
min_repeats = 3
max_repeats = 5
timeout_s = 120

[grid]
impl = "ep-dropless"
world_size = 2
hidden = 64
ffn = 128
num_experts = 4
top_k = [1, 2]
batch = [64, 128, 256, 512]
seq_len = 1
"""


def _report_ctrl_c(conn) -> None:
    """A child's view of SIGINT at its entry, and after `ignore_ctrl_c`."""
    held_at_entry = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    ignore_ctrl_c()
    held_after = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    conn.send((held_at_entry, signal.getsignal(signal.SIGINT) is signal.SIG_IGN, held_after))


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_child_started_held_ignores_ctrl_c_from_its_first_instruction(method):
    context = mp.get_context(method)
    parent, child = context.Pipe()
    process = context.Process(target=_report_ctrl_c, args=(child,))
    with ctrl_c_held():
        process.start()
    assert parent.recv() == (True, True, False)
    process.join(timeout=30)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_ctrl_c_while_held_is_raised_after_the_block_not_lost():
    """A Ctrl-C while held: raised once the block ends. Python's own handler is set for
    the test: a pytest started in the background by a non-interactive shell (`make test
    &`) inherits SIGINT ignored, and Python then installs none, so there is no Ctrl-C to
    raise (and `ctrl_c_held` rightly raises none)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _held_ctrl_c_is_raised_after_the_block()
    finally:
        signal.signal(signal.SIGINT, previous)


def _held_ctrl_c_is_raised_after_the_block() -> None:
    finished_inside = []
    with pytest.raises(KeyboardInterrupt), ctrl_c_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # a signal not held back would have raised here
        finished_inside.append(True)
    assert finished_inside
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _ctrl_c_after(proc: subprocess.Popen, line_starts: str) -> str:
    """Ctrl-C to the run's whole process group once it prints a line starting so; the
    run's output."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(line_starts):
            break
    else:
        pytest.fail("".join(seen))
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    return "".join(seen) + rest


def _group_gone(pgid: int) -> bool:
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.parametrize(
    "when",
    [
        "ep-interrupt:",  # the header: the ranks are starting (importing torch, joining)
        "[1/",  # the first case done: the ranks are in the second one
    ],
)
def test_ctrl_c_during_an_expert_parallel_run_prints_no_child_traceback(tmp_path, when):
    """Each rank printed a KeyboardInterrupt traceback (mid-case), or, interrupted while
    the ranks started, one was left behind joining its group and printed torch's store
    errors once the run had gone."""
    suite = tmp_path / "ep.toml"
    suite.write_text(EP_SUITE)
    proc = _moebench("run", str(suite), "--out", str(tmp_path / "results"))
    output = _ctrl_c_after(proc, when)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "TCPStore" not in output, output
    assert "interrupted (Ctrl-C)" in output
    assert _group_gone(proc.pid), "a rank or worker outlived the interrupted run"
