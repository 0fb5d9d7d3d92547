"""The fused layer's forward plan (`layer.ForwardPlan`): the first call of a signature
decides and keeps its row blocks and both GEMMs' configs in the layer; later calls take
them without asking the tuner, and give the same bits; another token count, training,
another row-block size or new weight storage is another signature. In Triton's
interpreter on a CPU (float16), and on a card."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the fused layer's kernels are Triton's")

from moebench.impls.triton import layer, tuning
from tests.conftest import KERNEL_DEVICE, needs_kernels
from tests.test_triton import _gpu_case, built_layer

DTYPE = "float16" if KERNEL_DEVICE == "cpu" else "bfloat16"


@pytest.fixture
def tuner_calls(monkeypatch, tmp_path) -> list[str]:
    """The keys the tuner is asked for, from a fresh tuner."""
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    fresh = tuning.Tuner()
    monkeypatch.setattr(tuning, "TUNER", fresh)
    asked: list[str] = []
    choose = fresh.choose

    def counted(device, key, *args, **kwargs):
        asked.append(key)
        return choose(device, key, *args, **kwargs)

    monkeypatch.setattr(fresh, "choose", counted)
    return asked


@needs_kernels
def test_a_repeated_call_takes_its_plan_and_the_same_bits(tuner_calls):
    case = _gpu_case((72, 64, 4, 2, 40), DTYPE, device=KERNEL_DEVICE)
    _, built, x_TD = built_layer(case)
    with torch.no_grad():
        first = built(x_TD)
        asked_first = len(tuner_calls)
        second = built(x_TD)
    assert asked_first >= 2, tuner_calls  # both GEMMs' configs (and the row blocks')
    assert len(tuner_calls) == asked_first, "the second call asked the tuner again"
    assert torch.equal(first, second)
    (plan,) = built._plans.values()
    assert plan.gate_up and plan.down and plan.block_m == tuning.block_m_for(40, 2, 4)
    # the same call without a plan: the same bits
    with torch.no_grad():
        gate_TK, ids_TK, _ = built.router(x_TD)
        unplanned, _ = layer.fused_experts(
            x_TD, gate_TK, ids_TK, built.w_gate_up_E2FD, built.w_down_EFD
        )
    torch.testing.assert_close(built.routed(x_TD, gate_TK, ids_TK), unplanned, rtol=0, atol=0)


@needs_kernels
def test_each_signature_has_its_own_plan(tuner_calls):
    case = _gpu_case((72, 64, 4, 2, 40), DTYPE, device=KERNEL_DEVICE, mode="train")
    _, built, x_TD = built_layer(case)
    with torch.no_grad():
        built(x_TD)
        built(x_TD[:7])  # another token count
        gate_TK, ids_TK, _ = built.router(x_TD)
        weights = (built.w_gate_up_E2FD, built.w_down_EFD)
        for block_m in (16, 32):  # another row-block size, asked for
            layer.fused_experts(x_TD, gate_TK, ids_TK, *weights, block_m=block_m,
                                plans=built._plans)  # fmt: skip
    x_grad = x_TD.detach().requires_grad_()
    built(x_grad).float().sum().backward()  # training: its forward keeps activations
    assert x_grad.grad is not None and x_grad.grad.isfinite().all()
    keys = list(built._plans)
    assert len(keys) == 5, keys
    assert {key[0] for key in keys} == {40, 7}
    assert sum(key[4] for key in keys) == 1  # one kept the activations
    assert {key[5] for key in keys} == {None, 16, 32}
    assert {plan.block_m for key, plan in built._plans.items() if key[5]} == {16, 32}
    asked = len(tuner_calls)
    built(x_grad).float().sum().backward()
    # (the backward asks for its own keys: the plan is the forward's)
    forward_keys = ("gate_up", "down ", "block_m")
    again = [key for key in tuner_calls[asked:] if key.startswith(forward_keys)]
    assert again == [], "the training call's forward asked the tuner again"


@needs_kernels
def test_new_weight_storage_is_planned_again(tuner_calls):
    case = _gpu_case((72, 64, 4, 2, 40), DTYPE, device=KERNEL_DEVICE)
    _, built, x_TD = built_layer(case)
    with torch.no_grad():
        built(x_TD)
        built.w_down_EFD.data = built.w_down_EFD.data.clone()
        built(x_TD)
    assert len(built._plans) == 2


@needs_kernels
def test_host_profile_turns_the_plan_off_and_on(tuner_calls):
    """`scripts/host_profile.py --ab forward-plan`: with the switch off every call asks
    the tuner again (no plan), on it asks nothing once its plan is made; the layer's
    function is as it was after."""
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "host_profile.py"))
    switch = script["SWITCHES"]["forward-plan"]
    case = _gpu_case((72, 64, 4, 2, 40), DTYPE, device=KERNEL_DEVICE)
    _, built, x_TD = built_layer(case)
    with torch.no_grad():
        built(x_TD)  # the plan is made
        asked = len(tuner_calls)
        with switch(False):
            built(x_TD)
            built(x_TD)
        assert len(tuner_calls) >= asked + 4  # both GEMMs, each call
        asked = len(tuner_calls)
        with switch(True):
            built(x_TD)
        assert len(tuner_calls) == asked
    assert layer.fused_experts.__name__ == "fused_experts"
