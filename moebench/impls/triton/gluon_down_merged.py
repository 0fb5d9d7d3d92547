"""The fused layer's down GEMM in Gluon with an expert's short tail computed beside its last
full row block, from the same read of the weight tile: an experiment, raced nowhere yet
(`scripts/tail_probe.py --gemm down`'s `Gluon, MERGE_TAIL` variants time it; built in
version 38, triton/NOTES.md).

Shape legend as in `kernels.py`; TAIL the rows of a tail merged (32 or 64). Why: as for
gate_up (`gluon_gate_up_merged.py`), a block holding an expert's last few rows reads the
expert's whole weight tile for them; version 37's tail probe on an H100 had down at 288
rows an expert (two full blocks and a tail of 32) 13% slower than at 384 (three full
blocks), 0.682 ms against 0.602, on Mixtral-8x7B's shape.

`gluon_down.py`'s persistent, warp-specialised kernel with the merged-tail roles
(`gluon_common.merge_roles`): a block that is its expert's last but not its first, its
rows from TAIL on padding, is no tile of its own; the block before it loads the tail's
first TAIL rows of h as a third box each K step, and its consumer issues a second wgmma
with the operands swapped (the weight box, read transposed, as A: BLOCK_N x BLOCK_K; the
tail's rows as N), so the tail's product is BLOCK_N x TAIL, TAIL registers a thread
beside the block's 128. The epilogue weights the tail's rows and scatters them,
transposed, to their assignments' rows of out. Not the same bits as the TMA tile for the
tail's rows (the swapped product sums its K steps in another order inside the
instruction): within the layer's check as any tile is; the block's own rows are
`gluon_down.py`'s, bit for bit. Cooperative consumers only (8 warps; PINGPONG's single
warp groups would hold a 256-row swapped product).

Gluon has no interpreter: these kernels compile here for sm_90 (`moebench.offline_compile`,
tests/test_gluon_down_merged.py) and run only on a Hopper card.
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

from moebench.fast_launch import ceil_div, launch
from moebench.impls.triton import gluon_common as common
from moebench.impls.triton import gluon_down
from moebench.impls.triton.gluon_common import (
    merge_roles,
    mma_layout,
    tile_coords,
    transposed_store_layout,
)

# (BLOCK_N, BLOCK_K, STAGES, TAIL) at 128-row blocks: gluon_down.py's 256- and 128-wide
# tiles, a tail's box beside each stage's.
TILES = ((256, 64, 3, 32), (256, 64, 3, 64), (128, 64, 4, 32), (128, 64, 4, 64))


@gluon.jit
def _load_partition(
    h_desc, tail_desc, w_desc, a_bufs, tail_bufs, b_bufs, ready_bars, empty_bars,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr, num_assign, D, F, num_programs,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, TAIL: gl.constexpr,
):  # fmt: skip
    """The loader: every K step of every tile of this program, into the ring (the tail's
    box of h too where the tile merges it)."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = gl.cdiv(D, BLOCK_N)
    k_steps = gl.cdiv(F, BLOCK_K)
    step_bytes: gl.constexpr = h_desc.block_type.nbytes + w_desc.block_type.nbytes
    tail_bytes: gl.constexpr = tail_desc.block_type.nbytes
    step = 0
    for tile in range(gl.program_id(0), num_blocks_m * num_blocks_n, num_programs):
        pid_m, pid_n = tile_coords(tile, num_blocks_m, num_blocks_n, GROUP_M)
        computes, merges = merge_roles(
            sorted_ids_ptr, block_expert_ptr, pid_m, num_blocks_m, num_assign, BLOCK_M, TAIL
        )
        if computes:
            first_w_row = gl.load(block_expert_ptr + pid_m) * F
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
                    h_desc, [pid_m * BLOCK_M, k * BLOCK_K], ready, a_bufs.index(slot)
                )
                tma.async_copy_global_to_shared(
                    w_desc, [first_w_row + k * BLOCK_K, pid_n * BLOCK_N], ready,
                    b_bufs.index(slot),
                )  # fmt: skip
                step += 1


