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
is zeros) and stores the tile once, so the kernel is one streaming write. On a Hopper
card the tuner also races a persistent form (PROGRAMS_PER_SM programs a multiprocessor
walking the tiles, each stored by TMA, so that one tile's store runs under the next
tile's loads and products): on an H100 at DeepSeek-V3's 1024 tokens (64 padded rows an
expert) the one-tile tiles wrote 2.5-2.6 TB/s against `zero_`'s 3.29, the persistent
ones 2.67-2.73 (NOTES.md, version 40, with what else was tried there).

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
from moebench.impls.triton import tma, tuning

FEW_ROWS_BLOCK_M = 64
# The tuner's candidate that hands the gradient to torch's grouped GEMM instead.
GROUPED_GEMM = {"kernel": "grouped_mm"}


@triton.jit
def weight_grad_kernel(
    a_ptr, b_ptr, out_ptr, out_desc, ends_ptr, rows_ptr, M, N, stride_a_p, stride_b_p,
    stride_out_e, stride_out_m, num_tiles, num_programs, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STORE_TMA: tl.constexpr,
    REAL_ROWS: tl.constexpr,
):  # fmt: skip
    """out[e, m, n] = sum over rows r of expert e (ends[e - 1] <= r < ends[e], or with
    REAL_ROWS the first rows[e] of them) of a[r, m] b[r, n], summed in float32; tiles
    numbered per (expert, M tile, N tile), N tiles fastest so that neighbouring tiles
    write neighbouring memory. One tile a program stored by pointers, or (STORE_TMA)
    num_programs programs walking tiles pid, pid + num_programs, ..., each stored through
    out_desc (boxes of out viewed (E M) x N; M and N whole tiles), so that a tile's store
    runs under the program's next tile."""
    if STORE_TMA:
        for tile_id in range(tl.program_id(0), num_tiles, num_programs):
            acc, expert, first_m, first_n = _tile_sum(
                a_ptr, b_ptr, ends_ptr, rows_ptr, tile_id, M, N, stride_a_p, stride_b_p,
                BLOCK_R, BLOCK_M, BLOCK_N, REAL_ROWS,
            )  # fmt: skip
            out_desc.store([expert * M + first_m, first_n], acc.to(out_desc.dtype))
    else:
        acc, expert, first_m, first_n = _tile_sum(
            a_ptr, b_ptr, ends_ptr, rows_ptr, tl.program_id(0), M, N, stride_a_p, stride_b_p,
            BLOCK_R, BLOCK_M, BLOCK_N, REAL_ROWS,
        )  # fmt: skip
        offs_m = first_m + tl.arange(0, BLOCK_M)
        offs_n = first_n + tl.arange(0, BLOCK_N)
        out_ptrs = (
            out_ptr
            + expert.to(tl.int64) * stride_out_e
            + offs_m.to(tl.int64)[:, None] * stride_out_m
            + offs_n[None, :]
        )
        tile_ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _tile_sum(
    a_ptr, b_ptr, ends_ptr, rows_ptr, tile_id, M, N, stride_a_p, stride_b_p,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    REAL_ROWS: tl.constexpr,
):  # fmt: skip
    """(tile `tile_id`'s float32 sum, its expert, its first row and first column)."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_expert = tl.cdiv(M, BLOCK_M) * tiles_n
    expert = tile_id // tiles_per_expert
    tile = tile_id % tiles_per_expert
    first_m = (tile // tiles_n) * BLOCK_M
    first_n = (tile % tiles_n) * BLOCK_N
    offs_m = first_m + tl.arange(0, BLOCK_M)
    offs_n = first_n + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
    # REAL_ROWS: the run's padding rows (zeros, adding nothing) are not read at all
    end = start + tl.load(rows_ptr + expert) if REAL_ROWS else tl.load(ends_ptr + expert)
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
    return acc, expert, first_m, first_n


def candidates(
    block_m: int, grouped_gemm: bool, M: int = 0, N: int = 0, store_tma: bool = False
) -> list[dict]:
    """Tile shapes worth timing where the forward's row blocks hold `block_m` rows: wide
    along N (the gradient's contiguous dimension) so that each program writes whole
    128-byte lines, summing up to `block_m` rows per step (an expert's run is a whole
    number of blocks). With `store_tma` (`tma_stores`: a Hopper card, or Triton's
    interpreter), those of the tiles that divide the M x N gradient also persistent,
    PROGRAMS_PER_SM programs a multiprocessor storing by TMA (version 40 on an H100: at
    DeepSeek-V3's 1024 tokens 1-7% faster than one tile a program, at 64 tokens no
    faster; at 64-row blocks, persistent tiles of 16-row steps lost by 4-28% in version
    41's race on an H100). Then the grouped GEMM,
    if it can run: last, because in Triton's interpreter (tests) the first candidate is
    taken untimed."""
    if block_m <= 32:
        shapes = [(64, 256, 16, 4), (128, 128, 16, 4), (64, 128, 16, 4), (32, 256, 16, 4)]
        shapes += [(128, 256, 16, 8), (64, 256, 32, 4)]
        persistent = [(64, 256, 16, 4), (128, 128, 16, 4)]
    else:
        shapes = [(64, 256, 64, 8), (128, 128, 64, 8), (64, 128, 64, 4), (64, 256, 32, 4)]
        shapes += [(128, 256, 32, 8), (64, 256, 16, 4)]
        persistent = [(128, 128, 32, 4), (64, 256, 32, 4), (64, 128, 32, 4)]
    tiles = [
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_R": r, "num_warps": warps} for m, n, r, warps in shapes
    ]
    if store_tma:
        tiles += [
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_R": r, "num_warps": warps, "PROGRAMS_PER_SM": 2}
            for m, n, r, warps in persistent
            if M % m == 0 and N % n == 0
        ]
    return tiles + ([GROUPED_GEMM] if grouped_gemm else [])


def tma_stores(device: torch.device, row_bytes: int) -> bool:
    """Whether `launch` may store a contiguous gradient of rows of `row_bytes` by TMA on
    `device` (`tma.available`; the rows 16-byte aligned, as a descriptor's strides)."""
    return tma.available(device) and row_bytes % 16 == 0


def launch(
    a_PM: torch.Tensor, b_PN: torch.Tensor, ends_E: torch.Tensor, out_EMN: torch.Tensor,
    config: dict, rows_E: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """out_EMN[e] <- a_PM[rows of e]^T @ b_PN[rows of e] (`weight_grad_kernel`): one tile
    a program, or with PROGRAMS_PER_SM that many a multiprocessor storing by TMA. The rows
    of e run from ends_E[e - 1] to ends_E[e], or where `rows_E` is given only its first
    rows_E[e] of them (the rest padding rows of zeros in a_PM, which add nothing): at
    64-row blocks, about half of them padding at DeepSeek-V3's 1024 tokens, reading the
    real rows alone took 2-7% off both gradients on an H100 (NOTES.md, version 41)."""
    E, M, N = out_EMN.shape
    assert a_PM.stride(1) == 1 and b_PN.stride(1) == 1 and out_EMN.stride(2) == 1
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    num_tiles = E * fast_launch.ceil_div(M, block_m) * fast_launch.ceil_div(N, block_n)
    per_sm = config.get("PROGRAMS_PER_SM")
    out_desc, programs = None, num_tiles
    if per_sm:
        tma_ok = tma.takes(out_EMN) and tma_stores(out_EMN.device, N * out_EMN.element_size())
        if M % block_m or N % block_n or not tma_ok:
            raise ValueError(f"{config} cannot store a {M} x {N} gradient by TMA here")
        from triton.tools.tensor_descriptor import TensorDescriptor

        out_desc = TensorDescriptor.from_tensor(out_EMN.view(E * M, N), [block_m, block_n])
        programs = min(num_tiles, per_sm * tma.multiprocessors(out_EMN.device))
    # without rows_E the kernel reads no rows pointer (REAL_ROWS off): ends_E stands in
    fast_launch.launch(
        weight_grad_kernel, (programs,),
        a_PM, b_PN, out_EMN, out_desc, ends_E, ends_E if rows_E is None else rows_E, M, N,
        a_PM.stride(0), b_PN.stride(0), out_EMN.stride(0), out_EMN.stride(1), num_tiles,
        programs, BLOCK_R=config["BLOCK_R"], BLOCK_M=block_m, BLOCK_N=block_n,
        STORE_TMA=bool(per_sm), REAL_ROWS=rows_E is not None, num_warps=config["num_warps"],
    )  # fmt: skip


GroupedGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def expert_weight_grad(
    a_PM: torch.Tensor,
    b_PN: torch.Tensor,
    ends_E: torch.Tensor,
    block_m: int,
    tuning_key: str,
    grouped_gemm: GroupedGemm | None,
    rows_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per expert e: a_PM[rows of e]^T @ b_PN[rows of e], as E x M x N in a_PM's dtype
    (experts with no rows get zeros), from `weight_grad_kernel` or `grouped_gemm(a_PM,
    b_PN, ends_E)` (None where it cannot run), whichever `weight_grad_choice` picks;
    `rows_E`: each expert's real rows, read alone by the kernel (`launch`)."""
    config = weight_grad_choice(a_PM, b_PN, ends_E, block_m, tuning_key, grouped_gemm, rows_E)
    return _run(a_PM, b_PN, ends_E, config, grouped_gemm, rows_E)


def weight_grad_choice(
    a_PM: torch.Tensor,
    b_PN: torch.Tensor,
    ends_E: torch.Tensor,
    block_m: int,
    tuning_key: str,
    grouped_gemm: GroupedGemm | None,
    rows_E: torch.Tensor | None = None,
) -> dict:
    """The path `expert_weight_grad` takes: GROUPED_GEMM above FEW_ROWS_BLOCK_M rows per
    block (untimed), else the faster of the kernel's tiles and the grouped GEMM for
    `tuning_key`, timed on first use and cached."""
    if block_m > FEW_ROWS_BLOCK_M and grouped_gemm is not None:
        return GROUPED_GEMM
    return tuning.TUNER.choose(
        a_PM.device,
        tuning_key,
        lambda: candidates(
            block_m,
            grouped_gemm is not None,
            a_PM.shape[1],
            b_PN.shape[1],
            tma_stores(a_PM.device, b_PN.shape[1] * a_PM.element_size()),
        ),
        lambda config: _run(a_PM, b_PN, ends_E, config, grouped_gemm, rows_E),
        code=(weight_grad_kernel,),
        precompile=True,
    )


def _run(
    a_PM: torch.Tensor,
    b_PN: torch.Tensor,
    ends_E: torch.Tensor,
    config: dict,
    grouped_gemm: GroupedGemm | None,
    rows_E: torch.Tensor | None = None,
) -> torch.Tensor:
    if config == GROUPED_GEMM:
        return grouped_gemm(a_PM, b_PN, ends_E)
    # allocated only on this path: the grouped GEMM brings its own (22.5 GB for
    # DeepSeek-V3's two gradients, which a spare buffer would add to the peak)
    out_EMN = a_PM.new_empty(ends_E.numel(), a_PM.shape[1], b_PN.shape[1])
    launch(a_PM, b_PN, ends_E, out_EMN, config, rows_E)
    return out_EMN
