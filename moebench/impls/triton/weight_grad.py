"""Expert weight gradients when each expert has few rows: a Triton kernel that writes
each gradient tile once, from its expert's rows.

Shape legend: E routed experts, P padded rows (the forward's `Alignment`), M and N the
gradient's two widths (2F x D for gate|up, F x D for down).

dW[e] = a[rows of e]^T @ b[rows of e] is an outer product of a handful of rows when an
expert sees few tokens (DeepSeek-V3 at 64 tokens: 512 assignments over 256 experts),
so its cost is writing E x M x N, not the FLOPs: 22.5 GB for DeepSeek-V3's two
gradients, written by torch's grouped GEMM (CUTLASS) at 3.0 TB/s on an H200 (NOTES.md,
version 6). Here one program owns one BLOCK_M x BLOCK_N tile of one expert's gradient:
it sums its expert's rows BLOCK_R at a time (none for an expert with no rows: its tile
is zeros) and stores the tile once, so the kernel is one streaming write.

Where it runs: up to `FEW_ROWS_BLOCK_M` rows per block of the forward (a few dozen rows
per expert on average, `tuning.block_m_for`) the tuner times these tiles and torch's
grouped GEMM side by side and keeps the faster for the shape and token bucket; above it
the FLOPs dominate and the grouped GEMM's tensor-core pipeline runs untimed. On an H200
(NOTES.md, version 7) the tiles wrote 4.0-4.7 TB/s at 16 rows a block, CUTLASS 3.0-3.7.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from moebench import fast_launch
from moebench.impls.triton import tuning

FEW_ROWS_BLOCK_M = 64
# The tuner's candidate that hands the gradient to torch's grouped GEMM instead.
GROUPED_GEMM = {"kernel": "grouped_mm"}


@triton.jit
def weight_grad_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    ends_ptr,
    M,
    N,
    stride_a_p,
    stride_b_p,
    stride_out_e,
    stride_out_m,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[e, m, n] = sum over rows r of expert e (ends[e - 1] <= r < ends[e]) of
    a[r, m] b[r, n], summed in float32; one program per (expert, M tile, N tile), N
    tiles fastest so that neighbouring programs write neighbouring memory."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_expert = tl.cdiv(M, BLOCK_M) * tiles_n
    pid = tl.program_id(0)
    expert = pid // tiles_per_expert
    tile = pid % tiles_per_expert
    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(ends_ptr + expert)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first in range(start, end, BLOCK_R):
        rows = first + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        rows64 = rows.to(tl.int64)[:, None]
        a = tl.load(
            a_ptr + rows64 * stride_a_p + offs_m[None, :],
            mask=row_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + rows64 * stride_b_p + offs_n[None, :],
            mask=row_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(a), b, acc)
    out_ptrs = (
        out_ptr
        + expert.to(tl.int64) * stride_out_e
        + offs_m.to(tl.int64)[:, None] * stride_out_m
        + offs_n[None, :]
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def candidates(block_m: int, grouped_gemm: bool) -> list[dict]:
    """Tile shapes worth timing where the forward's row blocks hold `block_m` rows: wide
    along N (the gradient's contiguous dimension) so that each program writes whole
    128-byte lines, summing up to `block_m` rows per step (an expert's run is a whole
    number of blocks). Then the grouped GEMM, if it can run: last, because in Triton's
    interpreter (tests) the first candidate is taken untimed."""
    if block_m <= 32:
        shapes = [(64, 256, 16, 4), (128, 128, 16, 4), (64, 128, 16, 4), (32, 256, 16, 4)]
        shapes += [(128, 256, 16, 8), (64, 256, 32, 4)]
    else:
        shapes = [(64, 256, 64, 8), (128, 128, 64, 8), (64, 128, 64, 4), (64, 256, 32, 4)]
        shapes += [(128, 256, 32, 8), (64, 256, 16, 4)]
    tiles = [
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_R": r, "num_warps": warps} for m, n, r, warps in shapes
    ]
    return tiles + ([GROUPED_GEMM] if grouped_gemm else [])


def launch(
    a_PM: torch.Tensor, b_PN: torch.Tensor, ends_E: torch.Tensor, out_EMN: torch.Tensor,
    config: dict,
) -> None:  # fmt: skip
    """out_EMN[e] <- a_PM[rows of e]^T @ b_PN[rows of e] (`weight_grad_kernel`)."""
    E, M, N = out_EMN.shape
    assert a_PM.stride(1) == 1 and b_PN.stride(1) == 1 and out_EMN.stride(2) == 1
    grid = (
        E * fast_launch.ceil_div(M, config["BLOCK_M"]) * fast_launch.ceil_div(N, config["BLOCK_N"]),
    )
    fast_launch.launch(
        weight_grad_kernel, grid,
        a_PM, b_PN, out_EMN, ends_E, M, N,
        a_PM.stride(0), b_PN.stride(0), out_EMN.stride(0), out_EMN.stride(1),
        BLOCK_R=config["BLOCK_R"], BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        num_warps=config["num_warps"],
    )  # fmt: skip


GroupedGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def expert_weight_grad(
    a_PM: torch.Tensor,
    b_PN: torch.Tensor,
    ends_E: torch.Tensor,
    block_m: int,
    tuning_key: str,
    grouped_gemm: GroupedGemm | None,
) -> torch.Tensor:
    """Per expert e: a_PM[rows of e]^T @ b_PN[rows of e], as E x M x N in a_PM's dtype
    (experts with no rows get zeros), from `weight_grad_kernel` or `grouped_gemm(a_PM,
    b_PN, ends_E)` (None where it cannot run), whichever `weight_grad_choice` picks."""
    config = weight_grad_choice(a_PM, b_PN, ends_E, block_m, tuning_key, grouped_gemm)
    return _run(a_PM, b_PN, ends_E, config, grouped_gemm)


def weight_grad_choice(
    a_PM: torch.Tensor,
    b_PN: torch.Tensor,
    ends_E: torch.Tensor,
    block_m: int,
    tuning_key: str,
    grouped_gemm: GroupedGemm | None,
) -> dict:
    """The path `expert_weight_grad` takes: GROUPED_GEMM above FEW_ROWS_BLOCK_M rows per
    block (untimed), else the faster of the kernel's tiles and the grouped GEMM for
    `tuning_key`, timed on first use and cached."""
    if block_m > FEW_ROWS_BLOCK_M and grouped_gemm is not None:
        return GROUPED_GEMM
    return tuning.TUNER.choose(
        a_PM.device,
        tuning_key,
        lambda: candidates(block_m, grouped_gemm is not None),
        lambda config: _run(a_PM, b_PN, ends_E, config, grouped_gemm),
        code=(weight_grad_kernel,),
        precompile=True,
    )


def _run(
    a_PM: torch.Tensor,
    b_PN: torch.Tensor,
    ends_E: torch.Tensor,
    config: dict,
    grouped_gemm: GroupedGemm | None,
) -> torch.Tensor:
    if config == GROUPED_GEMM:
        return grouped_gemm(a_PM, b_PN, ends_E)
    # allocated only on this path: the grouped GEMM brings its own (22.5 GB for
    # DeepSeek-V3's two gradients, which a spare buffer would add to the peak)
    out_EMN = a_PM.new_empty(ends_E.numel(), a_PM.shape[1], b_PN.shape[1])
    launch(a_PM, b_PN, ends_E, out_EMN, config)
    return out_EMN
