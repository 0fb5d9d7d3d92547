"""scripts/stage_probe.py: every stage of the fused layer timed at a small shape in
Triton's interpreter (on a card, graphed), the stages' GEMMs and sum giving the layer's
routed output bit for bit, and bad points refused with what they should be."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import pytest

from tests.conftest import needs_kernels

SCRIPT = Path(__file__).parents[1] / "scripts" / "stage_probe.py"


@needs_kernels
def test_every_stage_is_timed_and_the_stages_compute_the_layers_rows(tmp_path, capsys):
    script = runpy.run_path(str(SCRIPT))
    out = tmp_path / "stages.json"
    # 100 tokens, top-2 of 4 experts: 64-row blocks, the alignment's row list
    args = ["--shape", "64", "128", "4", "2", "100", "--rounds", "1", "--json", str(out)]
    assert script["main"]([*args, "--ab", "MOEBENCH_TRITON_RUNOFF,MOEBENCH_MERGE_TAIL"]) == 0
    (found,) = json.loads(out.read_text()).values()
    switched = "layer, MOEBENCH_TRITON_RUNOFF=1 MOEBENCH_MERGE_TAIL=1"
    assert set(found["us"]) == {*script["STAGES"], switched}
    assert all(us > 0 for us in found["us"].values()), found
    assert found["same_bits"] is True and found["ab_same_bits"] is True
    assert found["ab_max_diff"] == 0
    printed = capsys.readouterr().out
    assert "on the path: router" in printed and "gemms+sum" in printed
    assert f"{switched}: " in printed and "same bits True" in printed
    assert "largest difference 0.00e+00 of the largest output" in printed
    assert not {"MOEBENCH_TRITON_RUNOFF", "MOEBENCH_MERGE_TAIL"} & set(os.environ)  # as it was
    assert len(found["turns_us"]["layer"]) == 1  # --rounds 1


@pytest.mark.parametrize("point", ["olmoe-1b-7b", "nope:64", "olmoe-1b-7b:0", "olmoe-1b-7b:x"])
def test_a_bad_point_is_refused_with_the_form_it_takes(point):
    script = runpy.run_path(str(SCRIPT))
    with pytest.raises(SystemExit, match=r"bad point .*PRESET:TOKENS"):
        script["parse_point"](point)


def test_the_switches_are_set_inside_and_as_they_were_after(monkeypatch):
    """`--ab`'s plain layer runs with the switches at "0" (on-by-default ones too), the
    other at "1"; each is put back as it was, set or unset."""
    script = runpy.run_path(str(SCRIPT))
    monkeypatch.setenv("MOEBENCH_GLUON_WS", "yes")
    monkeypatch.delenv("MOEBENCH_MERGE_TAIL", raising=False)
    with script["switches_set"]("MOEBENCH_GLUON_WS,MOEBENCH_MERGE_TAIL", "0"):
        assert os.environ["MOEBENCH_GLUON_WS"] == os.environ["MOEBENCH_MERGE_TAIL"] == "0"
        with script["switches_set"]("MOEBENCH_MERGE_TAIL", "1"):
            assert os.environ["MOEBENCH_MERGE_TAIL"] == "1"
        assert os.environ["MOEBENCH_MERGE_TAIL"] == "0"
    assert os.environ["MOEBENCH_GLUON_WS"] == "yes" and "MOEBENCH_MERGE_TAIL" not in os.environ
