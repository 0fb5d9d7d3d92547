"""Inference's gate_up GEMM in Gluon with an expert's short tail computed beside its last
full row block, from the same read of the weight tile: an experiment, raced nowhere yet
(`scripts/tail_probe.py`'s `Gluon, MERGE_TAIL` variants time it; built in version 38,
triton/NOTES.md).

Shape legend as in `kernels.py`; TAIL the rows of a tail merged (32 or 64). Why: every
expert's run is padded to whole 128-row blocks, and the block holding its last few rows
costs about a full block whatever it holds (version 37's tail probe on an H100:
Mixtral-8x7B's shape with 288 rows an expert, 0.318 ms for the tails of 32 rows beside
0.356 for a full block of 128), because a block's program reads its expert's whole weight
tile (2 MB of gate and up rows at 128 columns) for however few rows: a tail is bound by
those bytes, not its products. `merge_tail.py` computes the tail with the block before
it in Triton, but its two accumulators fit a thread's registers only in tiles narrower or
wider in warps than the winners, and it loses (1.39-1.48 ms at 288 rows against 1.26).

Here `gluon_gate_up.py`'s persistent, warp-specialised skeleton takes a tile's roles
from `merge_tail._program_roles`' rule (`gluon_common.merge_roles`): a row block that is
its expert's last but not its first, with its rows from TAIL on padding, is not a tile of
its own; the block before it (of the same expert: a full block) loads, each K step, the
tail's first TAIL rows as a fourth box beside its own row block and the two weight boxes,
and its consumer issues two more wgmmas from the same weight boxes, with the operands
swapped so that the tail's few rows are the product's N (wgmma's M is 64 rows a warp
group at least): the tail's gate and up, transposed, are BLOCK_N x TAIL, TAIL registers a
thread more than the block's 128. The tail's SwiGLU is stored back transposed into h's
rows; its rows past TAIL (padding) are not written (as HALF_TAIL leaves them). Not the
same bits as the TMA tile for the tail's rows (the swapped product sums its K steps in
another order inside the instruction): within the layer's check as any tile is. The
block's own rows are `gluon_gate_up.py`'s, bit for bit.

Gluon has no interpreter: these kernels compile here for sm_90 (`moebench.offline_compile`,
tests/test_gluon_gate_up_merged.py) and run only on a Hopper card.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from moebench.fast_launch import launch
from moebench.impls.triton import gluon_common as common
from moebench.impls.triton import gluon_gate_up
from moebench.impls.triton import tma as tma_tiles
from moebench.impls.triton.gluon_common import (
    merge_roles,
    mma_layout,
    tile_coords,
    transposed_store_layout,
)

# (BLOCK_N, BLOCK_K, STAGES, TAIL) at 128-row blocks: a ring slot holds the row block,
# the tail's box and two weight boxes (56 KB at 128 columns and a tail of 64), so three
# stages and the epilogue's scratch fit. 128 columns: the swapped product's M, two warp
# groups of 64.
TILES = ((128, 64, 3, 32), (128, 64, 3, 64))


@gluon.jit
def _load_partition(
    a_desc, tail_desc, w_desc, a_bufs, tail_bufs, gate_bufs, up_bufs, ready_bars, empty_bars,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr, num_assign, D, F, num_programs,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, TAIL: gl.constexpr,
):  # fmt: skip
    """The loader: every K step of every tile of this program, into the ring (the tail's
    box too where the tile merges it)."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = F // BLOCK_N
    k_steps = gl.cdiv(D, BLOCK_K)
    step_bytes: gl.constexpr = a_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes
    tail_bytes: gl.constexpr = tail_desc.block_type.nbytes
    step = 0
    for tile in range(gl.program_id(0), num_blocks_m * num_blocks_n, num_programs):
        pid_m, pid_n = tile_coords(tile, num_blocks_m, num_blocks_n, GROUP_M)
        computes, merges = merge_roles(
            sorted_ids_ptr, block_expert_ptr, pid_m, num_blocks_m, num_assign, BLOCK_M, TAIL
        )
        if computes:
            gate_row = gl.load(block_expert_ptr + pid_m) * 2 * F + pid_n * BLOCK_N
            for k in range(k_steps):
                slot = step % STAGES
                # a new mbarrier counts as having completed the phase before its first
                mbarrier.wait(empty_bars.index(slot), ((step // STAGES) & 1) ^ 1)
                ready = ready_bars.index(slot)
                if merges:
                    mbarrier.expect(ready, step_bytes + tail_bytes)
                    tma.async_copy_global_to_shared(
                        tail_desc, [(pid_m + 1) * BLOCK_M, k * BLOCK_K], ready,
                        tail_bufs.index(slot),
                    )  # fmt: skip
                else:
                    mbarrier.expect(ready, step_bytes)
                tma.async_copy_global_to_shared(
                    a_desc, [pid_m * BLOCK_M, k * BLOCK_K], ready, a_bufs.index(slot)
                )
                tma.async_copy_global_to_shared(
                    w_desc, [gate_row, k * BLOCK_K], ready, gate_bufs.index(slot)
                )
                tma.async_copy_global_to_shared(
                    w_desc, [gate_row + F, k * BLOCK_K], ready, up_bufs.index(slot)
                )
                step += 1


@gluon.jit
def _mma_partition(
    shared, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, CONSUMER: gl.constexpr, CONSUMERS: gl.constexpr,
):  # fmt: skip
    """The consumer: each of this program's tiles, its K loop from the ring (two wgmmas
    a step, four where the tile merges the next block's tail), then SwiGLU into h."""
    (
        a_bufs, tail_bufs, gate_bufs, up_bufs, ready_bars, empty_bars, h_ptr, sorted_ids_ptr,
        block_expert_ptr, num_padded_ptr, num_assign, D, F, stride_h_p, num_programs,
    ) = shared  # fmt: skip
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    TAIL: gl.constexpr = tail_bufs.type.shape[1]
    WARPS: gl.constexpr = gl.num_warps()
    acc_layout: gl.constexpr = mma_layout(BLOCK_N, WARPS)
    tail_layout: gl.constexpr = mma_layout(TAIL, WARPS)
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = F // BLOCK_N
    k_steps = gl.cdiv(D, BLOCK_K)
    step = 0
    for tile in range(gl.program_id(0), num_blocks_m * num_blocks_n, num_programs):
        pid_m, pid_n = tile_coords(tile, num_blocks_m, num_blocks_n, GROUP_M)
        computes, merges = merge_roles(
            sorted_ids_ptr, block_expert_ptr, pid_m, num_blocks_m, num_assign, BLOCK_M, TAIL
        )
        if computes:
            acc_gate = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
            acc_up = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
            if merges:
                # the tail's gate and up transposed: columns x tail rows
                tail_gate = gl.zeros((BLOCK_N, TAIL), gl.float32, tail_layout)
                tail_up = gl.zeros((BLOCK_N, TAIL), gl.float32, tail_layout)
                for k in range(k_steps):
                    slot = step % STAGES
                    mbarrier.wait(ready_bars.index(slot), (step // STAGES) & 1)
                    a = a_bufs.index(slot)
                    gate_w = gate_bufs.index(slot)
                    up_w = up_bufs.index(slot)
                    tail_t = tail_bufs.index(slot).permute((1, 0))
                    acc_gate = warpgroup_mma(a, gate_w.permute((1, 0)), acc_gate, is_async=True)
                    acc_up = warpgroup_mma(a, up_w.permute((1, 0)), acc_up, is_async=True)
                    tail_gate = warpgroup_mma(gate_w, tail_t, tail_gate, is_async=True)
                    tail_up = warpgroup_mma(up_w, tail_t, tail_up, is_async=True)
                    # this step's four in flight: the previous step's have read their slot
                    acc_gate, acc_up, tail_gate, tail_up = warpgroup_mma_wait(
                        num_outstanding=4, deps=(acc_gate, acc_up, tail_gate, tail_up)
                    )
                    mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES), pred=k > 0)
                    step += 1
                acc_gate, acc_up, tail_gate, tail_up = warpgroup_mma_wait(
                    num_outstanding=0, deps=(acc_gate, acc_up, tail_gate, tail_up)
                )
                mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES))
                _swiglu_store_transposed(
                    tail_gate, tail_up, h_ptr, stride_h_p, (pid_m + 1) * BLOCK_M,
                    pid_n * BLOCK_N, WARPS,
                )  # fmt: skip
            else:
                for k in range(k_steps):
                    slot = step % STAGES
                    mbarrier.wait(ready_bars.index(slot), (step // STAGES) & 1)
                    a = a_bufs.index(slot)
                    gate_w = gate_bufs.index(slot).permute((1, 0))
                    up_w = up_bufs.index(slot).permute((1, 0))
                    acc_gate = warpgroup_mma(a, gate_w, acc_gate, is_async=True)
                    acc_up = warpgroup_mma(a, up_w, acc_up, is_async=True)
                    acc_gate, acc_up = warpgroup_mma_wait(
                        num_outstanding=2, deps=(acc_gate, acc_up)
                    )
                    mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES), pred=k > 0)
                    step += 1
                acc_gate, acc_up = warpgroup_mma_wait(num_outstanding=0, deps=(acc_gate, acc_up))
                mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES))
            gluon_gate_up._swiglu_store(
                acc_gate, acc_up, h_ptr, stride_h_p, pid_m, pid_n, BLOCK_M, BLOCK_N, WARPS
            )