@gluon.jit
def _mma_partition(
    shared, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, CONSUMER: gl.constexpr, CONSUMERS: gl.constexpr,
):  # fmt: skip
    """The consumer: each of this program's tiles, its K loop from the ring (a wgmma a
    step, two where the tile merges the next block's tail), then the weighted scatter."""
    (
        a_bufs, tail_bufs, b_bufs, ready_bars, empty_bars, gate_weight_ptr, out_ptr,
        sorted_ids_ptr, block_expert_ptr, num_padded_ptr, D, F, num_assign, stride_out_a,
        num_programs,
    ) = shared  # fmt: skip
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    TAIL: gl.constexpr = tail_bufs.type.shape[1]
    WARPS: gl.constexpr = gl.num_warps()
    acc_layout: gl.constexpr = mma_layout(BLOCK_N, WARPS)
    tail_layout: gl.constexpr = mma_layout(TAIL, WARPS)
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = gl.cdiv(D, BLOCK_N)
    k_steps = gl.cdiv(F, BLOCK_K)
    step = 0
    for tile in range(gl.program_id(0), num_blocks_m * num_blocks_n, num_programs):
        pid_m, pid_n = tile_coords(tile, num_blocks_m, num_blocks_n, GROUP_M)
        computes, merges = merge_roles(
            sorted_ids_ptr, block_expert_ptr, pid_m, num_blocks_m, num_assign, BLOCK_M, TAIL
        )
        if computes:
            acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
            if merges:
                # the tail's rows of out transposed: columns x tail rows
                tail_acc = gl.zeros((BLOCK_N, TAIL), gl.float32, tail_layout)
                for k in range(k_steps):
                    slot = step % STAGES
                    mbarrier.wait(ready_bars.index(slot), (step // STAGES) & 1)
                    w = b_bufs.index(slot)
                    acc = warpgroup_mma(a_bufs.index(slot), w, acc, is_async=True)
                    tail_t = tail_bufs.index(slot).permute((1, 0))
                    tail_acc = warpgroup_mma(w.permute((1, 0)), tail_t, tail_acc, is_async=True)
                    # this step's two in flight: the previous step's have read their slot
                    acc, tail_acc = warpgroup_mma_wait(num_outstanding=2, deps=(acc, tail_acc))
                    mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES), pred=k > 0)
                    step += 1
                acc, tail_acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, tail_acc))
                mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES))
                _weighted_scatter_transposed(
                    tail_acc, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign,
                    stride_out_a, (pid_m + 1) * BLOCK_M, pid_n * BLOCK_N, WARPS,
                )  # fmt: skip
            else:
                for k in range(k_steps):
                    slot = step % STAGES
                    mbarrier.wait(ready_bars.index(slot), (step // STAGES) & 1)
                    acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                    # the previous step's wgmma has finished reading its slot
                    mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES), pred=k > 0)
                    step += 1
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES))
            gluon_down._weighted_scatter(
                acc, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign, stride_out_a,
                pid_m, pid_n, BLOCK_M, BLOCK_N, acc_layout, WARPS,
            )  # fmt: skip


@gluon.jit
def _weighted_scatter_transposed(
    acc_t, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign, stride_out_a, first_row,
    first_col, WARPS: gl.constexpr,
):  # fmt: skip
    """`gluon_down._weighted_scatter` of a transposed tile (columns x rows from
    first_row): each row times its assignment's routing weight in float32, rounded once,
    to that assignment's row of out; padding rows write nothing."""
    BLOCK_N: gl.constexpr = acc_t.type.shape[0]
    TAIL: gl.constexpr = acc_t.type.shape[1]
    rows = first_row + gl.arange(0, TAIL, layout=gl.SliceLayout(0, acc_t.type.layout))
    ids = gl.load(sorted_ids_ptr + rows)
    gate = gl.load(gate_weight_ptr + ids, mask=ids < num_assign, other=0.0).to(gl.float32)
    values = (acc_t * gate[None, :]).to(out_ptr.dtype.element_ty)
    layout: gl.constexpr = transposed_store_layout(BLOCK_N, WARPS)
    values = gl.convert_layout(values, layout)
    rows = first_row + gl.arange(0, TAIL, layout=gl.SliceLayout(0, layout))
    ids = gl.load(sorted_ids_ptr + rows)  # (again, in this layout: an L1 hit)
    cols = first_col + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    out_ptrs = out_ptr + ids[None, :].to(gl.int64) * stride_out_a + cols[:, None]
    store_ok = (ids[None, :] < num_assign) & (cols[:, None] < D)
    gl.store(out_ptrs, values, mask=store_ok)


