"""The router's top-k as a Triton kernel, for CUDA: the router conventions of
`routing.route` in one pass over the logits' parts (`moebench.logits_kernel` computes
those).

Shape legend: T tokens, D hidden, E routed experts, K top_k, S parts whose sum is the
logits (column blocks of E side by side), G expert groups.

`route` in torch ops is about eight kernels for a softmax router (softmax, top-k and its
sort, gather, sum, divide, scale, the cast of the gates) and over thirty for DeepSeek-V3's
(sigmoid, correction bias, two top-k per group, group top-k, scatter, mask, ...). At
decode each is a few microseconds of a layer whose experts may take ten, and at 8192
tokens torch's top-k alone takes 0.05 ms on an H200. `route_top_k_kernel` does it all in
one pass: per row, it adds the S parts of the logits and the routing bias, takes the
scores in float32 (softmax, or a sigmoid per expert), adds the correction bias to the
selection scores, keeps the best groups by the sum of each group's two best if the
convention limits groups, runs K rounds of arg-max (each chosen expert set aside),
renormalises and scales the chosen scores, and writes the gates in the tokens' dtype.
The parts are the bfloat16 pieces' products (`router_logits`, S = 3), the per-slice sums
of `few_token_logits_kernel` or the plain float32 logits (S = 1).

It computes the function `route` computes (Mixtral, Qwen2/3, OLMoE, DeepSeek-V3 and the
base router), with its gradients (`route_top_k_backward_kernel`, one launch). The Router
uses it on CUDA where Triton is importable (`routing.kernel_route_applies`: group-limited
selection needs a power-of-two E; this module imports Triton); `route` stays the
definition and the path everywhere else. Choices agree with `route`'s except where two
scores tie to float32 rounding (the check's TIE_MARGIN); the slots come in descending
selection score, as torch.topk's sorted output.

The parts come from `moebench.logits_kernel` (a few tokens, or bfloat16 inference
calls of up to about a thousand), from `router_logits` (the tensor cores' three pieces
through cuBLAS) or are the plain float32 logits (S = 1).

The forward kernels launch with programmatic dependent launch where
`dependent_launch.for_tokens` says (Hopper, calls of at most 64 tokens), as the fused
layer's kernels after them do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebench import dependent_launch
from moebench.case import LayerShape
from moebench.dependent_launch import release_dependents, wait_for_predecessor
from moebench.fast_launch import ceil_div, launch


@triton.jit
def route_top_k_kernel(
    parts_ptr,
    bias_ptr,
    correction_ptr,
    gate_ptr,
    ids_ptr,
    probs_ptr,
    T,
    E,
    scaling,
    PARTS: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
    SIGMOID: tl.constexpr,
    CORRECTION: tl.constexpr,
    GROUPS: tl.constexpr,
    GROUPS_KEPT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PDL: tl.constexpr,
):
    """`route_rows` of the program's ROWS tokens."""
    wait_for_predecessor(PDL)
    release_dependents(PDL)
    route_rows(
        parts_ptr, bias_ptr, correction_ptr, gate_ptr, ids_ptr, probs_ptr, T, E, scaling,
        tl.program_id(0) * ROWS, PARTS, TOP_K, BLOCK_K, NORM, SIGMOID, CORRECTION, GROUPS,
        GROUPS_KEPT, ROWS, BLOCK_E,
    )  # fmt: skip


