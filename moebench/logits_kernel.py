"""The Router's logits as Triton kernels, for CUDA: the logits less the bias as S float32
column blocks of E whose sum they are (the parts `route_kernel.route_top_k` adds).

Shape legend: T tokens, D hidden, E routed experts, S parts.

`few_token_logits_kernel`: for a few tokens (decode, and a training step of a few tokens),
x @ W in float32 on the CUDA cores, each program one slice of D and of E, written as S
partial sums that the top-k kernel adds: no GEMM library call (cuBLAS takes ~5.5 us for
one token's 2048 x 384 product), no separate reduction, no atomics (the same bits every
run). It computes up to FEW_TOKENS tokens; the Router takes it where it is the faster
path (`takes_few_token_logits`: up to 4 tokens, 2 at DeepSeek-V3's width). Under
autograd, `few_token_logits_backward_kernel` gives dx and dW in one launch.

`piece_logits_kernel`: `router_logits`' tensor-core path (the float32 weight as three
bfloat16 pieces) in one Triton launch, tiles of 64 tokens x 32 experts x a slice of D,
its slices written as parts as the few-token kernel's are: at inference the Router takes
it from where the few-token kernel stops to about a thousand tokens
(`takes_piece_logits`), where cuBLAS's GEMM cost more host time (about 60 us a call) or,
at a few tokens, a split-K reduction and a launch outside the dependent-launch chain.

Both launch with programmatic dependent launch where `dependent_launch.for_tokens`
says (Hopper, calls of at most 64 tokens), as the top-k kernel after them does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebench import dependent_launch
from moebench.dependent_launch import release_dependents, wait_for_predecessor
from moebench.fast_launch import ceil_div, launch, next_power_of_2

FEW_TOKENS = 16  # the most tokens few_token_logits_kernel computes (one program's rows)
FEW_TOKENS_ROWS = 256  # rows of W (a slice of D) per program: one part of the sum
# Where the kernel beats the cuBLAS path (the whole Router graphed on an H200, median:
# Qwen3-30B-A3B at 1 / 2 / 4 / 8 / 16 tokens 4.4 / 5.1 / 6.5 / 12.2 / 13.0 us against
# 7.4-7.6; DeepSeek-V3, D = 7168, 7.9 / 8.7 / 11.3 / 29.2 / 49.3 against 9.4-10.4;
# triton/NOTES.md, version 11): up to 4 tokens and 16384 token x hidden elements.
KERNEL_FASTER_TOKENS = 4
KERNEL_FASTER_ELEMENTS = 16384


def takes_few_token_logits(tokens: int, hidden: int) -> bool:
    """Whether the Router computes the logits of `tokens` x `hidden` inputs with
    `few_token_logits` (faster there) rather than its tensor-core GEMM."""
    return tokens <= KERNEL_FASTER_TOKENS and tokens * hidden <= KERNEL_FASTER_ELEMENTS


@triton.jit
def few_token_logits_kernel(
    x_ptr,
    w_ptr,
    parts_ptr,
    T,
    D,
    E,
    stride_x_t,
    BLOCK_T: tl.constexpr,
    SLICE_D: tl.constexpr,
    STEP_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PDL: tl.constexpr,
):
    """Part s (program 0), experts of block program 1: sum over the SLICE_D rows d of
    slice s of x[t, d] W[d, e], in float32, into parts[t, s E + e]."""
    wait_for_predecessor(PDL)
    release_dependents(PDL)
    part = tl.program_id(0)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_t = tl.arange(0, BLOCK_T)
    e_ok = offs_e < E
    t_ok = offs_t < T
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for first in tl.static_range(0, SLICE_D, STEP_D):
        offs_d = part * SLICE_D + first + tl.arange(0, STEP_D)
        d_ok = offs_d < D
        x = _x_tile(x_ptr, offs_t, offs_d, t_ok, d_ok, stride_x_t)
        w = tl.load(
            w_ptr + offs_d.to(tl.int64)[:, None] * E + offs_e[None, :],
            mask=d_ok[:, None] & e_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    num_parts = tl.num_programs(0)
    out = parts_ptr + offs_t[:, None] * (num_parts * E) + part * E + offs_e[None, :]
    tl.store(out, acc, mask=t_ok[:, None] & e_ok[None, :])


@triton.jit
def _x_tile(x_ptr, offs_t, offs_d, t_ok, d_ok, stride_x_t):
    """x[t, d] for the tokens offs_t and rows offs_d, in float32 (zero where masked):
    the few-token kernels' operand, forward and backward."""
    x_ptrs = x_ptr + offs_t[:, None] * stride_x_t + offs_d[None, :]
    return tl.load(x_ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)


