"""Shared experts on a side CUDA stream (`MoELayer.overlaps_shared`; the `triton` layer
under `$MOEBENCH_SHARED_STREAM`): the same output bit for bit as after the routed
experts, plain and captured in a CUDA graph, and the serial path wherever the overlap
does not apply (CPU, gradients, the phase breakdown). The CUDA tests skip without a GPU
and Triton."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moebench import registry
from moebench.case import Case, LayerShape, Workload
from moebench.env import SHARED_STREAM_SWITCH
from moebench.measure.graph import graphed_step
from moebench.measure.phases import PhaseTimer, use_timer
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs a CUDA device and triton",
)


def _case(impl: str, device: str, dtype: str, tokens: int, shared_experts: int = 1) -> Case:
    # DeepSeek-V3's router convention on a small shape: sigmoid scores, 4 groups of 4,
    # the best 2 kept, a correction bias, routed weights x 2.5; one shared expert
    shape = LayerShape(
        256, 128, 16, 4, shared_experts=shared_experts, scoring="sigmoid", n_groups=4,
        topk_groups=2, correction_bias=True, routed_scaling=2.5,
    )  # fmt: skip
    return Case(shape, Workload(tokens, 1, "forward"), impl, device=device, dtype=dtype)


def test_a_layer_that_overlaps_runs_serially_on_the_cpu():
    """On the CPU there is no side stream: the output is the serial one, no stream made."""
    case = _case("reference", "cpu", "float32", 33)
    weights = make_weights(case)
    layer = registry.get("reference").build(weights, case)
    x_TD = make_inputs(case, 1)[0]
    with torch.inference_mode():
        serial = layer(x_TD)
        layer.overlaps_shared = lambda x: True  # as a subclass that overlaps would say
        assert torch.equal(layer(x_TD), serial)
    assert layer._side_streams == {}


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 17, 64])
def test_triton_shared_experts_on_a_side_stream_give_the_same_bits(tokens, monkeypatch):
    """The switch on (its default): a side stream is made and used, and the output is
    the serial one's bit for bit, called directly and replayed from a CUDA graph (where
    the fork and the join are captured), three replays in a row."""
    case = _case("triton", "cuda", "bfloat16", tokens)
    weights = make_weights(case)
    layer = registry.get("triton").build(weights, case)
    x_TD = make_inputs(case, 1)[0]
    with torch.inference_mode():
        monkeypatch.setenv(SHARED_STREAM_SWITCH, "0")
        serial = layer(x_TD).clone()
        assert layer._side_streams == {}
        monkeypatch.delenv(SHARED_STREAM_SWITCH)
        overlapped = layer(x_TD)
        assert list(layer._side_streams) == [x_TD.device]
        assert torch.equal(overlapped, serial)
        outputs = []
        replay = graphed_step(lambda _: outputs.append(layer(x_TD)), 1, x_TD.device, "triton")
        captured = outputs[-1]  # the graph's output, rewritten by each replay
        for _ in range(3):
            captured.zero_()
            replay(0)
            assert torch.equal(captured, serial)


@needs_cuda
def test_the_join_waits_for_a_slow_shared_expert(monkeypatch):
    """The wrong layer this guards against: one that adds the shared experts' output
    before the side stream has written it. A shared expert held back ~50 ms on its stream
    (`torch.cuda._sleep`) must still give the serial output bit for bit: without the join
    the add would read the output's memory long before it is written."""
    case = _case("triton", "cuda", "bfloat16", 8)
    layer = registry.get("triton").build(make_weights(case), case)
    x_TD = make_inputs(case, 1)[0]
    with torch.inference_mode():
        monkeypatch.setenv(SHARED_STREAM_SWITCH, "0")
        serial = layer(x_TD).clone()
        monkeypatch.delenv(SHARED_STREAM_SWITCH)
        original = layer.shared_output

        def held_back(x: torch.Tensor) -> torch.Tensor:
            torch.cuda._sleep(10**8)  # cycles: 50-70 ms at 1.5-2 GHz, on the side stream
            return original(x)

        layer.shared_output = held_back
        overlapped = layer(x_TD)
        assert list(layer._side_streams) == [x_TD.device]
        assert torch.equal(overlapped, serial)


@needs_cuda
def test_triton_shared_experts_stay_serial_past_64_tokens():
    """Past SHARED_STREAM_TOKENS the shared experts run after the routed ones: no side
    stream (at 1024 and 8192 tokens on an H100 the side stream gained nothing or cost)."""
    from moebench.impls.triton.layer import SHARED_STREAM_TOKENS

    case = _case("triton", "cuda", "bfloat16", SHARED_STREAM_TOKENS + 1)
    layer = registry.get("triton").build(make_weights(case), case)
    with torch.inference_mode():
        layer(make_inputs(case, 1)[0])
    assert layer._side_streams == {}


@needs_cuda
def test_triton_shared_experts_stay_serial_for_gradients_and_phases(monkeypatch):
    """With the switch on, a call that records gradients and a call inside the phase
    breakdown (whose phases are timed one after another) make no side stream; the
    gradient call's output is the inference call's."""
    monkeypatch.setenv(SHARED_STREAM_SWITCH, "1")
    case = _case("triton", "cuda", "bfloat16", 64)
    weights = make_weights(case)
    layer = registry.get("triton").build(weights, case)
    x_TD = make_inputs(case, 1)[0]
    with torch.enable_grad():
        with_grad = layer(x_TD.clone().requires_grad_())
    assert layer._side_streams == {}
    timer = PhaseTimer(x_TD.device)
    with torch.inference_mode(), use_timer(layer, timer):
        phased = layer(x_TD)
    assert timer.collect()["shared"] > 0
    assert layer._side_streams == {}
    torch.testing.assert_close(phased, with_grad.detach(), rtol=2e-2, atol=2e-2)