@gluon.jit
def _swiglu_store_transposed(
    gate_t, up_t, h_ptr, stride_h_p, first_row, first_col, WARPS: gl.constexpr
):
    """`gluon_gate_up._swiglu_store` of a transposed tile (columns x rows): SwiGLU in
    float32, in the same operations' order, rounded once into h's rows from first_row."""
    BLOCK_N: gl.constexpr = gate_t.type.shape[0]
    TAIL: gl.constexpr = gate_t.type.shape[1]
    h_t = gate_t * (1 / (1 + gl.exp(-gate_t))) * up_t
    layout: gl.constexpr = transposed_store_layout(BLOCK_N, WARPS)
    h_t = gl.convert_layout(h_t.to(h_ptr.dtype.element_ty), layout)
    cols = first_col + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    rows = first_row + gl.arange(0, TAIL, layout=gl.SliceLayout(0, layout))
    gl.store(h_ptr + rows[None, :].to(gl.int64) * stride_h_p + cols[:, None], h_t)


@gluon.jit
def gate_up_merged_ws_kernel(
    a_desc, tail_desc, w_desc, h_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    num_assign, D, F, stride_h_p, num_programs, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
    STAGES: gl.constexpr, TAIL: gl.constexpr,
):  # fmt: skip
    """h[row] <- SwiGLU of the gathered row through its expert's gate and up rows
    (module docstring): a_desc boxes BLOCK_M x BLOCK_K of the gathered rows (P x D),
    tail_desc TAIL x BLOCK_K of the same rows, w_desc BLOCK_N x BLOCK_K of the weights
    viewed (E 2F) x D; num_programs programs, each walking every num_programs-th tile."""
    a_shape: gl.constexpr = [STAGES] + a_desc.block_type.shape  # noqa: RUF005
    tail_shape: gl.constexpr = [STAGES] + tail_desc.block_type.shape  # noqa: RUF005
    w_shape: gl.constexpr = [STAGES] + w_desc.block_type.shape  # noqa: RUF005
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, a_shape, a_desc.layout)
    tail_bufs = gl.allocate_shared_memory(tail_desc.dtype, tail_shape, tail_desc.layout)
    gate_bufs = gl.allocate_shared_memory(w_desc.dtype, w_shape, w_desc.layout)
    up_bufs = gl.allocate_shared_memory(w_desc.dtype, w_shape, w_desc.layout)
    ready_bars, empty_bars, _ = common.ring_barriers(STAGES)
    loader_args = (
        a_desc, tail_desc, w_desc, a_bufs, tail_bufs, gate_bufs, up_bufs, ready_bars,
        empty_bars, sorted_ids_ptr, block_expert_ptr, num_padded_ptr, num_assign, D, F,
        num_programs, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TAIL,
    )  # fmt: skip
    consumer_args = (
        a_bufs, tail_bufs, gate_bufs, up_bufs, ready_bars, empty_bars, h_ptr, sorted_ids_ptr,
        block_expert_ptr, num_padded_ptr, num_assign, D, F, stride_h_p, num_programs,
    )  # fmt: skip
    common.specialize(
        _mma_partition, consumer_args, _load_partition, loader_args, BLOCK_M, BLOCK_N,
        BLOCK_K, GROUP_M, False,
    )  # fmt: skip