def few_token_logits(x_TD: torch.Tensor, w_DE: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(parts_TSE, S): x_TD @ w_DE (float32) as S partial sums side by side, for at most
    FEW_TOKENS tokens (`few_token_logits_kernel`), differentiable in both where autograd
    records (`FewTokenLogits`)."""
    if torch.is_grad_enabled() and (x_TD.requires_grad or w_DE.requires_grad):
        parts_TSE = FewTokenLogits.apply(x_TD, w_DE)
        return parts_TSE, parts_TSE.shape[1] // w_DE.shape[1]
    return _few_token_logits(x_TD, w_DE.detach())


def _few_token_logits(x_TD: torch.Tensor, w_DE: torch.Tensor) -> tuple[torch.Tensor, int]:
    T, D = x_TD.shape
    E = w_DE.shape[1]
    assert T <= FEW_TOKENS and w_DE.dtype == torch.float32 and w_DE.is_contiguous()
    x_TD = x_TD.contiguous()
    block_t = 1 << max(0, (T - 1).bit_length())
    # Triton turns a sum of broadcast products with every side >= 16 into a dot, which on
    # float32 computes in TF32 (7e-4 off on an H200 at 16 tokens): 8 columns there.
    block_e = 16 if block_t < 16 else 8
    step_d = max(8, 4096 // (block_t * block_e))
    parts = ceil_div(D, FEW_TOKENS_ROWS)
    parts_TSE = torch.empty(T, parts * E, device=x_TD.device, dtype=torch.float32)
    pdl = dependent_launch.for_tokens(x_TD.device, T)
    launch(
        few_token_logits_kernel, (parts, ceil_div(E, block_e)),
        x_TD, w_DE, parts_TSE, T, D, E, x_TD.stride(0),
        BLOCK_T=block_t, SLICE_D=FEW_TOKENS_ROWS, STEP_D=min(step_d, FEW_TOKENS_ROWS),
        BLOCK_E=block_e, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )  # fmt: skip
    return parts_TSE, parts


@triton.jit
def few_token_logits_backward_kernel(
    grad_parts_ptr,
    x_ptr,
    w_ptr,
    grad_x_ptr,
    grad_w_ptr,
    T,
    D,
    E,
    stride_x_t,
    stride_grad_t,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SLICE_D: tl.constexpr,
    X_GRAD: tl.constexpr,
    W_GRAD: tl.constexpr,
):
    """Rows d of block program_id(0), in part s = d // SLICE_D of the forward: with g the
    gradient of part s (T x E), dx[t, d] = sum_e g[t, e] W[d, e] (if X_GRAD) and
    dW[d, e] = sum_t x[t, d] g[t, e] (if W_GRAD), in float32 on the CUDA cores."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    part = (tl.program_id(0) * BLOCK_D) // SLICE_D  # BLOCK_D divides SLICE_D
    offs_t = tl.arange(0, BLOCK_T)
    d_ok = offs_d < D
    t_ok = offs_t < T
    x = _x_tile(x_ptr, offs_t, offs_d, t_ok, d_ok, stride_x_t)
    grad_x = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for first in range(0, E, BLOCK_E):
        offs_e = first + tl.arange(0, BLOCK_E)
        e_ok = offs_e < E
        g = tl.load(
            grad_parts_ptr + offs_t[:, None] * stride_grad_t + part * E + offs_e[None, :],
            mask=t_ok[:, None] & e_ok[None, :],
            other=0.0,
        )
        w_offsets = offs_d.to(tl.int64)[:, None] * E + offs_e[None, :]
        if X_GRAD:
            w = tl.load(w_ptr + w_offsets, mask=d_ok[:, None] & e_ok[None, :], other=0.0)
            grad_x += tl.sum(g[:, None, :] * w[None, :, :], axis=2)
        if W_GRAD:
            grad_w = tl.sum(x[:, :, None] * g[:, None, :], axis=0)
            tl.store(grad_w_ptr + w_offsets, grad_w, mask=d_ok[:, None] & e_ok[None, :])
    if X_GRAD:
        out = grad_x_ptr + offs_t[:, None] * D + offs_d[None, :]
        tl.store(out, grad_x.to(grad_x_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


class FewTokenLogits(torch.autograd.Function):
    """`few_token_logits`'s parts (T x S E float32) from x_TD and the float32 w_DE, with
    both gradients from one launch (`few_token_logits_backward_kernel`). In a training
    step of a few tokens the tensor-core path's forward and backward took eleven torch
    ops and 0.59 ms of host on an H200's host (triton/NOTES.md, version 19), for a few
    MFLOP."""

    @staticmethod
    def forward(ctx, x_TD, w_DE):
        x_TD = x_TD.contiguous()
        ctx.save_for_backward(x_TD, w_DE)
        return _few_token_logits(x_TD, w_DE.detach())[0]

    @staticmethod
    def backward(ctx, grad_parts_TSE):
        x_TD, w_DE = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad
        T, D = x_TD.shape
        E = w_DE.shape[1]
        grad_parts_TSE = grad_parts_TSE.contiguous()
        grad_x = torch.empty_like(x_TD) if want_x else None
        grad_w = torch.empty_like(w_DE, memory_format=torch.contiguous_format) if want_w else None
        block_t = 1 << max(0, (T - 1).bit_length())
        block_d = 32
        # at most 2048 products a program (16 a thread), and one side of each sum under
        # 16, so that Triton keeps the float32 sums off TF32 dots (`_few_token_logits`)
        block_e = max(8, min(64, 2048 // (block_t * block_d)))
        launch(
            few_token_logits_backward_kernel, (ceil_div(D, block_d),),
            grad_parts_TSE, x_TD, w_DE, grad_x if want_x else x_TD,
            grad_w if want_w else w_DE, T, D, E, x_TD.stride(0), grad_parts_TSE.stride(0),
            BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_E=block_e, SLICE_D=FEW_TOKENS_ROWS,
            X_GRAD=want_x, W_GRAD=want_w, num_warps=4,
        )  # fmt: skip
        return grad_x, grad_w


PIECE_TOKENS = 64  # tokens of a program of piece_logits_kernel at most
PIECE_PARTS = 16  # slices of D the kernel's own choice makes at most
PIECE_PROGRAMS = 128  # programs over tokens, experts and slices that fill the card enough
PIECE_BLOCK_D = 64  # rows of W per step of a slice
# Rows of W a slice sums at most: the tensor cores' float32 sums drift with the length
# of a sum (on the H200 one slice of 7168 rows lost to cuBLAS's accuracy, slices of up
# to 1408 held it; triton/NOTES.md, version 21).
PIECE_MAX_SLICE = 1024
# Where the Router takes piece_logits, from `router_probe.py` on the H200
# (triton/NOTES.md, version 21): the Router graphed, pieces against cuBLAS, won at 64 and
# 256 tokens of width 2048-4096 and 64 of DeepSeek-V3's 7168 x 256 experts, lost at 256
# of those and from 1024 tokens of 4096 up; at 1024 tokens of 2048 it took 19 and 6 us
# off the host-bound un-graphed forwards of OLMoE-1B-7B and Qwen3-30B-A3B, for +-1 us on
# the device. At most tokens x hidden, and tokens x hidden x experts (the products):
PIECE_MAX_ELEMENTS = 1024 * 2048
PIECE_MAX_PRODUCTS = 1024 * 2048 * 128


@triton.jit
def piece_logits_kernel(
    x_ptr,
    pieces_ptr,
    parts_ptr,
    T,
    D,
    E,
    stride_x_t,
    slice_d,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PDL: tl.constexpr,
):
    """Part s (program 0), experts of block program 1, tokens of block program 2:
    x[t, d] (W1 + W2 + W3)[d, e] summed over the slice_d rows d of slice s, on the tensor
    cores (bfloat16 products, exact; summed in float32 accumulators), into
    parts[t, s E + e]."""
    wait_for_predecessor(PDL)
    release_dependents(PDL)
    part = tl.program_id(0)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    e_ok = offs_e < E
    t_ok = offs_t < T
    # W1's products apart from the two smaller pieces': the tensor cores align a sum's
    # terms to its largest and drop the bits below, so W2 and W3 summed into W1's
    # accumulator would lose what they are there for
    acc_big = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    acc_small = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    end = tl.minimum(part * slice_d + slice_d, D)
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_x_t
    for first in range(part * slice_d, end, BLOCK_D):
        offs_d = first + tl.arange(0, BLOCK_D)
        d_ok = offs_d < end
        x = tl.load(x_rows + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        w_rows = pieces_ptr + offs_d.to(tl.int64)[:, None] * (3 * E) + offs_e[None, :]
        w_ok = d_ok[:, None] & e_ok[None, :]
        acc_small = tl.dot(x, tl.load(w_rows + 2 * E, mask=w_ok, other=0.0), acc_small)
        acc_small = tl.dot(x, tl.load(w_rows + E, mask=w_ok, other=0.0), acc_small)
        acc_big = tl.dot(x, tl.load(w_rows, mask=w_ok, other=0.0), acc_big)
    num_parts = tl.num_programs(0)
    out = parts_ptr + offs_t.to(tl.int64)[:, None] * (num_parts * E) + part * E + offs_e[None, :]
    tl.store(out, acc_big + acc_small, mask=t_ok[:, None] & e_ok[None, :])


def takes_piece_logits(x_TD: torch.Tensor, experts: int) -> bool:
    """Whether the Router computes the logits of `x_TD` for `experts` experts with
    `piece_logits` where no gradient is recorded: bfloat16, more tokens than
    `takes_few_token_logits` takes, at most PIECE_MAX_ELEMENTS tokens x hidden and
    PIECE_MAX_PRODUCTS tokens x hidden x experts."""
    T, D = x_TD.shape
    return (
        x_TD.dtype == torch.bfloat16
        and T * D <= PIECE_MAX_ELEMENTS
        and T * D * experts <= PIECE_MAX_PRODUCTS
        and not takes_few_token_logits(T, D)
    )


def piece_tiles(
    T: int, D: int, E: int, max_parts: int | None = None, block_e: int = 32
) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_E, slice_d, parts) of `piece_logits_kernel` for T x D tokens and E
    experts: D cut into at most `max_parts` slices (default: as many as bring the programs
    to PIECE_PROGRAMS, at most PIECE_PARTS), and into more where a slice would pass
    PIECE_MAX_SLICE rows."""
    block_t = min(PIECE_TOKENS, max(16, next_power_of_2(T)))
    block_e = min(block_e, max(16, next_power_of_2(E)))
    if max_parts is None:
        blocks = ceil_div(T, block_t) * ceil_div(E, block_e)
        max_parts = max(1, min(PIECE_PARTS, PIECE_PROGRAMS // blocks))
    parts = max(max_parts, ceil_div(D, PIECE_MAX_SLICE))
    slice_d = ceil_div(ceil_div(D, parts), PIECE_BLOCK_D) * PIECE_BLOCK_D
    return block_t, block_e, slice_d, ceil_div(D, slice_d)


def piece_logits(
    x_TD: torch.Tensor,
    side_by_side_D3E: torch.Tensor,
    max_parts: int | None = None,
    block_e: int = 32,
    num_warps: int = 4,
    num_stages: int = 3,
) -> tuple[torch.Tensor, int]:
    """(parts_TSE, S): bfloat16 x_TD times the float32 router weight whose three
    bfloat16 pieces `side_by_side_D3E` holds (`router_logits.WeightPieces`), as S
    partial sums over slices of D (`piece_logits_kernel`, tiled by `piece_tiles`): the
    tensor-core path of `router_logits` in one launch, without cuBLAS's host time (about
    60 us a call on one H200's host) and, at a few tokens, its split-K reduction. Not
    differentiable (inference only)."""
    T, D = x_TD.shape
    E = side_by_side_D3E.shape[1] // 3
    assert x_TD.dtype == side_by_side_D3E.dtype == torch.bfloat16
    assert side_by_side_D3E.is_contiguous() and side_by_side_D3E.shape[0] == D
    x_TD = x_TD.contiguous()
    block_t, block_e, slice_d, parts = piece_tiles(T, D, E, max_parts, block_e)
    parts_TSE = torch.empty(T, parts * E, device=x_TD.device, dtype=torch.float32)
    pdl = dependent_launch.for_tokens(x_TD.device, T)
    launch(
        piece_logits_kernel, (parts, ceil_div(E, block_e), ceil_div(T, block_t)),
        x_TD, side_by_side_D3E, parts_TSE, T, D, E, x_TD.stride(0), slice_d,
        BLOCK_T=block_t, BLOCK_D=PIECE_BLOCK_D, BLOCK_E=block_e,
        PDL=pdl, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip
    return parts_TSE, parts