@gluon.jit
def down_merged_ws_kernel(
    h_desc, tail_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_padded_ptr, D, F, num_assign, stride_out_a, num_programs,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr, TAIL: gl.constexpr,
):  # fmt: skip
    """out[a] <- gate[a] * h[row of a] @ W_down[expert of a] (module docstring): h_desc
    boxes BLOCK_M x BLOCK_K of h (P x F), tail_desc TAIL x BLOCK_K of h, w_desc BLOCK_K x
    BLOCK_N of the weights viewed (E F) x D; num_programs programs, each walking every
    num_programs-th tile."""
    a_shape: gl.constexpr = [STAGES] + h_desc.block_type.shape  # noqa: RUF005
    tail_shape: gl.constexpr = [STAGES] + tail_desc.block_type.shape  # noqa: RUF005
    b_shape: gl.constexpr = [STAGES] + w_desc.block_type.shape  # noqa: RUF005
    a_bufs = gl.allocate_shared_memory(h_desc.dtype, a_shape, h_desc.layout)
    tail_bufs = gl.allocate_shared_memory(tail_desc.dtype, tail_shape, tail_desc.layout)
    b_bufs = gl.allocate_shared_memory(w_desc.dtype, b_shape, w_desc.layout)
    ready_bars, empty_bars, _ = common.ring_barriers(STAGES)
    loader_args = (
        h_desc, tail_desc, w_desc, a_bufs, tail_bufs, b_bufs, ready_bars, empty_bars,
        sorted_ids_ptr, block_expert_ptr, num_padded_ptr, num_assign, D, F, num_programs,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TAIL,
    )  # fmt: skip
    consumer_args = (
        a_bufs, tail_bufs, b_bufs, ready_bars, empty_bars, gate_weight_ptr, out_ptr,
        sorted_ids_ptr, block_expert_ptr, num_padded_ptr, D, F, num_assign, stride_out_a,
        num_programs,
    )  # fmt: skip
    common.specialize(
        _mma_partition, consumer_args, _load_partition, loader_args, BLOCK_M, BLOCK_N,
        BLOCK_K, GROUP_M, False,
    )  # fmt: skip


KERNELS = (down_merged_ws_kernel,)


def shared_bytes(config: dict, element_bytes: int) -> int:
    """Shared memory the config takes at most: its ring (h's row block, the tail's box
    and the weight box a stage) and its epilogue's scratch."""
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    ring = config["STAGES"] * (block_m + config["TAIL"] + block_n) * block_k * element_bytes
    return ring + common.SCRATCH_BYTES


def fits(config: dict, D: int, F: int, element_bytes: int) -> bool:
    """Whether these widths suit the config (`gluon_down.fits`' rules) and its shared
    memory fits."""
    if (D * element_bytes) % 16 or (F * element_bytes) % 16 or F % config["BLOCK_K"]:
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


def launch_down(
    h_PF: torch.Tensor,
    w_down_EFD: torch.Tensor,
    gate_weight_A: torch.Tensor,
    out_AD: torch.Tensor,
    alignment,
    config: dict,
    programs_max: int,
) -> None:
    """`gluon_down.launch_down`'s result through `down_merged_ws_kernel`: at most
    `programs_max` programs, at most one a tile; w_down_EFD contiguous."""
    E, F, D = w_down_EFD.shape
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    programs = min(alignment.max_blocks * ceil_div(D, block_n), programs_max)
    launch(
        down_merged_ws_kernel, (programs,),
        common.descriptor(h_PF, [block_m, block_k]),
        common.descriptor(h_PF, [config["TAIL"], block_k]),
        common.descriptor(w_down_EFD.view(E * F, D), [block_k, block_n]),
        gate_weight_A, out_AD, alignment.sorted_ids_P, alignment.block_expert_B,
        alignment.num_padded_1, D, F, alignment.num_assign, out_AD.stride(0), programs,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
        STAGES=config["STAGES"], TAIL=config["TAIL"], num_warps=common.consumer_warps(config),
        maxnreg=common.max_registers(config),
    )  # fmt: skip
