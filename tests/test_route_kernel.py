"""The softmax router convention as one Triton kernel (moebench.route_kernel) against
`routing.route`: choices, gates, probabilities and gradients. Runs on CUDA, or on CPU in
Triton's interpreter (TRITON_INTERPRET=1); skipped without either.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from moebench.case import LayerShape
from moebench.routing import kernel_route_applies, route

DEVICE = (
    "cuda"
    if torch.cuda.is_available()
    else ("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)
)
needs_kernel = pytest.mark.skipif(
    DEVICE is None or importlib.util.find_spec("triton") is None,
    reason="needs triton and a CUDA device (or TRITON_INTERPRET=1)",
)

CONVENTIONS = [
    # experts, top_k, renormalised, routed scaling: Mixtral, Qwen3, OLMoE shapes and edges
    (8, 2, True, 1.0),
    (128, 8, True, 1.0),
    (64, 8, False, 1.0),
    (6, 6, True, 2.5),  # every expert
    (5, 1, False, 1.0),  # one expert, odd count
    (300, 4, True, 1.0),  # not a power of two, wide
]


def _logits(tokens: int, experts: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, experts, generator=generator) * 2).to(DEVICE)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm())


@needs_kernel
@pytest.mark.parametrize(("experts", "top_k", "norm", "scaling"), CONVENTIONS)
@pytest.mark.parametrize("tokens", [1, 37])
def test_kernel_routes_as_route_does(experts, top_k, norm, scaling, tokens):
    from moebench.route_kernel import softmax_top_k

    shape = LayerShape(64, 32, experts, top_k, norm_topk_prob=norm, routed_scaling=scaling)
    logits_TE = _logits(tokens, experts, seed=experts + top_k)
    # the logits as three parts and a bias, as the Router hands them over
    bias_E = torch.linspace(-1, 1, experts, device=DEVICE)
    parts_T3E = torch.cat([logits_TE * 0.5, logits_TE * 0.25, logits_TE * 0.25 - bias_E], 1)
    gate_TK, ids_TK, probs_TE = softmax_top_k(parts_T3E, 3, bias_E, shape, torch.float32)
    want_gate_TK, want_ids_TK, want_probs_TE = route(logits_TE, shape)
    assert ids_TK.dtype == torch.int64 and torch.equal(ids_TK, want_ids_TK)
    assert torch.allclose(gate_TK, want_gate_TK, rtol=1e-5, atol=1e-7)
    assert torch.allclose(probs_TE, want_probs_TE, rtol=1e-5, atol=1e-7)
    if DEVICE == "cuda":  # the gates in the tokens' dtype, as the Router returns them
        zero_E = torch.zeros(experts, device=DEVICE)
        gate16_TK = softmax_top_k(logits_TE, 1, zero_E, shape, torch.bfloat16)[0]
        assert gate16_TK.dtype == torch.bfloat16
        assert torch.equal(gate16_TK, want_gate_TK.to(torch.bfloat16))


@needs_kernel
@pytest.mark.parametrize(("experts", "top_k", "norm", "scaling"), CONVENTIONS)
def test_kernel_gradients_are_routes(experts, top_k, norm, scaling):
    from moebench.route_kernel import softmax_top_k

    shape = LayerShape(64, 32, experts, top_k, norm_topk_prob=norm, routed_scaling=scaling)
    logits_TE = _logits(23, experts, seed=1)
    generator = torch.Generator().manual_seed(2)
    grad_gate_TK = torch.randn(23, top_k, generator=generator).to(DEVICE)
    grad_probs_TE = torch.randn(23, experts, generator=generator).to(DEVICE)
    ours = logits_TE.clone().requires_grad_(True)
    want = logits_TE.clone().requires_grad_(True)
    zero_E = torch.zeros(experts, device=DEVICE)
    # two parts: each gets the logits' gradient
    gate_TK, _, probs_TE = softmax_top_k(
        torch.cat([ours, ours], 1) * 0.5, 2, zero_E, shape, torch.float32
    )
    want_gate_TK, _, want_probs_TE = route(want, shape)
    ((gate_TK * grad_gate_TK).sum() + (probs_TE * grad_probs_TE).sum()).backward()
    ((want_gate_TK * grad_gate_TK).sum() + (want_probs_TE * grad_probs_TE).sum()).backward()
    assert _relative(ours.grad, want.grad) <= 1e-5
    # through the gates alone too (the layer's loss does not use the probabilities)
    ours.grad = want.grad = None
    softmax_top_k(ours, 1, zero_E, shape, torch.float32)[0].backward(grad_gate_TK)
    route(want, shape)[0].backward(grad_gate_TK)
    if want.grad.norm() > 0:  # a renormalised single gate is 1: no gradient at all
        assert _relative(ours.grad, want.grad) <= 1e-5
    else:
        assert float(ours.grad.abs().max()) <= 1e-6


@needs_kernel
@pytest.mark.parametrize(
    ("tokens", "hidden", "experts"), [(1, 2048, 128), (16, 300, 8), (5, 4096, 60)]
)
def test_few_token_logits_are_float32_logits(tokens, hidden, experts):
    from moebench.route_kernel import FEW_TOKENS_ROWS, few_token_logits

    generator = torch.Generator().manual_seed(tokens)
    x_TD = torch.randn(tokens, hidden, generator=generator).to(DEVICE)
    w_DE = (torch.randn(hidden, experts, generator=generator) * 0.02).to(DEVICE)
    parts_TSE, parts = few_token_logits(x_TD, w_DE)
    assert parts == -(-hidden // FEW_TOKENS_ROWS) and parts_TSE.shape == (tokens, parts * experts)
    logits_TE = parts_TSE.view(tokens, parts, experts).sum(dim=1)
    exact_TE = x_TD.double() @ w_DE.double()
    assert _relative(logits_TE, exact_TE) <= 1e-6


def test_kernel_route_applies_to_softmax_conventions_on_cuda_only():
    on_cuda = SimpleNamespace(device=torch.device("cuda"))
    on_cpu = torch.zeros(1, 8)
    base = LayerShape(64, 32, 8, 2)
    has_triton = importlib.util.find_spec("triton") is not None
    assert kernel_route_applies(base, on_cuda) == has_triton
    assert not kernel_route_applies(base, on_cpu)
    sigmoid = replace(base, scoring="sigmoid")
    grouped = LayerShape(64, 32, 16, 2, n_groups=4, topk_groups=2)
    biased = replace(base, correction_bias=True)
    for shape in (sigmoid, grouped, biased):
        assert not kernel_route_applies(shape, on_cuda), shape


def test_router_keeps_its_torch_path_when_triton_does_not_import(monkeypatch):
    import sys

    import moebench
    from moebench import routing

    monkeypatch.setattr(routing.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "moebench.route_kernel", None)  # its import fails
    monkeypatch.delattr(moebench, "route_kernel", raising=False)
    routing.route_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="Triton did not import"):
            assert routing.route_kernels() is None
        on_cuda = SimpleNamespace(device=torch.device("cuda"))
        assert not kernel_route_applies(LayerShape(64, 32, 8, 2), on_cuda)
    finally:
        routing.route_kernels.cache_clear()
