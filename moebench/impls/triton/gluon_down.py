"""The fused layer's down GEMM warp-specialised in Gluon (Triton's explicit-layout
language): tuning candidates beside `tma.py`'s (`layer.races_gluon`; `$MOEBENCH_GLUON_WS=0`
leaves them out), built in version 27 and raced by default since 31 (triton/NOTES.md).

Shape legend as in `kernels.py`. Same result as `tma.down_tma_kernel`, bit for bit where
the K steps are the same (each row of h @ W_down[expert] in float32, times its
assignment's routing weight, to that assignment's row of out; padding rows write
nothing), computed by the persistent, warp-specialised skeleton `gluon_common.py`
explains: a loader warp fills a ring of shared-memory slots by TMA (a K step: h's row
block and the expert's weight tile), consumers issue the wgmmas and run the epilogue.
PINGPONG (two consumers, alternate tiles) pays here because down's K loop is short
(12-32 steps of 64 on the four presets), so its epilogue is a large share of a tile.
The epilogue multiplies by the routing weight in the wgmma's own layout and rounds,
then scatters whole 16-byte row segments to each assignment's row.
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
from moebench.impls.triton.gluon_common import mma_layout, store_layout, tile_coords

# (BLOCK_N, BLOCK_K, STAGES) per row-block height: the configs of version 26's winners
# (128 rows: N256 S4 on DeepSeek-V3's and Mixtral-8x7B's 8192 tokens, N128 S6 PINGPONG on
# Qwen3-30B-A3B's 8192 and Mixtral-8x7B's 1024; measured with version 25's kernels, lost
# with their branch, which these re-implement) and their neighbours.
TILES = {
    128: ((256, 64, 3), (256, 64, 4), (128, 64, 4), (128, 64, 6)),
    64: ((256, 64, 4), (128, 64, 6)),
}


@gluon.jit
def _load_partition(
    h_desc, w_desc, a_bufs, b_bufs, ready_bars, empty_bars, block_expert_ptr, num_padded_ptr,
    D, F, num_programs, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr,
):  # fmt: skip
    """The loader: every K step of every tile of this program, into the ring."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = gl.cdiv(D, BLOCK_N)
    k_steps = gl.cdiv(F, BLOCK_K)
    step = 0
    for tile in range(gl.program_id(0), num_blocks_m * num_blocks_n, num_programs):
        pid_m, pid_n = tile_coords(tile, num_blocks_m, num_blocks_n, GROUP_M)
        first_w_row = gl.load(block_expert_ptr + pid_m) * F
        for k in range(k_steps):
            slot = step % STAGES
            # a new mbarrier counts as having completed the phase before its first, so
            # the first lap's waits for a free slot pass at once
            mbarrier.wait(empty_bars.index(slot), ((step // STAGES) & 1) ^ 1)
            ready = ready_bars.index(slot)
            mbarrier.expect(ready, h_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                h_desc, [pid_m * BLOCK_M, k * BLOCK_K], ready, a_bufs.index(slot)
            )
            tma.async_copy_global_to_shared(
                w_desc, [first_w_row + k * BLOCK_K, pid_n * BLOCK_N], ready, b_bufs.index(slot)
            )
            step += 1


@gluon.jit
def _mma_partition(
    shared, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, CONSUMER: gl.constexpr, CONSUMERS: gl.constexpr,
):  # fmt: skip
    """A consumer: the tiles i = CONSUMER, CONSUMER + CONSUMERS, ... of this program's
    walk (all of them when CONSUMERS is 1), each K loop from the ring, then the
    epilogue; `shared`: the ring, the barriers and the kernel's run-time arguments."""
    (
        a_bufs, b_bufs, ready_bars, empty_bars, order_bars, gate_weight_ptr, out_ptr,
        sorted_ids_ptr, num_padded_ptr, D, F, num_assign, stride_out_a, num_programs,
    ) = shared  # fmt: skip
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    WARPS: gl.constexpr = gl.num_warps()
    acc_layout: gl.constexpr = mma_layout(BLOCK_N, WARPS)
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = gl.cdiv(D, BLOCK_N)
    k_steps = gl.cdiv(F, BLOCK_K)
    num_tiles = num_blocks_m * num_blocks_n
    pid = gl.program_id(0)
    my_tiles = gl.cdiv(gl.maximum(num_tiles - pid, 0), num_programs)
    for i in range(CONSUMER, my_tiles, CONSUMERS):
        pid_m, pid_n = tile_coords(pid + i * num_programs, num_blocks_m, num_blocks_n, GROUP_M)
        if CONSUMERS > 1:  # wait for the other consumer's turn at the ring to end
            mbarrier.wait(order_bars.index(CONSUMER), ((i // CONSUMERS) & 1) ^ (1 - CONSUMER))
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
        step = i * k_steps
        for k in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(ready_bars.index(slot), (step // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            # the previous step's wgmma has finished reading its slot
            mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES), pred=k > 0)
            step += 1
        if CONSUMERS > 1:
            mbarrier.arrive(order_bars.index(1 - CONSUMER))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES))
        _weighted_scatter(
            acc, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign, stride_out_a, pid_m,
            pid_n, BLOCK_M, BLOCK_N, acc_layout, WARPS,
        )  # fmt: skip


@gluon.jit
def _weighted_scatter(
    acc, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign, stride_out_a, pid_m, pid_n,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, acc_layout: gl.constexpr,
    WARPS: gl.constexpr,
):  # fmt: skip
    """`tma._weighted_scatter` in Gluon: each row of the tile times its assignment's
    routing weight (in float32, then rounded once, as the Triton kernels do), to that
    assignment's row of out; padding rows write nothing."""
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    ids = gl.load(sorted_ids_ptr + rows)
    gate = gl.load(gate_weight_ptr + ids, mask=ids < num_assign, other=0.0).to(gl.float32)
    values = (acc * gate[:, None]).to(out_ptr.dtype.element_ty)
    layout: gl.constexpr = store_layout(BLOCK_N, WARPS)
    values = gl.convert_layout(values, layout)
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    ids = gl.load(sorted_ids_ptr + rows)  # (again, in this layout: an L1 hit)
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    out_ptrs = out_ptr + ids[:, None].to(gl.int64) * stride_out_a + cols[None, :]
    store_ok = (ids[:, None] < num_assign) & (cols[None, :] < D)
    gl.store(out_ptrs, values, mask=store_ok)


@gluon.jit
def down_ws_kernel(
    h_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_padded_ptr, D, F, num_assign, stride_out_a, num_programs,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
):  # fmt: skip
    """out[a] <- gate[a] * h[row of a] @ W_down[expert of a] (module docstring): h_desc
    boxes BLOCK_M x BLOCK_K of h (P x F), w_desc boxes BLOCK_K x BLOCK_N of the weights
    viewed (E F) x D; num_programs programs, each walking every num_programs-th tile."""
    # (a ring of STAGES boxes; the JIT takes no starred list)
    a_shape: gl.constexpr = [STAGES] + h_desc.block_type.shape  # noqa: RUF005
    b_shape: gl.constexpr = [STAGES] + w_desc.block_type.shape  # noqa: RUF005
    a_bufs = gl.allocate_shared_memory(h_desc.dtype, a_shape, h_desc.layout)
    b_bufs = gl.allocate_shared_memory(w_desc.dtype, b_shape, w_desc.layout)
    ready_bars, empty_bars, order_bars = common.ring_barriers(STAGES)
    loader_args = (
        h_desc, w_desc, a_bufs, b_bufs, ready_bars, empty_bars, block_expert_ptr,
        num_padded_ptr, D, F, num_programs, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )  # fmt: skip
    consumer_args = (
        a_bufs, b_bufs, ready_bars, empty_bars, order_bars, gate_weight_ptr, out_ptr,
        sorted_ids_ptr, num_padded_ptr, D, F, num_assign, stride_out_a, num_programs,
    )  # fmt: skip
    common.specialize(
        _mma_partition, consumer_args, _load_partition, loader_args, BLOCK_M, BLOCK_N,
        BLOCK_K, GROUP_M, PINGPONG,
    )  # fmt: skip


KERNELS = (down_ws_kernel,)


def shared_bytes(config: dict, element_bytes: int) -> int:
    """Shared memory the config takes at most: its ring and its epilogue's scratch."""
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    ring = config["STAGES"] * (block_m * block_k + block_k * block_n) * element_bytes
    return ring + common.SCRATCH_BYTES


def fits(config: dict, D: int, F: int, element_bytes: int) -> bool:
    """Whether these widths suit the config (as `tma.fits` for down: rows 16-byte
    aligned, no K tile running into the next expert's rows) and its shared memory fits."""
    if (D * element_bytes) % 16 or (F * element_bytes) % 16 or F % config["BLOCK_K"]:
        return False
    return shared_bytes(config, element_bytes) <= common.SHARED_BYTES


def candidates(block_m: int, D: int, F: int, element_bytes: int) -> list[dict]:
    """The configs (`"GLUON_WS": True`) the tuner races for down at `block_m` rows
    (64 or 128; none otherwise) beside `tma.candidates`: each tile of TILES that `fits`,
    at 128 rows the 128-wide ones also PINGPONG."""
    return common.candidates(TILES, block_m, 128, lambda c: fits(c, D, F, element_bytes))


def launch_down(
    h_PF: torch.Tensor,
    w_down_EFD: torch.Tensor,
    gate_weight_A: torch.Tensor,
    out_AD: torch.Tensor,
    alignment,
    config: dict,
    programs_max: int,
) -> None:
    """`tma.launch_down`'s result through `down_ws_kernel`: at most `programs_max`
    programs (the streaming multiprocessors), at most one a tile; w_down_EFD contiguous."""
    E, F, D = w_down_EFD.shape
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    programs = min(alignment.max_blocks * ceil_div(D, block_n), programs_max)
    launch(
        down_ws_kernel, (programs,),
        common.descriptor(h_PF, [block_m, block_k]),
        common.descriptor(w_down_EFD.view(E * F, D), [block_k, block_n]),
        gate_weight_A, out_AD, alignment.sorted_ids_P, alignment.block_expert_B,
        alignment.num_padded_1, D, F, alignment.num_assign, out_AD.stride(0), programs,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
        STAGES=config["STAGES"], PINGPONG=bool(config.get("PINGPONG")),
        num_warps=common.consumer_warps(config), maxnreg=common.max_registers(config),
    )  # fmt: skip
