"""Experiment (not raced): `weight_grad.weight_grad_kernel` with its tiles stored by TMA,
and optionally persistent (one program a streaming multiprocessor walking tiles).

Why: DeepSeek-V3's training step at 1024 tokens is the one point where `triton` has
trailed moe-ops (25.03 against 24.81 ms on an H100, NOTES.md version 37). The step
writes its 22.5 GB of expert weight gradients through the few-rows kernel, one
BLOCK_M x BLOCK_N tile a program stored from registers, at about 2.6 TB/s (version 23's
estimate on the H200). A TMA store hands the tile to the copy engine and the program
goes on to its next tile's loads, so a program's store overlaps its next tile's work.

Same result as `weight_grad_kernel` bit for bit: each tile the same float32 sum over its
expert's rows in the same BLOCK_R steps, rounded once. Requires M % BLOCK_M == 0 and
N % BLOCK_N == 0 (a box never crosses experts: the output is viewed (E M) x N).
`scripts/weight_grad_bench.py --tma` times it beside the shipped kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebench import fast_launch


@triton.jit
def weight_grad_tma_kernel(
    a_ptr, b_ptr, out_desc, ends_ptr, sorted_ids_ptr, num_assign, num_tiles, M, N,
    stride_a_p, stride_b_p, num_programs, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SKIP_PADDING: tl.constexpr,
):  # fmt: skip
    """out[e, m, n] = sum over rows r of expert e of a[r, m] b[r, n] in float32, as
    `weight_grad_kernel`; tiles pid, pid + num_programs, ... (N tiles fastest), each
    stored through out_desc (boxes BLOCK_M x BLOCK_N of out viewed (E M) x N). With
    SKIP_PADDING, a step of BLOCK_R rows whose first is padding (sorted_ids >= num_assign:
    an expert's real rows come first, and a's padding rows are zeros) is skipped."""
    tiles_n = N // BLOCK_N
    tiles_per_expert = (M // BLOCK_M) * tiles_n
    for tile_id in range(tl.program_id(0), num_tiles, num_programs):
        expert = tile_id // tiles_per_expert
        tile = tile_id % tiles_per_expert
        first_m = (tile // tiles_n) * BLOCK_M
        first_n = (tile % tiles_n) * BLOCK_N
        offs_m = first_m + tl.arange(0, BLOCK_M)
        offs_n = first_n + tl.arange(0, BLOCK_N)
        start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
        end = tl.load(ends_ptr + expert)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for first in range(start, end, BLOCK_R):
            real = True
            if SKIP_PADDING:
                real = tl.load(sorted_ids_ptr + first) < num_assign
            if real:
                rows = first + tl.arange(0, BLOCK_R)
                row_ok = rows < end
                rows64 = rows.to(tl.int64)[:, None]
                a_ptrs = a_ptr + rows64 * stride_a_p + offs_m[None, :]
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b_ptrs = b_ptr + rows64 * stride_b_p + offs_n[None, :]
                b = tl.load(b_ptrs, mask=row_ok[:, None], other=0.0)
                acc = tl.dot(tl.trans(a), b, acc)
        out_desc.store([expert * M + first_m, first_n], acc.to(out_desc.dtype))


def candidates(skip_padding: bool) -> list[dict]:
    """Tiles to time: the shipped kernel's few-rows shapes, each one tile a program and
    persistent at two and four programs a multiprocessor; SKIP_PADDING as asked."""
    shapes = [(64, 256, 32, 4), (64, 256, 16, 4), (128, 128, 32, 4), (64, 128, 32, 4)]
    shapes += [(128, 256, 32, 8), (64, 256, 64, 8), (128, 128, 16, 4)]
    configs = []
    for m, n, r, warps in shapes:
        config = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_R": r, "num_warps": warps}
        config["SKIP_PADDING"] = skip_padding
        configs += [config, {**config, "PROGRAMS_PER_SM": 2}, {**config, "PROGRAMS_PER_SM": 4}]
    return configs


def fits(config: dict, M: int, N: int) -> bool:
    """Whether the config's boxes tile the gradient exactly."""
    return M % config["BLOCK_M"] == 0 and N % config["BLOCK_N"] == 0


