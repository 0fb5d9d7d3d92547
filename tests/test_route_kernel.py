"""The router conventions as one Triton kernel (moebench.route_kernel) against
`routing.route`: choices, gates, probabilities and gradients. Runs on CUDA, or on CPU in
Triton's interpreter (TRITON_INTERPRET=1); skipped without either.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from moebench.case import LayerShape
from moebench.routing import kernel_route_applies, route
from tests.conftest import KERNEL_DEVICE, needs_kernels

CONVENTIONS = [
    # LayerShape's router fields: Mixtral, Qwen3, OLMoE, DeepSeek-V3 shapes and edges
    {"num_experts": 8, "top_k": 2},
    {"num_experts": 128, "top_k": 8},
    {"num_experts": 64, "top_k": 8, "norm_topk_prob": False},
    {"num_experts": 6, "top_k": 6, "routed_scaling": 2.5},  # every expert
    {"num_experts": 5, "top_k": 1, "norm_topk_prob": False},  # one expert, odd count
    {"num_experts": 300, "top_k": 4},  # not a power of two, wide
    {"num_experts": 512, "top_k": 32},  # many slots: the backward's widest slot x expert match
    # DeepSeek-V3: sigmoid, correction bias, the best 4 of 8 groups, scaled
    {"num_experts": 256, "top_k": 8, "scoring": "sigmoid", "correction_bias": True,
     "n_groups": 8, "topk_groups": 4, "routed_scaling": 2.5},
    # sigmoid without groups, odd count, raw gates
    {"num_experts": 6, "top_k": 2, "scoring": "sigmoid", "correction_bias": True,
     "norm_topk_prob": False},
    # softmax with groups; one expert per group (its "two best" are one, so the limit
    # only reaches the kernel's other branch and changes no choice)
    {"num_experts": 32, "top_k": 4, "n_groups": 8, "topk_groups": 2},
    {"num_experts": 16, "top_k": 3, "n_groups": 16, "topk_groups": 5},
    {"num_experts": 16, "top_k": 2, "n_groups": 4, "topk_groups": 1, "scoring": "sigmoid"},
]  # fmt: skip


def _shape(convention: dict) -> LayerShape:
    return LayerShape(64, 32, **{"num_experts": 8, "top_k": 2, **convention})


def _correction(shape: LayerShape) -> torch.Tensor | None:
    """A correction bias as large as the scores' spread, so it changes choices."""
    if not shape.correction_bias:
        return None
    generator = torch.Generator().manual_seed(shape.num_experts)
    return (torch.rand(shape.num_experts, generator=generator) * 0.5).to(KERNEL_DEVICE)


def _logits(tokens: int, experts: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, experts, generator=generator) * 2).to(KERNEL_DEVICE)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a64 - b64).norm() / b64.norm())


@needs_kernels
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("tokens", [1, 37])
def test_kernel_routes_as_route_does(convention, tokens):
    from moebench.route_kernel import route_top_k

    shape = _shape(convention)
    experts, correction_E = shape.num_experts, _correction(shape)
    logits_TE = _logits(tokens, experts, seed=experts + shape.top_k)
    # the logits as three parts and a bias, as the Router hands them over
    bias_E = torch.linspace(-1, 1, experts, device=KERNEL_DEVICE)
    parts_T3E = torch.cat([logits_TE * 0.5, logits_TE * 0.25, logits_TE * 0.25 - bias_E], 1)
    gate_TK, ids_TK, probs_TE = route_top_k(
        parts_T3E, 3, bias_E, shape, torch.float32, correction_E
    )
    want_gate_TK, want_ids_TK, want_probs_TE = route(logits_TE, shape, correction_E)
    assert ids_TK.dtype == torch.int64 and torch.equal(ids_TK, want_ids_TK)
    assert torch.allclose(gate_TK, want_gate_TK, rtol=1e-5, atol=1e-7)
    assert torch.allclose(probs_TE, want_probs_TE, rtol=1e-5, atol=1e-7)
    if KERNEL_DEVICE == "cuda":  # the gates in the tokens' dtype, as the Router returns them
        zero_E = torch.zeros(experts, device=KERNEL_DEVICE)
        gate16_TK = route_top_k(logits_TE, 1, zero_E, shape, torch.bfloat16, correction_E)[0]
        assert gate16_TK.dtype == torch.bfloat16
        assert torch.allclose(
            gate16_TK.float(), want_gate_TK.to(torch.bfloat16).float(), rtol=8e-3, atol=0
        )


