"""The softmax router convention (`routing.route`) as one Triton kernel, for CUDA.

Shape legend: T tokens, E routed experts, K top_k.

`route` in torch ops is about eight kernels (softmax, top-k and its sort, gather, sum,
divide, scale, the cast of the gates). At decode each is a few microseconds of a layer
whose experts may take ten, and at 8192 tokens torch's top-k alone takes 0.05 ms on an
H200. `softmax_top_k_kernel` does it all in one pass over the logits: per row, softmax
in float32, K rounds of arg-max (the chosen expert's probability set aside each round),
the renormalisation and scaling, the gates written in the tokens' dtype.

It computes the function `route` computes for the softmax conventions (Mixtral, Qwen2/3,
OLMoE and the base router), with its gradients (`SoftmaxTopK.backward`, torch ops). The
Router uses it on CUDA where Triton is importable (`routing.kernel_route_applies`; this
module imports Triton); `route` stays the definition and every other convention's path.
Choices agree with `route`'s except where two probabilities tie to float32 rounding (the
check's TIE_MARGIN); the slots come in descending probability, as torch.topk's sorted
output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebench.case import LayerShape


@triton.jit
def softmax_top_k_kernel(
    logits_ptr,
    gate_ptr,
    ids_ptr,
    probs_ptr,
    T,
    E,
    scaling,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """ROWS tokens: softmax over E logits, TOP_K rounds of arg-max, gates."""
    offs_t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_t < T
    mask = row_ok[:, None] & (offs_e[None, :] < E)
    offsets = offs_t.to(tl.int64)[:, None] * E + offs_e[None, :]
    logits = tl.load(logits_ptr + offsets, mask=mask, other=-float("inf"))
    shifted = logits - tl.max(logits, 1)[:, None]
    exps = tl.where(mask, tl.exp(shifted), 0.0)
    probs = exps / tl.sum(exps, 1)[:, None]
    tl.store(probs_ptr + offsets, probs, mask=mask)
    left = tl.where(mask, probs, -1.0)  # probabilities not yet chosen
    offs_k = tl.arange(0, BLOCK_K)
    gates = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((ROWS, BLOCK_K), dtype=tl.int64)
    for k in tl.static_range(TOP_K):
        best = tl.max(left, 1)
        # the lowest expert index among equal maxima
        chosen = tl.min(tl.where(left == best[:, None], offs_e[None, :], BLOCK_E), 1)
        gates = tl.where(offs_k[None, :] == k, best[:, None], gates)
        ids = tl.where(offs_k[None, :] == k, chosen.to(tl.int64)[:, None], ids)
        left = tl.where(offs_e[None, :] == chosen[:, None], -1.0, left)
    if NORM:
        gates = gates / tl.sum(gates, 1)[:, None]
    gates = gates * scaling
    out_mask = row_ok[:, None] & (offs_k[None, :] < TOP_K)
    out_offsets = offs_t.to(tl.int64)[:, None] * TOP_K + offs_k[None, :]
    tl.store(gate_ptr + out_offsets, gates.to(gate_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out_offsets, ids, mask=out_mask)


def _launch(logits_TE: torch.Tensor, shape: LayerShape, gate_dtype: torch.dtype):
    T, E = logits_TE.shape
    K = shape.top_k
    logits_TE = logits_TE.contiguous()
    gate_TK = torch.empty(T, K, device=logits_TE.device, dtype=gate_dtype)
    ids_TK = torch.empty(T, K, device=logits_TE.device, dtype=torch.int64)
    probs_TE = torch.empty_like(logits_TE)
    block_e = 1 << max(4, (E - 1).bit_length())
    rows = max(1, min(64, 2048 // block_e))
    softmax_top_k_kernel[(triton.cdiv(T, rows),)](
        logits_TE, gate_TK, ids_TK, probs_TE, T, E, float(shape.routed_scaling),
        TOP_K=K, BLOCK_K=1 << max(0, (K - 1).bit_length()), NORM=shape.norm_topk_prob,
        ROWS=rows, BLOCK_E=block_e, num_warps=4,
    )  # fmt: skip
    return gate_TK, ids_TK, probs_TE


class SoftmaxTopK(torch.autograd.Function):
    """(gate_TK in gate_dtype, expert_ids_TK int64, probs_TE float32) from float32
    logits, as `route` computes them for a softmax convention, differentiable in the
    gates and the probabilities."""

    @staticmethod
    def forward(ctx, logits_TE, shape, gate_dtype):
        gate_TK, ids_TK, probs_TE = _launch(logits_TE, shape, gate_dtype)
        ctx.mark_non_differentiable(ids_TK)
        ctx.save_for_backward(ids_TK, probs_TE)
        ctx.shape = shape
        return gate_TK, ids_TK, probs_TE

    @staticmethod
    def backward(ctx, grad_gate_TK, _grad_ids, grad_probs_TE):
        ids_TK, probs_TE = ctx.saved_tensors
        shape = ctx.shape
        grad_p_TE = torch.zeros_like(probs_TE)
        if grad_gate_TK is not None:
            # gate_k = c p_k / S (S = sum of the K chosen p, 1 without renormalising):
            # dp_j = c (dgate_j - sum_k dgate_k p_k / S) / S for the chosen j, else 0.
            grad_TK = grad_gate_TK.float() * shape.routed_scaling
            chosen_TK = probs_TE.gather(1, ids_TK)
            if shape.norm_topk_prob:
                total_T1 = chosen_TK.sum(dim=1, keepdim=True)
                share_TK = chosen_TK / total_T1
                grad_TK = (grad_TK - (grad_TK * share_TK).sum(1, keepdim=True)) / total_T1
            grad_p_TE.scatter_(1, ids_TK, grad_TK)
        if grad_probs_TE is not None:
            grad_p_TE = grad_p_TE + grad_probs_TE
        # through the softmax: dl = p (dp - sum_e dp_e p_e)
        inner_T1 = (grad_p_TE * probs_TE).sum(dim=1, keepdim=True)
        return probs_TE * (grad_p_TE - inner_T1), None, None


def softmax_top_k(
    logits_TE: torch.Tensor, shape: LayerShape, gate_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route(logits_TE, shape)` for a softmax convention in one kernel (module
    docstring), with the gates already in `gate_dtype`."""
    return SoftmaxTopK.apply(logits_TE, shape, gate_dtype)