@triton.jit
def route_rows(
    parts_ptr, bias_ptr, correction_ptr, gate_ptr, ids_ptr, probs_ptr, T, E, scaling,
    first_t, PARTS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, SIGMOID: tl.constexpr, CORRECTION: tl.constexpr,
    GROUPS: tl.constexpr, GROUPS_KEPT: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """ROWS tokens from first_t: logits from PARTS parts and the bias; scores (softmax, or
    sigmoid per expert); the selection scores (plus the correction bias if CORRECTION),
    limited to the GROUPS_KEPT best of GROUPS groups by the sum of each group's two best
    if GROUPS > 1 (then BLOCK_E = E); TOP_K rounds of arg-max over them; the chosen
    experts' scores as gates, renormalised if NORM, times scaling."""
    offs_t = first_t + tl.arange(0, ROWS)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_t < T
    mask = row_ok[:, None] & (offs_e[None, :] < E)
    part_offsets = offs_t.to(tl.int64)[:, None] * (PARTS * E) + offs_e[None, :]
    logits = tl.load(bias_ptr + offs_e, mask=offs_e < E, other=0.0)[None, :]
    for part in tl.static_range(PARTS):
        logits += tl.load(parts_ptr + part_offsets + part * E, mask=mask, other=0.0)
    logits = tl.where(mask, logits, -float("inf"))
    offsets = offs_t.to(tl.int64)[:, None] * E + offs_e[None, :]
    if SIGMOID:
        scores = tl.where(mask, tl.sigmoid(logits), 0.0)
        probs = scores / tl.sum(scores, 1)[:, None]
    else:
        shifted = logits - tl.max(logits, 1)[:, None]
        exps = tl.where(mask, tl.exp(shifted), 0.0)
        probs = exps / tl.sum(exps, 1)[:, None]
        scores = probs
    tl.store(probs_ptr + offsets, probs, mask=mask)
    left = scores  # selection scores not yet chosen
    if CORRECTION:
        left = left + tl.load(correction_ptr + offs_e, mask=offs_e < E, other=0.0)[None, :]
    left = tl.where(mask, left, -float("inf"))
    if GROUPS > 1:
        PER_GROUP: tl.constexpr = BLOCK_E // GROUPS
        grouped = tl.reshape(left, (ROWS, GROUPS, PER_GROUP))
        offs_p = tl.arange(0, PER_GROUP)[None, None, :]
        best = tl.max(grouped, 2)
        group_score = best
        if PER_GROUP > 1:  # plus the second best (the best's first copy set aside)
            first = tl.min(tl.where(grouped == best[:, :, None], offs_p, PER_GROUP), 2)
            rest = tl.where(offs_p == first[:, :, None], -float("inf"), grouped)
            group_score = best + tl.max(rest, 2)
        offs_g = tl.arange(0, GROUPS)[None, :]
        kept = offs_g < 0
        for _ in tl.static_range(GROUPS_KEPT):
            top = tl.max(group_score, 1)
            chosen_g = tl.min(tl.where(group_score == top[:, None], offs_g, GROUPS), 1)
            taken = offs_g == chosen_g[:, None]
            kept = kept | taken
            group_score = tl.where(taken, -float("inf"), group_score)
        grouped = tl.where(kept[:, :, None], grouped, -float("inf"))
        left = tl.reshape(grouped, (ROWS, BLOCK_E))
    offs_k = tl.arange(0, BLOCK_K)
    gates = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((ROWS, BLOCK_K), dtype=tl.int64)
    for k in tl.static_range(TOP_K):
        best = tl.max(left, 1)
        # the lowest expert index among equal maxima
        chosen = tl.min(tl.where(left == best[:, None], offs_e[None, :], BLOCK_E), 1)
        hit = offs_e[None, :] == chosen[:, None]
        if CORRECTION:  # noqa: SIM108 (the gate is the score, not the selection score)
            gate = tl.sum(tl.where(hit, scores, 0.0), 1)
        else:  # the same value without a reduction per round (half the kernel's time)
            gate = best
        gates = tl.where(offs_k[None, :] == k, gate[:, None], gates)
        ids = tl.where(offs_k[None, :] == k, chosen.to(tl.int64)[:, None], ids)
        left = tl.where(hit, -float("inf"), left)
    if NORM:
        # sigmoid scores need not sum to anything: DeepSeek-V3's guard against 0 / 0
        gates = gates / (tl.sum(gates, 1)[:, None] + (1e-20 if SIGMOID else 0.0))
    gates = gates * scaling
    out_mask = row_ok[:, None] & (offs_k[None, :] < TOP_K)
    out_offsets = offs_t.to(tl.int64)[:, None] * TOP_K + offs_k[None, :]
    tl.store(gate_ptr + out_offsets, gates.to(gate_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out_offsets, ids, mask=out_mask)


def _launch(
    parts_TSE: torch.Tensor,
    parts: int,
    bias_E: torch.Tensor,
    shape: LayerShape,
    gate_dtype: torch.dtype,
    correction_E: torch.Tensor | None,
):
    T = parts_TSE.shape[0]
    parts_TSE = parts_TSE.contiguous()
    (gate_TK, ids_TK, probs_TE), args, constants = route_arguments(
        parts_TSE, parts, bias_E, shape, gate_dtype, correction_E
    )
    # A row per program up to a few thousand tokens (the reductions of one row are the
    # latency; rows of a program run one after another), one warp where a row fits.
    block_e = constants["BLOCK_E"]
    rows = 1 if T < 4096 else max(1, min(16, 2048 // block_e))
    pdl = dependent_launch.for_tokens(parts_TSE.device, T)
    launch(
        route_top_k_kernel, (ceil_div(T, rows),), *args, **constants, ROWS=rows, PDL=pdl,
        num_warps=1 if block_e <= 256 else 4, launch_pdl=pdl,
    )  # fmt: skip
    return gate_TK, ids_TK, probs_TE


def route_arguments(
    parts_TSE: torch.Tensor,
    parts: int,
    bias_E: torch.Tensor,
    shape: LayerShape,
    gate_dtype: torch.dtype,
    correction_E: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], tuple, dict]:
    """((gate_TK, ids_TK, probs_TE) to fill, `route_rows`' run-time arguments before
    first_t, its constexprs but ROWS) for contiguous parts_TSE: what `route_top_k_kernel`
    and any kernel that routes with `route_rows` launch with."""
    T, E = parts_TSE.shape[0], parts_TSE.shape[1] // parts
    K = shape.top_k
    device = parts_TSE.device
    gate_TK = torch.empty(T, K, device=device, dtype=gate_dtype)
    ids_TK = torch.empty(T, K, device=device, dtype=torch.int64)
    probs_TE = torch.empty(T, E, device=device, dtype=torch.float32)
    block_e = 1 << max(4, (E - 1).bit_length())
    groups = shape.n_groups if shape.groups_kept < shape.n_groups else 1
    assert groups == 1 or block_e == E, "group-limited routing needs a power-of-two E"
    correction = shape.correction_bias and correction_E is not None
    args = (
        parts_TSE, bias_E, correction_E if correction else bias_E, gate_TK, ids_TK, probs_TE,
        T, E, float(shape.routed_scaling),
    )  # fmt: skip
    constants = {
        "PARTS": parts, "TOP_K": K, "BLOCK_K": 1 << max(0, (K - 1).bit_length()),
        "NORM": shape.norm_topk_prob, "SIGMOID": shape.scoring == "sigmoid",
        "CORRECTION": correction, "GROUPS": groups, "GROUPS_KEPT": shape.groups_kept,
        "BLOCK_E": block_e,
    }  # fmt: skip
    return (gate_TK, ids_TK, probs_TE), args, constants


@triton.jit
def route_top_k_backward_kernel(
    grad_gate_ptr,
    grad_probs_ptr,
    ids_ptr,
    probs_ptr,
    parts_ptr,
    bias_ptr,
    grad_parts_ptr,
    E,
    scaling,
    PARTS: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    NORM: tl.constexpr,
    SIGMOID: tl.constexpr,
    GATE_GRAD: tl.constexpr,
    PROBS_GRAD: tl.constexpr,
):
    """Token program_id(0): the logits' gradient from the gates' (if GATE_GRAD) and the
    probabilities' (if PROBS_GRAD), into each of the PARTS blocks of grad_parts. With s
    the scores, c the scaling and S the sum of the K chosen scores (plus the guard; 1
    without renormalising), gate_k = c s_k / S, so ds_j = c (dgate_j - sum_k dgate_k
    s_k / S) / S for a chosen j, else 0. Softmax: the probabilities are the scores and
    dlogit = s (ds - sum(ds s)). Sigmoid: the scores again from the parts and the bias
    (as the forward adds them), p = s / sum(s) adds (dp - sum(dp p)) / sum(s) to ds, and
    dlogit = ds s (1 - s)."""
    t = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    probs = tl.load(probs_ptr + t * E + offs_e, mask=e_ok, other=0.0)
    parts_row = parts_ptr + t * (PARTS * E) + offs_e
    if SIGMOID:
        logits = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0)
        for part in tl.static_range(PARTS):
            logits += tl.load(parts_row + part * E, mask=e_ok, other=0.0)
        scores = tl.where(e_ok, tl.sigmoid(logits), 0.0)
    else:
        scores = probs
    grad_scores = tl.zeros((BLOCK_E,), dtype=tl.float32)
    if GATE_GRAD:
        offs_k = tl.arange(0, BLOCK_K)
        k_ok = offs_k < TOP_K
        ids = tl.load(ids_ptr + t * TOP_K + offs_k, mask=k_ok, other=-1)
        hit = ids[:, None] == offs_e[None, :]  # slot k chose expert e (padding slots none)
        grad_k = tl.load(grad_gate_ptr + t * TOP_K + offs_k, mask=k_ok, other=0.0)
        grad_k = grad_k.to(tl.float32) * scaling
        if NORM:
            chosen = tl.sum(tl.where(hit, scores[None, :], 0.0), 1)
            total = tl.sum(chosen, 0) + (1e-20 if SIGMOID else 0.0)
            grad_k = (grad_k - tl.sum(grad_k * chosen, 0) / total) / total
        grad_scores = tl.sum(tl.where(hit, grad_k[:, None], 0.0), 0)
    if PROBS_GRAD:
        grad_probs = tl.load(grad_probs_ptr + t * E + offs_e, mask=e_ok, other=0.0)
        if SIGMOID:
            inner = tl.sum(grad_probs * probs, 0)
            grad_scores += (grad_probs - inner) / tl.sum(scores, 0)
        else:
            grad_scores += grad_probs
    if SIGMOID:
        grad_logits = grad_scores * scores * (1 - scores)
    else:
        grad_logits = scores * (grad_scores - tl.sum(grad_scores * scores, 0))
    for part in tl.static_range(PARTS):
        tl.store(grad_parts_ptr + t * (PARTS * E) + part * E + offs_e, grad_logits, mask=e_ok)


class RouteTopK(torch.autograd.Function):
    """(gate_TK in gate_dtype, expert_ids_TK int64, probs_TE float32) from the logits'
    parts, the bias and the correction bias, as `route` computes them, differentiable in
    the gates and the probabilities (`route_top_k_backward_kernel`: one launch where
    torch ops took about sixteen, a third of a small training step's host time). Each
    part's gradient is the logits' gradient."""

    @staticmethod
    def forward(ctx, parts_TSE, parts, bias_E, shape, gate_dtype, correction_E):
        gate_TK, ids_TK, probs_TE = _launch(
            parts_TSE, parts, bias_E, shape, gate_dtype, correction_E
        )
        ctx.mark_non_differentiable(ids_TK)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        ctx.save_for_backward(ids_TK, probs_TE, parts_TSE, bias_E)
        ctx.shape, ctx.parts = shape, parts
        return gate_TK, ids_TK, probs_TE

    @staticmethod
    def backward(ctx, grad_gate_TK, _grad_ids, grad_probs_TE):
        ids_TK, probs_TE, parts_TSE, bias_E = ctx.saved_tensors
        if grad_gate_TK is None and grad_probs_TE is None:
            return None, None, None, None, None, None
        shape = ctx.shape
        T, E = probs_TE.shape
        K = shape.top_k
        block_k, block_e = 1 << max(0, (K - 1).bit_length()), 1 << max(4, (E - 1).bit_length())
        # The kernel holds a K x E slot-expert match per token: more warps where it is
        # large (top-k of tens of experts), so that it stays in registers.
        num_warps = 8 if block_k * block_e > 8192 else (1 if E <= 256 else 4)
        grad_parts_TSE = torch.empty_like(parts_TSE, memory_format=torch.contiguous_format)
        launch(
            route_top_k_backward_kernel, (T,),
            probs_TE if grad_gate_TK is None else grad_gate_TK.contiguous(),
            probs_TE if grad_probs_TE is None else grad_probs_TE.contiguous(),
            ids_TK, probs_TE, parts_TSE.contiguous(), bias_E, grad_parts_TSE,
            E, float(shape.routed_scaling),
            PARTS=ctx.parts, TOP_K=K, BLOCK_K=block_k, BLOCK_E=block_e,
            NORM=shape.norm_topk_prob, SIGMOID=shape.scoring == "sigmoid",
            GATE_GRAD=grad_gate_TK is not None, PROBS_GRAD=grad_probs_TE is not None,
            num_warps=num_warps,
        )  # fmt: skip
        return grad_parts_TSE, None, None, None, None, None


def route_top_k(
    parts_TSE: torch.Tensor,
    parts: int,
    bias_E: torch.Tensor,
    shape: LayerShape,
    gate_dtype: torch.dtype,
    correction_E: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route(logits_TE, shape, correction_E)` in one kernel (module docstring), the
    logits being the sum of the `parts` column blocks of parts_TSE plus bias_E, with the
    gates already in `gate_dtype`. Group-limited conventions need a power-of-two E
    (`routing.kernel_route_applies`)."""
    if not torch.is_grad_enabled():  # inference: the kernel without autograd's wrapping
        return _launch(parts_TSE, parts, bias_E, shape, gate_dtype, correction_E)
    return RouteTopK.apply(parts_TSE, parts, bias_E, shape, gate_dtype, correction_E)