KERNELS = (tma_tiles.gather_rows_kernel, gate_up_merged_ws_kernel)


def shared_bytes(config: dict, element_bytes: int) -> int:
    """Shared memory the config takes at most: its ring (a row block, the tail's box
    and two weight boxes a stage) and its epilogue's scratch."""
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    ring = config["STAGES"] * (block_m + config["TAIL"] + 2 * block_n) * block_k * element_bytes
    return ring + common.SCRATCH_BYTES


def fits(config: dict, D: int, F: int, element_bytes: int) -> bool:
    """Whether these widths suit the config (`gluon_gate_up.fits`' rules) and its shared
    memory fits."""
    if (D * element_bytes) % 16 or (F * element_bytes) % 16 or F % config["BLOCK_N"]:
        return False
    return shared_bytes(config, element_bytes) <= common.SHARED_BYTES


def candidates(block_m: int, D: int, F: int, element_bytes: int) -> list[dict]:
    """The configs (`"GLUON_WS": True, "MERGE_TAIL": True`) at `block_m` rows (128 only:
    at 64 a tail is half a block already) that `fits`, one a tile of TILES."""
    if block_m != 128:
        return []
    configs = [
        {"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
         "STAGES": stages, "TAIL": tail, "GLUON_WS": True, "MERGE_TAIL": True}
        for block_n, block_k, stages, tail in TILES
    ]  # fmt: skip
    return [config for config in configs if fits(config, D, F, element_bytes)]