def test_conventions_change_choices():
    """The correction bias and the group limit each choose other experts than plain top-k
    of the scores would, on these logits: the cases above test something."""
    for convention in CONVENTIONS:
        shape = _shape(convention)
        per_group = shape.num_experts // shape.n_groups
        if (shape.scoring != "sigmoid" and shape.n_groups == 1) or per_group == 1:
            continue
        logits_TE = _logits(37, shape.num_experts, seed=shape.num_experts + shape.top_k).cpu()
        correction_E = _correction(shape)
        correction_E = None if correction_E is None else correction_E.cpu()
        chosen = route(logits_TE, shape, correction_E)[1]
        plain = torch.sigmoid(logits_TE) if shape.scoring == "sigmoid" else logits_TE
        assert not torch.equal(chosen, plain.topk(shape.top_k).indices), convention


@needs_kernels
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_kernel_gradients_are_routes(convention):
    from moebench.route_kernel import route_top_k

    shape = _shape(convention)
    experts, top_k, correction_E = shape.num_experts, shape.top_k, _correction(shape)
    logits_TE = _logits(23, experts, seed=1)
    generator = torch.Generator().manual_seed(2)
    grad_gate_TK = torch.randn(23, top_k, generator=generator).to(KERNEL_DEVICE)
    grad_probs_TE = torch.randn(23, experts, generator=generator).to(KERNEL_DEVICE)
    ours = logits_TE.clone().requires_grad_(True)
    want = logits_TE.clone().requires_grad_(True)
    zero_E = torch.zeros(experts, device=KERNEL_DEVICE)
    # two parts: each gets the logits' gradient
    gate_TK, _, probs_TE = route_top_k(
        torch.cat([ours, ours], 1) * 0.5, 2, zero_E, shape, torch.float32, correction_E
    )
    want_gate_TK, _, want_probs_TE = route(want, shape, correction_E)
    ((gate_TK * grad_gate_TK).sum() + (probs_TE * grad_probs_TE).sum()).backward()
    ((want_gate_TK * grad_gate_TK).sum() + (want_probs_TE * grad_probs_TE).sum()).backward()
    assert _relative(ours.grad, want.grad) <= 1e-5
    # through the gates alone too (the layer's loss does not use the probabilities)
    ours.grad = want.grad = None
    route_top_k(ours, 1, zero_E, shape, torch.float32, correction_E)[0].backward(grad_gate_TK)
    route(want, shape, correction_E)[0].backward(grad_gate_TK)
    if want.grad.norm() > 0:  # a renormalised single gate is 1: no gradient at all
        assert _relative(ours.grad, want.grad) <= 1e-5
    else:
        assert float(ours.grad.abs().max()) <= 1e-6
    # through the probabilities alone (an auxiliary loss's path: no gates' gradient)
    ours.grad = want.grad = None
    route_top_k(ours, 1, zero_E, shape, torch.float32, correction_E)[2].backward(grad_probs_TE)
    route(want, shape, correction_E)[2].backward(grad_probs_TE)
    assert _relative(ours.grad, want.grad) <= 1e-5


