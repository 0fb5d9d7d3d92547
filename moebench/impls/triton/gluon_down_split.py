"""The fused layer's down GEMM in Gluon with its K loop split in two: an experiment raced
only where `$MOEBENCH_DOWN_SPLIT_K=1` (`layer.races_split_down`, off by default; built
in version 37, triton/NOTES.md).

Shape legend as in `kernels.py`; S the splits (2). Why: `gluon_down.down_ws_kernel` is
persistent, one program a streaming multiprocessor each walking every 132nd tile, so a
tile count just over a whole number of waves leaves multiprocessors idle at its end.
Mixtral-8x7B at 1024 tokens has 20 row blocks of 128 and, at the shipped 256 columns, 16
column blocks: 320 tiles, 2.42 waves on an H100's 132, so 56 programs walk three tiles
and 76 two, and Nsight Compute had the multiprocessors active 77% of the kernel's time
(version 37's counters, `results/reference/h100-probes-v37/ncu.txt`; gate_up's, at 17
waves, 97%). Split in two along K (F: 224 steps of 64 there) the same tiles are 640
units of half the work, 4.85 waves, active about 97%.

Each unit computes a tile's half of the K sum (the first or the second half of F's
steps) in float32, times the assignment's routing weight, rounded once into its own row
of out: assignment a's half s goes to row a S + s, so that the sum over slots
(`backward.token_sum` over K S rows a token) adds both halves with the slots, in float32.
Not the same bits as `gluon_down.py`'s whole sums (each half rounded to the output's
dtype before the sum): within the layer's check as any tile is. The cost besides: out
holds S rows an assignment, written once and read once more by the sum (Mixtral-8x7B at
1024 tokens: 16.8 MB more each way).

The loader, the consumer and the epilogue are `gluon_down.py`'s, their walk over units
instead of tiles: kept apart, so that its fingerprints (and the choices shipped with
them) hold while this is measured. If it wins, it folds into `gluon_down.py` as a
config key, and this file goes.
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
from moebench.impls.triton.gluon_common import mma_layout, tile_coords

SPLITS = 2


@gluon.jit
def _load_partition(
    h_desc, w_desc, a_bufs, b_bufs, ready_bars, empty_bars, block_expert_ptr, num_padded_ptr,
    D, F, num_splits, num_programs, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
):  # fmt: skip
    """The loader: every K step of every unit (a tile's share of the K steps) of this
    program, into the ring; a tile's units are neighbours in the walk."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = gl.cdiv(D, BLOCK_N)
    unit_steps = gl.cdiv(F, BLOCK_K) // num_splits
    step = 0
    for unit in range(gl.program_id(0), num_blocks_m * num_blocks_n * num_splits, num_programs):
        pid_m, pid_n = tile_coords(unit // num_splits, num_blocks_m, num_blocks_n, GROUP_M)
        first_k = (unit % num_splits) * unit_steps
        first_w_row = gl.load(block_expert_ptr + pid_m) * F
        for k in range(first_k, first_k + unit_steps):
            slot = step % STAGES
            # (a new mbarrier counts as having completed the phase before its first)
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
    """A consumer (`gluon_down._mma_partition`'s, over units): each unit's K steps from
    the ring, then the weighted scatter of its partial rows to rows a S + s of out."""
    (
        a_bufs, b_bufs, ready_bars, empty_bars, order_bars, gate_weight_ptr, out_ptr,
        sorted_ids_ptr, num_padded_ptr, D, F, num_assign, stride_out_a, num_splits,
        num_programs,
    ) = shared  # fmt: skip
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    WARPS: gl.constexpr = gl.num_warps()
    acc_layout: gl.constexpr = mma_layout(BLOCK_N, WARPS)
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = gl.cdiv(D, BLOCK_N)
    unit_steps = gl.cdiv(F, BLOCK_K) // num_splits
    num_units = num_blocks_m * num_blocks_n * num_splits
    pid = gl.program_id(0)
    my_units = gl.cdiv(gl.maximum(num_units - pid, 0), num_programs)
    for i in range(CONSUMER, my_units, CONSUMERS):
        unit = pid + i * num_programs
        pid_m, pid_n = tile_coords(unit // num_splits, num_blocks_m, num_blocks_n, GROUP_M)
        if CONSUMERS > 1:  # wait for the other consumer's turn at the ring to end
            mbarrier.wait(order_bars.index(CONSUMER), ((i // CONSUMERS) & 1) ^ (1 - CONSUMER))
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
        step = i * unit_steps
        for k in range(unit_steps):
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
        # half s of assignment a: row a S + s (a pointer s rows on, S rows an assignment)
        gluon_down._weighted_scatter(
            acc, gate_weight_ptr, out_ptr + (unit % num_splits) * stride_out_a, sorted_ids_ptr,
            D, num_assign, stride_out_a * num_splits, pid_m, pid_n, BLOCK_M, BLOCK_N,
            acc_layout, WARPS,
        )  # fmt: skip


@gluon.jit
def down_split_ws_kernel(
    h_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_padded_ptr, D, F, num_assign, stride_out_a, num_splits, num_programs,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
):  # fmt: skip
    """out[a S + s] <- gate[a] * (h[row of a] @ W_down[expert of a]) over the s-th of
    num_splits equal shares of F's K steps (module docstring); arguments as
    `gluon_down.down_ws_kernel`'s, stride_out_a the stride of out's rows."""
    a_shape: gl.constexpr = [STAGES] + h_desc.block_type.shape  # noqa: RUF005
    b_shape: gl.constexpr = [STAGES] + w_desc.block_type.shape  # noqa: RUF005
    a_bufs = gl.allocate_shared_memory(h_desc.dtype, a_shape, h_desc.layout)
    b_bufs = gl.allocate_shared_memory(w_desc.dtype, b_shape, w_desc.layout)
    ready_bars, empty_bars, order_bars = common.ring_barriers(STAGES)
    loader_args = (
        h_desc, w_desc, a_bufs, b_bufs, ready_bars, empty_bars, block_expert_ptr,
        num_padded_ptr, D, F, num_splits, num_programs, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )  # fmt: skip
    consumer_args = (
        a_bufs, b_bufs, ready_bars, empty_bars, order_bars, gate_weight_ptr, out_ptr,
        sorted_ids_ptr, num_padded_ptr, D, F, num_assign, stride_out_a, num_splits,
        num_programs,
    )  # fmt: skip
    common.specialize(
        _mma_partition, consumer_args, _load_partition, loader_args, BLOCK_M, BLOCK_N,
        BLOCK_K, GROUP_M, PINGPONG,
    )  # fmt: skip


KERNELS = (down_split_ws_kernel,)


def fits(config: dict, D: int, F: int, element_bytes: int) -> bool:
    """`gluon_down.fits`, and F's K steps split into SPLIT_K equal shares."""
    steps = F // config["BLOCK_K"]
    return gluon_down.fits(config, D, F, element_bytes) and steps % config["SPLIT_K"] == 0


def candidates(block_m: int, D: int, F: int, element_bytes: int) -> list[dict]:
    """`gluon_down.candidates`' configs again with `"SPLIT_K": SPLITS`, where they fit."""
    configs = [
        {**config, "SPLIT_K": SPLITS}
        for config in gluon_down.candidates(block_m, D, F, element_bytes)
    ]
    return [config for config in configs if fits(config, D, F, element_bytes)]


def launch_down(
    h_PF: torch.Tensor,
    w_down_EFD: torch.Tensor,
    gate_weight_A: torch.Tensor,
    out_RD: torch.Tensor,
    alignment,
    config: dict,
    programs_max: int,
) -> None:
    """out_RD's rows a S + s <- each assignment's share s of down (`down_split_ws_kernel`),
    S = config["SPLIT_K"]; out_RD has at least num_assign S rows, contiguous; at most
    `programs_max` programs."""
    E, F, D = w_down_EFD.shape
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    num_splits = config["SPLIT_K"]
    assert out_RD.shape[0] >= alignment.num_assign * num_splits and out_RD.stride(1) == 1
    programs = min(alignment.max_blocks * ceil_div(D, block_n) * num_splits, programs_max)
    launch(
        down_split_ws_kernel, (programs,),
        common.descriptor(h_PF, [block_m, block_k]),
        common.descriptor(w_down_EFD.view(E * F, D), [block_k, block_n]),
        gate_weight_A, out_RD, alignment.sorted_ids_P, alignment.block_expert_B,
        alignment.num_padded_1, D, F, alignment.num_assign, out_RD.stride(0), num_splits,
        programs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=config["GROUP_M"], STAGES=config["STAGES"],
        PINGPONG=bool(config.get("PINGPONG")), num_warps=common.consumer_warps(config),
        maxnreg=common.max_registers(config),
    )  # fmt: skip