def launch_gate_up(
    x_TD: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    h_PF: torch.Tensor,
    alignment,
    top_k: int,
    config: dict,
    programs_max: int,
) -> None:
    """`gluon_gate_up.launch_gate_up`'s h_PF (the rows of merged tails past TAIL not
    written) through `tma.gathered_rows` and `gate_up_merged_ws_kernel`: at most
    `programs_max` programs, at most one a tile; w_gate_up_E2FD contiguous."""
    E, two_f, D = w_gate_up_E2FD.shape
    F = two_f // 2
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    a_PD = tma_tiles.gathered_rows(x_TD, alignment, top_k)
    programs = min(alignment.max_blocks * (F // block_n), programs_max)
    launch(
        gate_up_merged_ws_kernel, (programs,),
        common.descriptor(a_PD, [block_m, block_k]),
        common.descriptor(a_PD, [config["TAIL"], block_k]),
        common.descriptor(w_gate_up_E2FD.view(E * two_f, D), [block_n, block_k]),
        h_PF, alignment.sorted_ids_P, alignment.block_expert_B, alignment.num_padded_1,
        alignment.num_assign, D, F, h_PF.stride(0), programs, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
        STAGES=config["STAGES"], TAIL=config["TAIL"], num_warps=common.consumer_warps(config),
        maxnreg=common.max_registers(config),
    )  # fmt: skip
