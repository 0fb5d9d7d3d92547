"""The router's logits x @ W + b in float32 arithmetic, on bfloat16 tensor cores.

Shape legend: T tokens, D hidden, E routed experts.

The Router computes its logits in float32 so that routing does not flip with the dtype:
a bfloat16 run and its float32 reference must pick the same experts. A float32 GEMM runs
on the CUDA cores, though: on an H200 one 8192 x 2048 x 128 product takes ~0.1 ms, and a
training step has three (0.32 ms of a 5.3 ms fused-layer step), while the tensor cores
multiply bfloat16 with float32 accumulation far faster.

When x is bfloat16 the float32 arithmetic survives the move. A float32 has 24
significant bits and a bfloat16 8, so W splits exactly into three bfloat16 pieces,
W = W1 + W2 + W3 (`bfloat16_pieces`). Then x @ W = x @ [W1 W2 W3] summed over the
three column blocks. That is one bfloat16 GEMM with float32 output, whose products
(8 x 8 bits) are all exact and summed in the tensor cores' float32 accumulators. Those
keep fewer bits than IEEE float32 addition: on an H200 the logits of a 4096 x 2048 x 128
router were 1.4e-6 from exact (norm-wise), cuBLAS's float32 GEMM's 2.8e-7, and the worst
logit 5.7e-6 of its token's logit spread: inside the check's TIE_MARGIN (5e-5 of the
spread), which is what keeps a near-tied routing choice from failing a bfloat16 run
against its float32 reference.

The backward splits dL (float32) the same way:
- dW = x^T @ [dL1 dL2 dL3]: exact products again.
- dx = dL @ W^T from the two largest pieces of each side: relative error ~2^-16, far
  below the rounding of dx to bfloat16.

Used where x is bfloat16 on CUDA and torch's matmul takes `out_dtype` (torch >= 2.8),
bar a few tokens (`logits_kernel.few_token_logits`, forward and backward, takes those) and
inference calls of up to about a thousand tokens (`logits_kernel.piece_logits`: these
pieces in one Triton launch); elsewhere the Router keeps the plain float32 GEMM. The
paths compute the same function.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

PIECES = 3  # bfloat16 pieces that hold every bit of a float32


def bfloat16_pieces(t: torch.Tensor, pieces: int = PIECES) -> list[torch.Tensor]:
    """float32 `t` as `pieces` bfloat16 tensors, largest first, whose float32 sum is `t`
    (exactly for three pieces, bar values under bfloat16's smallest subnormal)."""
    rest = t.float()
    out = [rest.to(torch.bfloat16)]
    for _ in range(pieces - 1):
        rest = rest - out[-1]  # exact: float32 minus a bfloat16 promoted to float32
        out.append(rest.to(torch.bfloat16))
    return out


@dataclass(frozen=True)
class WeightPieces:
    """The router weight's bfloat16 pieces as `SplitLogits` multiplies them, made once
    per weight (the Router keeps them across calls): [W1 W2 W3] (D x 3E) for the
    logits, and [W1 W2 W1]^T (3E x D) for dx."""

    side_by_side_D3E: torch.Tensor
    for_input_grad_3ED: torch.Tensor


def weight_pieces(w_DE: torch.Tensor) -> WeightPieces:
    """`WeightPieces` of the float32 router weight `w_DE`."""
    w1, w2, w3 = bfloat16_pieces(w_DE.detach())
    return WeightPieces(
        torch.cat([w1, w2, w3], dim=1), torch.cat([w1, w2, w1], dim=1).t().contiguous()
    )


def sum_pieces(p_NSM: torch.Tensor, pieces: int = PIECES) -> torch.Tensor:
    """N x M float32: the `pieces` M-wide column blocks of `p_NSM` added, first to last
    (`p_NSM` itself for one)."""
    if pieces == 1:
        return p_NSM
    N, width = p_NSM.shape
    return p_NSM.view(N, pieces, width // pieces).sum(dim=1)


@functools.cache
def _mm_takes_out_dtype(device: torch.device) -> bool:
    try:
        a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):  # NotImplementedError (CPU) is a RuntimeError
        return False


def matmul_float32(a_NK: torch.Tensor, b_KM: torch.Tensor) -> torch.Tensor:
    """bfloat16 a @ b with float32 output: tensor cores where torch offers it (CUDA), else
    the same exact products summed by a float32 GEMM (how the CPU tests run this path)."""
    if _mm_takes_out_dtype(a_NK.device):
        return torch.mm(a_NK, b_KM, out_dtype=torch.float32)
    return torch.mm(a_NK.float(), b_KM.float())


def tensor_core_path(x_TD: torch.Tensor) -> bool:
    """Whether `x_TD` takes the bfloat16 tensor-core path (module docstring)."""
    return (
        x_TD.dtype == torch.bfloat16
        and x_TD.device.type == "cuda"
        and _mm_takes_out_dtype(x_TD.device)
    )


class SplitLogits(torch.autograd.Function):
    """The products x_TD @ [W1 W2 W3] side by side (T x 3E float32), from bfloat16 x_TD,
    the float32 w_DE and its `WeightPieces` (kept by the caller across calls): the
    logits less the bias are their `sum_pieces`. The three blocks are only ever summed
    (by `sum_pieces`, or by the router's top-k kernel), so each gets the logits'
    gradient, and the backward reads the first."""

    @staticmethod
    def forward(ctx, x_TD, w_DE, pieces: WeightPieces):
        ctx.save_for_backward(x_TD)
        ctx.pieces = pieces
        return matmul_float32(x_TD, pieces.side_by_side_D3E)

    @staticmethod
    def backward(ctx, grad_T3E):
        (x_TD,) = ctx.saved_tensors
        E = grad_T3E.shape[1] // PIECES
        g1, g2, g3 = bfloat16_pieces(grad_T3E[:, :E])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # dL1 W1 + dL1 W2 + dL2 W1: every product above 2^-16 of the largest.
            grad_x = torch.mm(torch.cat([g1, g1, g2], 1), ctx.pieces.for_input_grad_3ED)
        if ctx.needs_input_grad[1]:
            grad_w = sum_pieces(matmul_float32(x_TD.t(), torch.cat([g1, g2, g3], 1)))
        return grad_x, grad_w, None
