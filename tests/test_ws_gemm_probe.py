"""scripts/ws_gemm_probe.py (the fused layer's GEMMs from tensor-descriptor loads, warp-
specialised): every variant's values agree with the layer's kernels at a tiny shape, and
a probe that reads the wrong rows fails its check (in Triton's interpreter on a CPU,
`make test-kernels`, or on CUDA); compiled for Hopper on any host, its warp-specialised
variants are warp-specialised."""

from __future__ import annotations

import importlib.util
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_kernels, without_interpreter

PROBE = Path(__file__).parents[1] / "scripts" / "ws_gemm_probe.py"


def _run(monkeypatch, tmp_path, change=None) -> None:
    """The probe at its tiny shape, both GEMMs; `change(script)` edits the script's
    functions first."""
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    # the functions' own globals: run_path returns a copy of them
    script = runpy.run_path(str(PROBE), run_name="probe")["main"].__globals__
    if change is not None:
        change(script)
    monkeypatch.setattr(sys, "argv", ["ws_gemm_probe.py", "--tiny", "--gemm", "down", "gate_up"])
    script["main"]()


@needs_kernels
def test_every_variant_agrees_with_the_layers_kernels(monkeypatch, tmp_path, capsys):
    _run(monkeypatch, tmp_path)
    lines = capsys.readouterr().out.splitlines()
    variants = [line for line in lines if "'WS'" in line]
    # 2 GEMMs x per tile or persistent x (6 tiles plain + 3 four-warp ones specialised)
    assert len(variants) == 36
    timed = "ms (" in variants[0]
    assert all(("x the layer's" if timed else "values agree") in line for line in variants)


@needs_kernels
def test_a_probe_reading_the_wrong_rows_fails(monkeypatch, tmp_path):
    """gate_up from each row's neighbour's input: the check must not pass it."""

    def shift_rows(script):
        gather = script["gather_rows"]

        def neighbours_rows(x_TD, alignment, top_k):
            return gather(x_TD, alignment, top_k).roll(1, dims=0)

        script["gather_rows"] = neighbours_rows

    with pytest.raises(AssertionError):
        _run(monkeypatch, tmp_path, shift_rows)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_its_warp_specialised_variants_are_so_when_compiled_for_hopper():
    """`--compile-only` (no card; a process without the interpreter): each variant the
    probe races with warp specialisation comes out of Triton's Hopper compiler with the
    extra warps of its producer and no stack (spills), at Mixtral-8x7B's 8192 tokens."""
    env = without_interpreter()
    args = ["--compile-only", "--gemm", "down", "gate_up", "--ws", "1", "--persistent", "0"]
    done = subprocess.run(
        [sys.executable, str(PROBE), *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 6 and all("WS=True" in line for line in lines)
    assert all("12 warps" in line and line.endswith("stack 0 B") for line in lines), lines
