"""The Router's float32 logits from bfloat16 tensor cores (moebench.router_logits).

CPU: the three-piece split is exact; the split GEMM's logits, top-k and gradients agree
with float32 and float64 math; the Router remakes its pieces after an in-place edit.
CUDA: the Router's tensor-core path against its float32 path on a real shape.
"""

from __future__ import annotations

import pytest
import torch

from moebench import routing
from moebench.case import LayerShape
from moebench.measure.check import TIE_MARGIN
from moebench.router_logits import (
    SplitLogits,
    bfloat16_pieces,
    sum_pieces,
    tensor_core_path,
    weight_pieces,
)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm())


@pytest.mark.parametrize("scale", [1e-3, 0.02, 1.0, 3e4])
def test_three_bfloat16_pieces_hold_every_bit_of_a_float32(scale):
    w = torch.randn(512, 64, generator=torch.Generator().manual_seed(1)) * scale
    pieces = bfloat16_pieces(w)
    assert len(pieces) == 3 and all(p.dtype == torch.bfloat16 for p in pieces)
    total = sum(p.double() for p in pieces)
    assert torch.equal(total, w.double())
    # Two pieces would not do: the test can fail.
    assert not torch.equal(sum(p.double() for p in bfloat16_pieces(w, 2)), w.double())


def _split_case(tokens: int = 300, hidden: int = 512, experts: int = 64):
    generator = torch.Generator().manual_seed(7)
    x_TD = torch.randn(tokens, hidden, generator=generator).bfloat16()
    w_DE = torch.randn(hidden, experts, generator=generator) * 0.02
    bias_E = torch.randn(experts, generator=generator)
    return x_TD, w_DE, bias_E


def test_split_logits_are_float32_logits_with_their_gradients():
    x_TD, w_DE, bias_E = _split_case()
    x_ours = x_TD.clone().requires_grad_(True)
    w_ours = w_DE.clone().requires_grad_(True)
    products_T3E = SplitLogits.apply(x_ours, w_ours, weight_pieces(w_DE))
    logits_TE = sum_pieces(products_T3E) + bias_E
    x64 = x_TD.double().requires_grad_(True)
    w64 = w_DE.double().requires_grad_(True)
    exact_TE = x64 @ w64 + bias_E.double()
    assert logits_TE.dtype == torch.float32
    # float32 rounding of the sum, not bfloat16's (2^-9 = 2e-3) of the weights
    assert (logits_TE.double() - exact_TE).abs().max() <= 1e-6 * exact_TE.abs().max()
    float32_TE = x_TD.float() @ w_DE + bias_E
    assert torch.equal(logits_TE.topk(8).indices, float32_TE.topk(8).indices)

    grad_TE = torch.randn(logits_TE.shape, generator=torch.Generator().manual_seed(3))
    logits_TE.backward(grad_TE)
    exact_TE.backward(grad_TE.double())
    assert x_ours.grad.dtype == torch.bfloat16 and w_ours.grad.dtype == torch.float32
    assert _relative(w_ours.grad, w64.grad) <= 1e-6  # exact products, float32 sums
    # dx is rounded to bfloat16: no worse than rounding the exact gradient
    rounding = _relative(x64.grad.bfloat16(), x64.grad)
    assert _relative(x_ours.grad, x64.grad) <= 1.1 * rounding


def test_router_remakes_its_pieces_after_an_in_place_edit(monkeypatch):
    """The Router keeps the weight's pieces between calls; editing the weight in place
    (a study forcing routes) must not leave it routing on the old pieces."""
    monkeypatch.setattr(routing, "tensor_core_path", lambda x: x.dtype == torch.bfloat16)
    x_TD, w_DE, bias_E = _split_case(tokens=64, hidden=128, experts=16)
    router = routing.Router(w_DE, bias_E, LayerShape(128, 64, 16, 2))
    assert torch.allclose(router.logits(x_TD), x_TD.float() @ w_DE + bias_E, atol=1e-5)
    with torch.no_grad():
        router.w_router_DE.mul_(-3.0)
    expected_TE = x_TD.float() @ router.w_router_DE + bias_E
    assert torch.allclose(router.logits(x_TD), expected_TE, atol=1e-5)


def test_router_built_under_inference_mode_routes_on_its_current_weight(monkeypatch):
    """A Router built under torch.inference_mode holds inference tensors, which keep no
    version counter: it takes its pieces from the weight as it is at each call (an edit
    in place, inside inference_mode, still counts) instead of failing."""
    monkeypatch.setattr(routing, "tensor_core_path", lambda x: x.dtype == torch.bfloat16)
    x_TD, w_DE, bias_E = _split_case(tokens=64, hidden=128, experts=16)
    with torch.inference_mode():
        router = routing.Router(w_DE, bias_E, LayerShape(128, 64, 16, 2))
        assert torch.allclose(router.logits(x_TD), x_TD.float() @ w_DE + bias_E, atol=1e-5)
        router.w_router_DE.mul_(-3.0)
        expected_TE = x_TD.float() @ router.w_router_DE + bias_E
        assert torch.allclose(router.logits(x_TD), expected_TE, atol=1e-5)


def test_only_bfloat16_on_cuda_takes_the_tensor_core_path():
    assert not tensor_core_path(torch.zeros(2, 2, dtype=torch.bfloat16))  # CPU
    if torch.cuda.is_available():
        assert not tensor_core_path(torch.zeros(2, 2, device="cuda", dtype=torch.float16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_router_on_tensor_cores_routes_as_float32_on_cuda():
    x_TD, w_DE, bias_E = (t.cuda() for t in _split_case(tokens=4096, hidden=2048, experts=128))
    assert tensor_core_path(x_TD)
    shape = LayerShape(2048, 768, 128, 8)
    router = routing.Router(w_DE, bias_E, shape).cuda()
    x_fast = x_TD.clone().requires_grad_(True)
    logits_TE = router.logits(x_fast)
    x32 = x_TD.float().requires_grad_(True)
    w32 = w_DE.clone().requires_grad_(True)
    logits32_TE = x32 @ w32 + bias_E
    exact_TE = x_TD.double() @ w_DE.double() + bias_E.double()
    # Hopper's tensor cores sum the exact products with fewer bits than IEEE float32
    # addition: on an H200, 1.4e-6 from the exact logits against cuBLAS's float32 GEMM's
    # 2.8e-7, the worst logit 5.7e-6 of its token's spread. It stays well inside the
    # check's tie margin.
    assert _relative(logits_TE, exact_TE) <= 5e-6
    worst_T = (logits_TE.detach().double() - exact_TE).abs().amax(dim=1)
    assert (worst_T <= TIE_MARGIN / 3 * exact_TE.std(dim=1)).all()
    _, ids_TK, _ = router(x_TD)
    _, ids32_TK, _ = routing.route(logits32_TE.detach(), shape)
    assert (ids_TK == ids32_TK).all(dim=1).float().mean() >= 0.999  # bar exact near-ties
    grad_TE = torch.randn_like(logits32_TE)
    logits_TE.backward(grad_TE)
    logits32_TE.backward(grad_TE)
    assert _relative(router.w_router_DE.grad, w32.grad) <= 1e-5
    rounding = _relative(x32.grad.bfloat16(), x32.grad)
    assert _relative(x_fast.grad, x32.grad) <= 1.1 * rounding + 1e-6