@needs_kernels
@pytest.mark.parametrize(
    ("tokens", "hidden", "experts"), [(1, 2048, 128), (16, 300, 8), (5, 4096, 60)]
)
def test_few_token_logits_are_float32_logits(tokens, hidden, experts):
    from moebench.logits_kernel import FEW_TOKENS_ROWS, few_token_logits

    generator = torch.Generator().manual_seed(tokens)
    x_TD = torch.randn(tokens, hidden, generator=generator).to(KERNEL_DEVICE)
    w_DE = (torch.randn(hidden, experts, generator=generator) * 0.02).to(KERNEL_DEVICE)
    parts_TSE, parts = few_token_logits(x_TD, w_DE)
    assert parts == -(-hidden // FEW_TOKENS_ROWS) and parts_TSE.shape == (tokens, parts * experts)
    logits_TE = parts_TSE.view(tokens, parts, experts).sum(dim=1)
    exact_TE = x_TD.double() @ w_DE.double()
    assert _relative(logits_TE, exact_TE) <= 1e-6


@needs_kernels
@pytest.mark.parametrize(
    ("tokens", "hidden", "experts", "dtype"),
    [(1, 2048, 64, torch.bfloat16), (3, 600, 8, torch.float32), (16, 300, 60, torch.float16)],
)
def test_few_token_logits_gradients_are_float32_gradients(tokens, hidden, experts, dtype):
    """Each part's own gradient reaches its own slice of D (the parts are not assumed to be
    only summed), in float32 sums; dx in x's dtype, dW in float32, and either alone."""
    from moebench.logits_kernel import FEW_TOKENS_ROWS, few_token_logits

    generator = torch.Generator().manual_seed(tokens + hidden)
    x_TD = torch.randn(tokens, hidden, generator=generator).to(dtype)
    w_DE = torch.randn(hidden, experts, generator=generator) * 0.02
    x_ours = x_TD.to(KERNEL_DEVICE, copy=True).requires_grad_(True)
    w_ours = w_DE.to(KERNEL_DEVICE, copy=True).requires_grad_(True)
    parts_TSE, parts = few_token_logits(x_ours, w_ours)
    assert parts_TSE.requires_grad and parts == -(-hidden // FEW_TOKENS_ROWS) > 1
    grad_TSE = torch.randn(parts_TSE.shape, generator=generator)
    parts_TSE.backward(grad_TSE.to(KERNEL_DEVICE))
    # float64: part s is x[:, slice s] @ W[slice s]
    x64 = x_TD.double().requires_grad_(True)
    w64 = w_DE.double().requires_grad_(True)
    exact_TSE = torch.cat(
        [
            x64[:, first : first + FEW_TOKENS_ROWS] @ w64[first : first + FEW_TOKENS_ROWS]
            for first in range(0, hidden, FEW_TOKENS_ROWS)
        ],
        1,
    )
    exact_TSE.backward(grad_TSE.double())
    assert x_ours.grad.dtype == dtype and w_ours.grad.dtype == torch.float32
    assert _relative(w_ours.grad, w64.grad) <= 1e-6
    rounding = _relative(x64.grad.to(dtype), x64.grad) if dtype != torch.float32 else 1e-6
    # Triton's interpreter truncates float32 to bfloat16 (a GPU rounds to nearest)
    truncates = KERNEL_DEVICE == "cpu" and dtype == torch.bfloat16
    assert _relative(x_ours.grad, x64.grad) <= (2.2 if truncates else 1.1) * rounding
    # one side alone, as a frozen router or a detached input asks
    w_alone = w_DE.to(KERNEL_DEVICE, copy=True).requires_grad_(True)
    few_token_logits(x_TD.to(KERNEL_DEVICE), w_alone)[0].backward(grad_TSE.to(KERNEL_DEVICE))
    assert torch.equal(w_alone.grad, w_ours.grad)
    x_alone = x_TD.to(KERNEL_DEVICE, copy=True).requires_grad_(True)
    few_token_logits(x_alone, w_DE.to(KERNEL_DEVICE))[0].backward(grad_TSE.to(KERNEL_DEVICE))
    assert torch.equal(x_alone.grad, x_ours.grad)


@needs_kernels
@pytest.mark.parametrize(
    ("tokens", "hidden", "experts", "max_parts"),
    [
        (64, 2048, 64, 16),
        (5, 200, 8, 16),
        (33, 7168, 256, 16),
        (17, 4096, 60, 3),
        (1000, 2048, 128, None),  # 16 token blocks, the last one short; D in 2 slices
        (300, 7168, 256, 1),  # one part asked: 7 slices all the same (PIECE_MAX_SLICE)
    ],
)
def test_piece_logits_are_float32_logits(tokens, hidden, experts, max_parts):
    """The tensor cores' three pieces per slice of D, summed, are the float32 logits
    (hidden not a multiple of a step, experts not of a block, tokens not of a tile)."""
    if KERNEL_DEVICE == "cpu":
        pytest.skip("Triton's interpreter computes in numpy, which has no bfloat16 dot")
    from moebench.logits_kernel import piece_logits, piece_tiles
    from moebench.router_logits import matmul_float32, sum_pieces, weight_pieces

    generator = torch.Generator().manual_seed(tokens + hidden)
    x_TD = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
    w_DE = torch.randn(hidden, experts, generator=generator) * 0.02
    pieces = weight_pieces(w_DE.to(KERNEL_DEVICE))
    parts_TSE, parts = piece_logits(
        x_TD.to(KERNEL_DEVICE), pieces.side_by_side_D3E, max_parts=max_parts
    )
    assert parts == piece_tiles(tokens, hidden, experts, max_parts)[3] > 1
    assert parts_TSE.shape == (tokens, parts * experts)
    logits_TE = parts_TSE.view(tokens, parts, experts).sum(dim=1)
    exact_TE = x_TD.double() @ w_DE.double()
    # as close as the path it stands in for: the same pieces through cuBLAS
    cublas_TE = sum_pieces(matmul_float32(x_TD.to(KERNEL_DEVICE), pieces.side_by_side_D3E))
    ours, theirs = _relative(logits_TE, exact_TE), _relative(cublas_TE, exact_TE)
    assert ours <= max(2e-6, 1.5 * theirs), (ours, theirs)
    one_piece_TE = x_TD.double() @ w_DE.to(torch.bfloat16).double()
    assert _relative(one_piece_TE, exact_TE) > 1e-4  # the check tells the pieces apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bfloat16 dots)")
def test_router_takes_piece_logits_at_inference_and_keeps_gradients_in_training():
    """At 32 tokens the Router's inference logits come from `piece_logits` and choose
    what its cuBLAS path chooses; in a training step (the router weight a Parameter)
    the logits stay differentiable, through the cuBLAS path."""
    from moebench import logits_kernel
    from moebench.routing import Router

    shape = LayerShape(2048, 768, 64, 8)
    generator = torch.Generator().manual_seed(3)
    router = Router(
        torch.randn(2048, 64, generator=generator) * 0.02, torch.zeros(64), shape
    ).cuda()
    x_TD = torch.randn(32, 2048, generator=generator).to("cuda", torch.bfloat16)
    calls = []
    rule = logits_kernel.piece_logits

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return rule(*args, **kwargs)

    logits_kernel.piece_logits = counted
    try:
        with torch.no_grad():
            _, ids_TK, probs_TE = router(x_TD)
        assert calls == [(32, 2048)]
        gate_TK, train_ids_TK, train_probs_TE = router(x_TD)  # autograd records
        assert calls == [(32, 2048)] and gate_TK.requires_grad
        assert torch.equal(ids_TK, train_ids_TK)
        assert _relative(probs_TE, train_probs_TE) <= 1e-5
        gate_TK.float().sum().backward()
        assert router.w_router_DE.grad is not None
    finally:
        logits_kernel.piece_logits = rule


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_router_takes_piece_logits_where_it_was_faster_than_cublas():
    """The H200's Router (NOTES.md of the fused layer, version 21): the pieces' kernel
    beat cuBLAS graphed at 64 and 256 tokens of width 2048-4096 and 64 of 7168, and
    un-graphed at 1024 of 2048 (host-bound); it lost at 256 of 7168 and from 1024 tokens
    of 4096."""
    from moebench.logits_kernel import takes_piece_logits

    def takes(tokens: int, hidden: int, experts: int, dtype=torch.bfloat16) -> bool:
        return takes_piece_logits(torch.empty(tokens, hidden, dtype=dtype), experts)

    # (tokens, hidden, experts): OLMoE-1B-7B, Qwen3-30B-A3B, Mixtral-8x7B, DeepSeek-V3
    faster = [(8, 2048, 64), (64, 2048, 64), (256, 2048, 128), (1024, 2048, 64),
              (1024, 2048, 128), (64, 4096, 8), (256, 4096, 8), (8, 7168, 256),
              (64, 7168, 256)]  # fmt: skip
    slower = [(1024, 4096, 8), (256, 7168, 256), (4096, 2048, 64), (8192, 2048, 128)]
    assert all(takes(*point) for point in faster)
    assert not any(takes(*point) for point in slower)
    assert takes(4, 7168, 256)  # the few-token kernel stops at 2 there
    assert not any(takes(t, 2048, 64) for t in (1, 4))  # the few-token kernel's
    assert not takes(32, 2048, 64, torch.float16)  # no exact pieces there
    assert not takes(32, 2048, 64, torch.float32)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize(
    ("tokens", "hidden", "experts", "max_parts", "parts"),
    [
        (64, 2048, 64, None, 16),  # OLMoE-1B-7B, one block of tokens: 16 slices of 128
        (1024, 2048, 64, None, 4),  # 16 x 2 blocks of tokens x experts: 4 slices
        (8192, 2048, 128, None, 2),  # 128 x 4 blocks: no slicing wanted, 2048 rows cut
        (256, 7168, 256, None, 7),  # 4 slices wanted, 7 for PIECE_MAX_SLICE
        (300, 7168, 256, 1, 7),
        (5, 200, 8, 16, 4),  # slices of whole steps: 4 of 64 rows for 200
        (17, 4096, 60, 3, 4),
    ],
)
def test_piece_tiles_slice_d_into_whole_steps_of_bounded_length(
    tokens, hidden, experts, max_parts, parts
):
    from moebench.logits_kernel import PIECE_BLOCK_D, PIECE_MAX_SLICE, piece_tiles

    block_t, block_e, slice_d, got = piece_tiles(tokens, hidden, experts, max_parts)
    assert got == parts
    assert slice_d % PIECE_BLOCK_D == 0 and slice_d <= PIECE_MAX_SLICE
    assert (parts - 1) * slice_d < hidden <= parts * slice_d  # no empty slice
    assert 16 <= block_t <= 64 and block_t >= min(tokens, 64) and block_e in (16, 32)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_router_takes_the_few_token_kernel_only_where_it_was_faster():
    """The H200's Router, graphed (NOTES.md of the fused layer, version 11): the kernel
    beat cuBLAS at 1-4 tokens of width 2048-4096 and 1-2 of 7168, and lost at 8 and 16
    tokens everywhere and at 4 of 7168."""
    from moebench.logits_kernel import FEW_TOKENS, takes_few_token_logits

    faster = [(1, 2048), (4, 2048), (4, 4096), (1, 7168), (2, 7168)]
    slower = [(8, 2048), (16, 2048), (16, 4096), (4, 7168), (8, 7168)]
    assert all(takes_few_token_logits(t, d) for t, d in faster)
    assert not any(takes_few_token_logits(t, d) for t, d in slower)
    assert all(t <= FEW_TOKENS for t, _ in faster)  # the kernel computes them


def test_kernel_route_applies_on_cuda_to_what_it_computes():
    on_cuda = SimpleNamespace(device=torch.device("cuda"))
    on_cpu = torch.zeros(1, 8)
    base = LayerShape(64, 32, 8, 2)
    has_triton = importlib.util.find_spec("triton") is not None
    sigmoid = replace(base, scoring="sigmoid", correction_bias=True)
    grouped = LayerShape(64, 32, 16, 2, n_groups=4, topk_groups=2)
    for shape in (base, sigmoid, grouped):
        assert kernel_route_applies(shape, on_cuda) == has_triton, shape
        assert not kernel_route_applies(shape, on_cpu), shape
    # group-limited selection splits the row in power-of-two groups
    odd_groups = LayerShape(64, 32, 12, 2, n_groups=4, topk_groups=2)
    narrow_groups = LayerShape(64, 32, 8, 2, n_groups=4, topk_groups=2)  # row of 16 lanes
    too_wide = LayerShape(64, 32, 2048, 2)
    for shape in (odd_groups, narrow_groups, too_wide):
        assert not kernel_route_applies(shape, on_cuda), shape
    # every group kept: no limit, any count
    assert kernel_route_applies(replace(odd_groups, topk_groups=4), on_cuda) == has_triton


def test_router_keeps_its_torch_path_when_triton_does_not_import(monkeypatch):
    import sys

    import moebench
    from moebench import routing

    monkeypatch.setattr(routing.importlib.util, "find_spec", lambda name: object())
    for name in ("route_kernel", "logits_kernel"):  # their imports fail
        monkeypatch.setitem(sys.modules, f"moebench.{name}", None)
        monkeypatch.delattr(moebench, name, raising=False)
    routing.route_kernels.cache_clear()
    routing.logits_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="Triton did not import"):
            assert routing.route_kernels() is None
        with pytest.warns(UserWarning, match="Triton did not import"):
            assert routing.logits_kernels() is None
        on_cuda = SimpleNamespace(device=torch.device("cuda"))
        assert not kernel_route_applies(LayerShape(64, 32, 8, 2), on_cuda)
    finally:
        routing.route_kernels.cache_clear()
        routing.logits_kernels.cache_clear()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize(
    ("switch", "rule", "args"),
    [
        ("few-token-logits", "takes_few_token_logits", (1, 2048)),
        ("piece-logits", "takes_piece_logits", (torch.empty(64, 2048, dtype=torch.bfloat16), 64)),
    ],
)
def test_host_profile_switches_a_router_kernel_in_turns(monkeypatch, switch, rule, args):
    """`scripts/host_profile.py --ab few-token-logits` (or `piece-logits`): off, the
    Router's rule refuses every call; on, it is the rule itself; both sides alike, the
    rule restored after."""
    import runpy
    from pathlib import Path

    from moebench import logits_kernel

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    original = getattr(logits_kernel, rule)
    assert original(*args)  # a call the kernel takes
    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "host_profile.py"))
    seen: list[bool] = []
    text = script["switch_turns"](
        lambda: seen.append(getattr(logits_kernel, rule)(*args)),
        calls=3,
        switch=switch,
        rounds=4,
    )
    assert text.startswith(f"{switch} off ") and " on " in text
    assert seen.count(False) == seen.count(True) > 0
    assert getattr(logits_kernel, rule) is original