def launch(
    a_PM: torch.Tensor, b_PN: torch.Tensor, ends_E: torch.Tensor, sorted_ids_P: torch.Tensor,
    num_assign: int, out_EMN: torch.Tensor, config: dict,
) -> None:  # fmt: skip
    """out_EMN[e] <- a_PM[rows of e]^T @ b_PN[rows of e] (`weight_grad_tma_kernel`); with
    PROGRAMS_PER_SM, that many programs a multiprocessor walk the tiles, else one a tile;
    with SKIP_PADDING, steps that begin at a padding row of sorted_ids_P are skipped."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    E, M, N = out_EMN.shape
    if not fits(config, M, N):
        raise ValueError(f"config {config} does not tile a {M} x {N} gradient")
    assert a_PM.stride(1) == 1 and b_PN.stride(1) == 1 and out_EMN.is_contiguous()
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    num_tiles = E * (M // block_m) * (N // block_n)
    programs = num_tiles
    if config.get("PROGRAMS_PER_SM"):
        sms = torch.cuda.get_device_properties(out_EMN.device).multi_processor_count
        programs = min(num_tiles, sms * config["PROGRAMS_PER_SM"])
    out_desc = TensorDescriptor.from_tensor(out_EMN.view(E * M, N), [block_m, block_n])
    fast_launch.launch(
        weight_grad_tma_kernel, (programs,),
        a_PM, b_PN, out_desc, ends_E, sorted_ids_P, num_assign, num_tiles, M, N,
        a_PM.stride(0), b_PN.stride(0), programs, BLOCK_R=config["BLOCK_R"],
        BLOCK_M=block_m, BLOCK_N=block_n, SKIP_PADDING=bool(config.get("SKIP_PADDING")),
        num_warps=config["num_warps"],
    )  # fmt: skip


@triton.jit
def weight_grad_walk_kernel(
    a_ptr, b_ptr, out_ptr, out_desc, ends_ptr, num_units, M, N, stride_a_p, stride_b_p,
    stride_out_e, stride_out_m, num_programs, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, M_TILES: tl.constexpr, STORE_TMA: tl.constexpr,
):  # fmt: skip
    """`weight_grad_tma_kernel`'s gradient, a program walking units of (expert, N tile,
    M_TILES tiles along M): where the expert's run is at most ROWS rows (its padded run
    one block), the run's b rows for the N tile are loaded once for the unit's M tiles,
    so each tile reads only its BLOCK_M columns of a (BLOCK_M / (BLOCK_M + BLOCK_N) of
    what a tile that loads both reads); longer runs sum ROWS rows at a time. Stored by TMA
    (STORE_TMA) or by pointers."""
    tiles_m = M // BLOCK_M
    tiles_n = N // BLOCK_N
    chunks_m = tl.cdiv(tiles_m, M_TILES)
    for unit in range(tl.program_id(0), num_units, num_programs):
        expert = unit // (tiles_n * chunks_m)
        first_n = ((unit // chunks_m) % tiles_n) * BLOCK_N
        first_tile_m = (unit % chunks_m) * M_TILES
        last_tile_m = tl.minimum(first_tile_m + M_TILES, tiles_m)
        offs_n = first_n + tl.arange(0, BLOCK_N)
        start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
        end = tl.load(ends_ptr + expert)
        rows = start + tl.arange(0, ROWS)
        rows64 = rows.to(tl.int64)[:, None]
        row_ok = rows < end
        if end - start <= ROWS:
            b = tl.load(
                b_ptr + rows64 * stride_b_p + offs_n[None, :], mask=row_ok[:, None], other=0.0
            )
            for tile_m in range(first_tile_m, last_tile_m):
                offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
                a_ptrs = a_ptr + rows64 * stride_a_p + offs_m[None, :]
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                acc = tl.dot(tl.trans(a), b)
                _store_tile(
                    out_ptr,
                    out_desc,
                    acc,
                    expert,
                    tile_m * BLOCK_M,
                    first_n,
                    M,
                    stride_out_e,
                    stride_out_m,
                    BLOCK_M,
                    BLOCK_N,
                    STORE_TMA,
                )
        else:
            for tile_m in range(first_tile_m, last_tile_m):
                offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for first in range(start, end, ROWS):
                    chunk = first + tl.arange(0, ROWS)
                    chunk64 = chunk.to(tl.int64)[:, None]
                    chunk_ok = chunk < end
                    a_ptrs = a_ptr + chunk64 * stride_a_p + offs_m[None, :]
                    a = tl.load(a_ptrs, mask=chunk_ok[:, None], other=0.0)
                    b_ptrs = b_ptr + chunk64 * stride_b_p + offs_n[None, :]
                    b = tl.load(b_ptrs, mask=chunk_ok[:, None], other=0.0)
                    acc = tl.dot(tl.trans(a), b, acc)
                _store_tile(
                    out_ptr,
                    out_desc,
                    acc,
                    expert,
                    tile_m * BLOCK_M,
                    first_n,
                    M,
                    stride_out_e,
                    stride_out_m,
                    BLOCK_M,
                    BLOCK_N,
                    STORE_TMA,
                )


@triton.jit
def _store_tile(
    out_ptr, out_desc, acc, expert, first_m, first_n, M, stride_out_e, stride_out_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STORE_TMA: tl.constexpr,
):  # fmt: skip
    """acc rounded into out[expert, first_m:+BLOCK_M, first_n:+BLOCK_N]."""
    if STORE_TMA:
        out_desc.store([expert * M + first_m, first_n], acc.to(out_desc.dtype))
    else:
        offs_m = first_m + tl.arange(0, BLOCK_M)
        offs_n = first_n + tl.arange(0, BLOCK_N)
        out_ptrs = (
            out_ptr + expert.to(tl.int64) * stride_out_e
            + offs_m.to(tl.int64)[:, None] * stride_out_m + offs_n[None, :]
        )  # fmt: skip
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))


def walk_candidates(rows: int) -> list[dict]:
    """`weight_grad_walk_kernel`'s configs to time at runs of `rows` (the forward's
    block_m): tiles of 64 or 128 M by 128 or 256 N, 8 or 64 tiles along M a unit, stored
    by TMA or by pointers, two software-pipeline stages."""
    configs = []
    for block_m, block_n, warps in ((64, 256, 8), (128, 128, 8), (64, 128, 4), (128, 128, 4)):
        for m_tiles in (8, 64):
            for store_tma in (True, False):
                configs.append({
                    "WALK": True, "ROWS": rows, "BLOCK_M": block_m, "BLOCK_N": block_n,
                    "M_TILES": m_tiles, "STORE_TMA": store_tma, "num_warps": warps,
                    "num_stages": 2, "PROGRAMS_PER_SM": 2,
                })  # fmt: skip
    return configs


def launch_walk(
    a_PM: torch.Tensor, b_PN: torch.Tensor, ends_E: torch.Tensor, out_EMN: torch.Tensor,
    config: dict,
) -> None:  # fmt: skip
    """out_EMN[e] <- a_PM[rows of e]^T @ b_PN[rows of e] (`weight_grad_walk_kernel`)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    E, M, N = out_EMN.shape
    if not fits(config, M, N):
        raise ValueError(f"config {config} does not tile a {M} x {N} gradient")
    assert a_PM.stride(1) == 1 and b_PN.stride(1) == 1 and out_EMN.is_contiguous()
    block_m, block_n, m_tiles = config["BLOCK_M"], config["BLOCK_N"], config["M_TILES"]
    num_units = E * (N // block_n) * fast_launch.ceil_div(M // block_m, m_tiles)
    sms = torch.cuda.get_device_properties(out_EMN.device).multi_processor_count
    programs = min(num_units, sms * config["PROGRAMS_PER_SM"])
    out_desc = TensorDescriptor.from_tensor(out_EMN.view(E * M, N), [block_m, block_n])
    fast_launch.launch(
        weight_grad_walk_kernel, (programs,),
        a_PM, b_PN, out_EMN, out_desc, ends_E, num_units, M, N, a_PM.stride(0),
        b_PN.stride(0), out_EMN.stride(0), out_EMN.stride(1), programs,
        ROWS=config["ROWS"], BLOCK_M=block_m, BLOCK_N=block_n, M_TILES=m_tiles,
        STORE_TMA=config["STORE_TMA"], num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )  # fmt: skip


@triton.jit
def weight_grad_flat_kernel(
    a_ptr, b_ptr, out_ptr, out_desc, ends_ptr, num_tiles, M, N, stride_a_p, stride_b_p,
    stride_out_e, stride_out_m, num_programs, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, STAGES: tl.constexpr, STORE_TMA: tl.constexpr,
):  # fmt: skip
    """Probe: `weight_grad_tma_kernel` for runs of at most ROWS rows (only the first ROWS
    rows of a run are summed), each tile one product, the tile loop the innermost so that
    Triton's software pipeline loads the next tiles' rows and keeps STAGES - 1 TMA stores
    in flight while this tile's product runs."""
    tiles_n = N // BLOCK_N
    tiles_per_expert = (M // BLOCK_M) * tiles_n
    for tile_id in tl.range(tl.program_id(0), num_tiles, num_programs, num_stages=STAGES):
        expert = tile_id // tiles_per_expert
        tile = tile_id % tiles_per_expert
        first_m = (tile // tiles_n) * BLOCK_M
        first_n = (tile % tiles_n) * BLOCK_N
        start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
        end = tl.load(ends_ptr + expert)
        rows = start + tl.arange(0, ROWS)
        row_ok = (rows < end)[:, None]
        rows64 = rows.to(tl.int64)[:, None]
        offs_m = first_m + tl.arange(0, BLOCK_M)
        offs_n = first_n + tl.arange(0, BLOCK_N)
        a = tl.load(a_ptr + rows64 * stride_a_p + offs_m[None, :], mask=row_ok, other=0.0)
        b = tl.load(b_ptr + rows64 * stride_b_p + offs_n[None, :], mask=row_ok, other=0.0)
        acc = tl.dot(tl.trans(a), b)
        _store_tile(
            out_ptr, out_desc, acc, expert, first_m, first_n, M, stride_out_e, stride_out_m,
            BLOCK_M, BLOCK_N, STORE_TMA,
        )  # fmt: skip


def flat_candidates(rows: int) -> list[dict]:
    """`weight_grad_flat_kernel`'s configs to time at runs of `rows`: TMA boxes as wide as
    a box goes (256), and pointer-stored tiles of 512 and 1024 columns (whole 1-2 KB row
    segments a tile)."""
    configs = []
    shapes = [(64, 128, 4, True), (64, 256, 8, True), (64, 512, 8, False), (32, 512, 4, False)]
    shapes += [(32, 1024, 8, False), (16, 1024, 4, False), (64, 128, 4, False)]
    for block_m, block_n, warps, store_tma in shapes:
        for per_sm in (2, 3):
            configs.append({
                "FLAT": True, "ROWS": rows, "BLOCK_M": block_m, "BLOCK_N": block_n,
                "STAGES": 2, "num_warps": warps, "PROGRAMS_PER_SM": per_sm,
                "STORE_TMA": store_tma,
            })  # fmt: skip
    return configs


def launch_flat(
    a_PM: torch.Tensor, b_PN: torch.Tensor, ends_E: torch.Tensor, out_EMN: torch.Tensor,
    config: dict,
) -> None:  # fmt: skip
    """out_EMN[e] <- a_PM[first ROWS rows of e]^T @ b_PN[those rows]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    E, M, N = out_EMN.shape
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    num_tiles = E * (M // block_m) * (N // block_n)
    sms = torch.cuda.get_device_properties(out_EMN.device).multi_processor_count
    programs = min(num_tiles, sms * config["PROGRAMS_PER_SM"])
    box = [block_m, min(block_n, 256)]  # (unused by pointer stores; a box is at most 256)
    out_desc = TensorDescriptor.from_tensor(out_EMN.view(E * M, N), box)
    fast_launch.launch(
        weight_grad_flat_kernel, (programs,),
        a_PM, b_PN, out_EMN, out_desc, ends_E, num_tiles, M, N, a_PM.stride(0),
        b_PN.stride(0), out_EMN.stride(0), out_EMN.stride(1), programs, ROWS=config["ROWS"],
        BLOCK_M=block_m, BLOCK_N=block_n, STAGES=config["STAGES"],
        STORE_TMA=config["STORE_TMA"], num_warps=config["num_warps"],
    )  # fmt: skip
