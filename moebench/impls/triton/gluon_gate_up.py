"""The fused layer's inference gate_up GEMM warp-specialised in Gluon: tuning candidates
beside `tma.py`'s (`layer.races_gluon`; `$MOEBENCH_GLUON_WS=0` leaves them out), built in
version 30, raced by default since 31 (triton/NOTES.md).

Shape legend as in `kernels.py`. Same result as `tma.gate_up_tma_kernel`'s two-product
tile, bit for bit (each row of the gathered x @ the expert's gate rows and @ its up
rows in float32, SwiGLU in float32, rounded once into h; padding rows, gathered as
zeros, give zeros), computed by the persistent, warp-specialised skeleton
`gluon_common.py` explains: a loader warp fills a ring of shared-memory slots by TMA
(here three boxes a K step: the row block of the gathered x, the expert's gate rows and
its up rows), consumers issue both wgmmas asynchronously and run the SwiGLU epilogue,
and the loader fills the next tile's slots under this tile's epilogue. Why: at 8192
tokens gate_up is about 60% of the layer's GEMM time, and version 26's probe of a Gluon
gate_up (on a branch since lost) had it 4% faster than the shipped winners on
DeepSeek-V3's and Mixtral-8x7B's shapes.

Two float32 accumulators of BLOCK_M x BLOCK_N a consumer: 128 registers a thread at 128
rows and 128 columns on two warp groups, so PINGPONG (two consumers of one warp group
each, alternate tiles) takes 64 columns only. Inference only: training's gate_up also
stores the pre-activations, and races the Triton tiles alone.

Gluon has no interpreter: these kernels compile here for sm_90 (`moebench.offline_compile`,
tests/test_gluon_gate_up.py) and run only on a Hopper card.
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
from moebench.impls.triton import tma as tma_tiles
from moebench.impls.triton.gluon_common import mma_layout, store_layout, tile_coords

# (BLOCK_N, BLOCK_K, STAGES) per row-block height. A step's ring slot holds the row
# block and two weight boxes: 48 KB at 128 rows and 128 columns, so 4 stages and the
# epilogue's scratch just fit.
TILES = {
    128: ((128, 64, 3), (128, 64, 4), (64, 64, 4), (64, 64, 6)),
    64: ((128, 64, 4), (64, 64, 6)),
}


@gluon.jit
def _load_partition(
    a_desc, w_desc, a_bufs, gate_bufs, up_bufs, ready_bars, empty_bars, block_expert_ptr,
    num_padded_ptr, D, F, num_programs, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
):  # fmt: skip
    """The loader: every K step of every tile of this program, into the ring."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = F // BLOCK_N
    k_steps = gl.cdiv(D, BLOCK_K)
    step_bytes: gl.constexpr = a_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes
    step = 0
    for tile in range(gl.program_id(0), num_blocks_m * num_blocks_n, num_programs):
        pid_m, pid_n = tile_coords(tile, num_blocks_m, num_blocks_n, GROUP_M)
        gate_row = gl.load(block_expert_ptr + pid_m) * 2 * F + pid_n * BLOCK_N
        for k in range(k_steps):
            slot = step % STAGES
            # a new mbarrier counts as having completed the phase before its first
            mbarrier.wait(empty_bars.index(slot), ((step // STAGES) & 1) ^ 1)
            ready = ready_bars.index(slot)
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
    """A consumer: the tiles i = CONSUMER, CONSUMER + CONSUMERS, ... of this program's
    walk, each K loop from the ring (the weight boxes, K-major, read transposed), then
    SwiGLU into h; `shared`: the ring, the barriers and the run-time arguments."""
    (
        a_bufs, gate_bufs, up_bufs, ready_bars, empty_bars, order_bars, h_ptr,
        num_padded_ptr, D, F, stride_h_p, num_programs,
    ) = shared  # fmt: skip
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    WARPS: gl.constexpr = gl.num_warps()
    acc_layout: gl.constexpr = mma_layout(BLOCK_N, WARPS)
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = F // BLOCK_N
    k_steps = gl.cdiv(D, BLOCK_K)
    num_tiles = num_blocks_m * num_blocks_n
    pid = gl.program_id(0)
    my_tiles = gl.cdiv(gl.maximum(num_tiles - pid, 0), num_programs)
    for i in range(CONSUMER, my_tiles, CONSUMERS):
        pid_m, pid_n = tile_coords(pid + i * num_programs, num_blocks_m, num_blocks_n, GROUP_M)
        if CONSUMERS > 1:  # wait for the other consumer's turn at the ring to end
            mbarrier.wait(order_bars.index(CONSUMER), ((i // CONSUMERS) & 1) ^ (1 - CONSUMER))
        acc_gate = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
        acc_up = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
        step = i * k_steps
        for k in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(ready_bars.index(slot), (step // STAGES) & 1)
            a = a_bufs.index(slot)
            gate_w = gate_bufs.index(slot).permute((1, 0))
            up_w = up_bufs.index(slot).permute((1, 0))
            acc_gate = warpgroup_mma(a, gate_w, acc_gate, is_async=True)
            acc_up = warpgroup_mma(a, up_w, acc_up, is_async=True)
            # this step's two in flight: the previous step's have read their slot
            acc_gate, acc_up = warpgroup_mma_wait(num_outstanding=2, deps=(acc_gate, acc_up))
            mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES), pred=k > 0)
            step += 1
        if CONSUMERS > 1:
            mbarrier.arrive(order_bars.index(1 - CONSUMER))
        acc_gate, acc_up = warpgroup_mma_wait(num_outstanding=0, deps=(acc_gate, acc_up))
        mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES))
        _swiglu_store(acc_gate, acc_up, h_ptr, stride_h_p, pid_m, pid_n, BLOCK_M, BLOCK_N, WARPS)


@gluon.jit
def _swiglu_store(
    acc_gate, acc_up, h_ptr, stride_h_p, pid_m, pid_n, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, WARPS: gl.constexpr,
):  # fmt: skip
    """`tma._swiglu_store` in Gluon: gate * sigmoid(gate) * up in float32, in the
    operations' order of `tl.sigmoid` (1 / (1 + exp(-x))), rounded once into h's rows;
    stored through a layout of 16-byte row segments."""
    h = acc_gate * (1 / (1 + gl.exp(-acc_gate))) * acc_up
    layout: gl.constexpr = store_layout(BLOCK_N, WARPS)
    h = gl.convert_layout(h.to(h_ptr.dtype.element_ty), layout)
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    gl.store(h_ptr + rows[:, None].to(gl.int64) * stride_h_p + cols[None, :], h)


@gluon.jit
def gate_up_ws_kernel(
    a_desc, w_desc, h_ptr, block_expert_ptr, num_padded_ptr, D, F, stride_h_p, num_programs,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
):  # fmt: skip
    """h[row] <- SwiGLU of the gathered row through its expert's gate and up rows
    (module docstring): a_desc boxes BLOCK_M x BLOCK_K of the gathered rows (P x D),
    w_desc boxes BLOCK_N x BLOCK_K of the weights viewed (E 2F) x D; num_programs
    programs, each walking every num_programs-th tile."""
    a_shape: gl.constexpr = [STAGES] + a_desc.block_type.shape  # noqa: RUF005
    w_shape: gl.constexpr = [STAGES] + w_desc.block_type.shape  # noqa: RUF005
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, a_shape, a_desc.layout)
    gate_bufs = gl.allocate_shared_memory(w_desc.dtype, w_shape, w_desc.layout)
    up_bufs = gl.allocate_shared_memory(w_desc.dtype, w_shape, w_desc.layout)
    ready_bars, empty_bars, order_bars = common.ring_barriers(STAGES)
    loader_args = (
        a_desc, w_desc, a_bufs, gate_bufs, up_bufs, ready_bars, empty_bars, block_expert_ptr,
        num_padded_ptr, D, F, num_programs, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )  # fmt: skip
    consumer_args = (
        a_bufs, gate_bufs, up_bufs, ready_bars, empty_bars, order_bars, h_ptr,
        num_padded_ptr, D, F, stride_h_p, num_programs,
    )  # fmt: skip
    common.specialize(
        _mma_partition, consumer_args, _load_partition, loader_args, BLOCK_M, BLOCK_N,
        BLOCK_K, GROUP_M, PINGPONG,
    )  # fmt: skip


KERNELS = (tma_tiles.gather_rows_kernel, gate_up_ws_kernel)


def shared_bytes(config: dict, element_bytes: int) -> int:
    """Shared memory the config takes at most: its ring (a row block and two weight
    boxes a stage) and its epilogue's scratch."""
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    ring = config["STAGES"] * (block_m + 2 * block_n) * block_k * element_bytes
    return ring + common.SCRATCH_BYTES


def fits(config: dict, D: int, F: int, element_bytes: int) -> bool:
    """Whether these widths suit the config (as `tma.fits` for gate_up: rows 16-byte
    aligned, no N tile running from gate into up) and its shared memory fits."""
    if (D * element_bytes) % 16 or (F * element_bytes) % 16 or F % config["BLOCK_N"]:
        return False
    return shared_bytes(config, element_bytes) <= common.SHARED_BYTES


def candidates(block_m: int, D: int, F: int, element_bytes: int) -> list[dict]:
    """The configs (`"GLUON_WS": True`) the tuner races for inference's gate_up at
    `block_m` rows (64 or 128; none otherwise) beside `tma.candidates`: each tile of
    TILES that `fits`, at 128 rows the 64-wide ones also PINGPONG (two accumulators of
    128 x 128 would not fit one warp group's registers)."""
    return common.candidates(TILES, block_m, 64, lambda c: fits(c, D, F, element_bytes))


def launch_gate_up(
    x_TD: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    h_PF: torch.Tensor,
    alignment,
    top_k: int,
    config: dict,
    programs_max: int,
) -> None:
    """`tma.launch_gate_up`'s h_PF (no pre-activations) through `tma.gathered_rows` and
    `gate_up_ws_kernel`: at most `programs_max` programs (the streaming multiprocessors),
    at most one a tile; w_gate_up_E2FD contiguous."""
    E, two_f, D = w_gate_up_E2FD.shape
    F = two_f // 2
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    a_PD = tma_tiles.gathered_rows(x_TD, alignment, top_k)
    programs = min(alignment.max_blocks * (F // block_n), programs_max)
    launch(
        gate_up_ws_kernel, (programs,),
        common.descriptor(a_PD, [block_m, block_k]),
        common.descriptor(w_gate_up_E2FD.view(E * two_f, D), [block_n, block_k]),
        h_PF, alignment.block_expert_B, alignment.num_padded_1, D, F, h_PF.stride(0),
        programs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=config["GROUP_M"], STAGES=config["STAGES"],
        PINGPONG=bool(config.get("PINGPONG")), num_warps=common.consumer_warps(config),
        maxnreg=common.max_registers(config),
    )  # fmt: skip
