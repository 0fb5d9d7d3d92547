"""Inference's gate_up GEMM in Gluon as one product twice as wide: gate's and up's weight
boxes side by side in one ring slot, one wgmma of 2 BLOCK_N columns a K step where
`gluon_gate_up.py` issues two of BLOCK_N. An experiment, raced nowhere yet
(`scripts/tail_probe.py`'s `Gluon, ONE_DOT` variant times it; built in version 38,
triton/NOTES.md).

Shape legend as in `kernels.py`. Why: each warp group's wgmma reads its A rows and the
whole B box from shared memory, so `gluon_gate_up.py`'s two products a step read the row
block twice. At 128 x 128 x 64 tiles a K step then reads 96 KB from shared memory beside
the 48 KB the TMA writes into it: 144 KB in the 1024 cycles the step's 4.2 MFLOP take at
Hopper's 4096 bf16 FLOP a cycle per multiprocessor, where shared memory serves 128 bytes
a cycle (1152 cycles): the tile is bound by shared memory, not the tensor cores. One
product of 256 columns reads the row block once (80 KB, 128 KB a step in all: 1024
cycles). `tma.py`'s ONE_DOT tiles do the same in Triton, and at Mixtral-8x7B's shape
they ran 6% faster than `gluon_gate_up.py` on an H100 (version 38's tail probe).

The loader copies gate's box into a slot's first BLOCK_N rows and up's into the next;
the accumulator (BLOCK_M x 2 BLOCK_N, 128 registers a thread on two warp groups, as the
two of `gluon_gate_up.py`) is split into gate's and up's halves for the SwiGLU epilogue.
Cooperative consumers only (8 warps; one warp group's 128 x 256 would take 256
registers). Same K steps, so the same bits as `gluon_gate_up.py`.

Gluon has no interpreter: these kernels compile here for sm_90 (`moebench.offline_compile`,
tests/test_gluon_gate_up_wide.py) and run only on a Hopper card.
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
from moebench.impls.triton.gluon_common import mma_layout, tile_coords

# (BLOCK_N, BLOCK_K, STAGES) at 128-row blocks: a ring slot holds the row block and both
# weight boxes, as gluon_gate_up.py's.
TILES = ((128, 64, 3), (128, 64, 4), (64, 64, 4), (64, 64, 6))


@gluon.jit
def _load_partition(
    a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, block_expert_ptr, num_padded_ptr,
    D, F, num_programs, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr,
):  # fmt: skip
    """The loader: every K step of every tile of this program, into the ring (gate's box
    in a slot's first BLOCK_N rows, up's in the rest)."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    # (BLOCK_N from the ring's shape: the tuple of the loader's arguments, unpacked, does
    # not keep it a compile-time constant, which `slice` needs)
    HALF: gl.constexpr = w_bufs.type.shape[1] // 2
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
            w = w_bufs.index(slot)
            tma.async_copy_global_to_shared(
                w_desc, [gate_row, k * BLOCK_K], ready, w.slice(0, HALF)
            )
            tma.async_copy_global_to_shared(
                w_desc, [gate_row + F, k * BLOCK_K], ready, w.slice(HALF, HALF)
            )
            step += 1


