"""The `cuda_graph` case field (CPU): its default keeps case ids, suites refuse it on the
CPU, and `suites/triton.toml` graphs the fused layer's launch-bound points. The graphed
runs themselves: tests/test_triton.py (CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moebench.suite import SuiteError, parse_suite
from tests.conftest import tiny_case, tiny_suite_toml


def test_cuda_graph_default_keeps_the_case_id():
    case = tiny_case()
    assert case.cuda_graph is False
    assert case.case_id == case.with_(cuda_graph=False).case_id
    assert case.case_id != case.with_(cuda_graph=True).case_id
    assert case.fields()["cuda_graph"] is False


def test_suite_rejects_cuda_graph_on_cpu():
    with pytest.raises(SuiteError) as info:
        parse_suite(tiny_suite_toml(cuda_graph="[false, true]"))
    assert "'cuda_graph'" in str(info.value) and "needs a CUDA device" in str(info.value)
    ok = parse_suite(tiny_suite_toml(cuda_graph="false"))
    assert [c.cuda_graph for c in ok.cases] == [False]
    with pytest.raises(SuiteError) as info:
        parse_suite(tiny_suite_toml(cuda_graph='"yes"'))
    assert "cuda_graph" in str(info.value)


def test_triton_suite_loads_for_cuda(monkeypatch):
    from moebench.suite import load_suite

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    suite = load_suite(Path(__file__).parents[1] / "suites" / "triton.toml")
    assert len(suite.cases) == 46
    graphed = [c for c in suite.cases if c.cuda_graph]
    assert len(graphed) == 12 and {c.impl for c in graphed} == {"triton"}
    assert {c.tokens for c in graphed} == {1, 64, 1024}
    train = sorted(c.impl for c in suite.cases if c.workload.mode == "train")
    assert train == ["grouped", "triton"]
