"""scripts/ws_gemm_probe.py (the fused layer's GEMMs from tensor-descriptor loads, warp-
specialised): every variant's values agree with the layer's kernels at a tiny shape, and
a probe that reads the wrong rows fails its check. In Triton's interpreter on a CPU
(`make test-kernels`) or on CUDA."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_kernels

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
    # 2 GEMMs x warp specialisation on/off x persistent or not x 4 tiles
    assert len(variants) == 32
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