@gluon.jit
def _mma_partition(
    shared, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, CONSUMER: gl.constexpr, CONSUMERS: gl.constexpr,
):  # fmt: skip
    """The consumer: each of this program's tiles, its K loop from the ring (one wgmma of
    2 BLOCK_N columns a step, the weight boxes read transposed), then SwiGLU into h."""
    (
        a_bufs, w_bufs, ready_bars, empty_bars, h_ptr, num_padded_ptr, D, F, stride_h_p,
        num_programs,
    ) = shared  # fmt: skip
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    WARPS: gl.constexpr = gl.num_warps()
    acc_layout: gl.constexpr = mma_layout(2 * BLOCK_N, WARPS)
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = F // BLOCK_N
    k_steps = gl.cdiv(D, BLOCK_K)
    step = 0
    for tile in range(gl.program_id(0), num_blocks_m * num_blocks_n, num_programs):
        pid_m, pid_n = tile_coords(tile, num_blocks_m, num_blocks_n, GROUP_M)
        acc = gl.zeros((BLOCK_M, 2 * BLOCK_N), gl.float32, acc_layout)
        for k in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(ready_bars.index(slot), (step // STAGES) & 1)
            w = w_bufs.index(slot).permute((1, 0))
            acc = warpgroup_mma(a_bufs.index(slot), w, acc, is_async=True)
            # this step's in flight: the previous step's has read its slot
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES), pred=k > 0)
            step += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES))
        acc_gate, acc_up = gl.split(gl.permute(gl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
        gluon_gate_up._swiglu_store(
            acc_gate, acc_up, h_ptr, stride_h_p, pid_m, pid_n, BLOCK_M, BLOCK_N, WARPS
        )


@gluon.jit
def gate_up_wide_ws_kernel(
    a_desc, w_desc, h_ptr, block_expert_ptr, num_padded_ptr, D, F, stride_h_p, num_programs,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """h[row] <- SwiGLU of the gathered row through its expert's gate and up rows
    (module docstring): a_desc boxes BLOCK_M x BLOCK_K of the gathered rows (P x D),
    w_desc boxes BLOCK_N x BLOCK_K of the weights viewed (E 2F) x D; num_programs
    programs, each walking every num_programs-th tile."""
    a_shape: gl.constexpr = [STAGES] + a_desc.block_type.shape  # noqa: RUF005
    w_shape: gl.constexpr = [STAGES, 2 * BLOCK_N, BLOCK_K]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, a_shape, a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, w_shape, w_desc.layout)
    ready_bars, empty_bars, _ = common.ring_barriers(STAGES)
    loader_args = (
        a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, block_expert_ptr,
        num_padded_ptr, D, F, num_programs, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )  # fmt: skip
    consumer_args = (
        a_bufs, w_bufs, ready_bars, empty_bars, h_ptr, num_padded_ptr, D, F, stride_h_p,
        num_programs,
    )  # fmt: skip
    common.specialize(
        _mma_partition, consumer_args, _load_partition, loader_args, BLOCK_M, BLOCK_N,
        BLOCK_K, GROUP_M, False,
    )  # fmt: skip


KERNELS = (tma_tiles.gather_rows_kernel, gate_up_wide_ws_kernel)


def candidates(block_m: int, D: int, F: int, element_bytes: int) -> list[dict]:
    """The configs (`"GLUON_WS": True, "ONE_DOT": True`) at `block_m` rows (128 only) that
    `gluon_gate_up.fits` (the same ring and scratch), one a tile of TILES."""
    if block_m != 128:
        return []
    configs = [
        {"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
         "STAGES": stages, "GLUON_WS": True, "ONE_DOT": True}
        for block_n, block_k, stages in TILES
    ]  # fmt: skip
    return [c for c in configs if gluon_gate_up.fits(c, D, F, element_bytes)]


def launch_gate_up(
    x_TD: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    h_PF: torch.Tensor,
    alignment,
    top_k: int,
    config: dict,
    programs_max: int,
) -> None:
    """`gluon_gate_up.launch_gate_up`'s h_PF through `tma.gathered_rows` and
    `gate_up_wide_ws_kernel`: at most `programs_max` programs, at most one a tile;
    w_gate_up_E2FD contiguous."""
    E, two_f, D = w_gate_up_E2FD.shape
    F = two_f // 2
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    a_PD = tma_tiles.gathered_rows(x_TD, alignment, top_k)
    programs = min(alignment.max_blocks * (F // block_n), programs_max)
    launch(
        gate_up_wide_ws_kernel, (programs,),
        common.descriptor(a_PD, [block_m, block_k]),
        common.descriptor(w_gate_up_E2FD.view(E * two_f, D), [block_n, block_k]),
        h_PF, alignment.block_expert_B, alignment.num_padded_1, D, F, h_PF.stride(0),
        programs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=config["GROUP_M"], STAGES=config["STAGES"],
        num_warps=common.consumer_warps(config), maxnreg=common.max_registers(config),
    )  # fmt: skip
