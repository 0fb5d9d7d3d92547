"""An experiment (NOTES.md, version 39): inference's gate_up in Gluon with the products
swapped, so that a tile's rows are wgmma's N, and an expert's rows padded to 64 instead
of 128.

Why: at 1024 tokens the shipped GEMMs run near the card's sustained rate on the rows
they compute, but those rows are padded to whole 128-row blocks of each expert
(Mixtral-8x7B: 2560 rows for 2048 real ones, version 37's counters), and a shorter tail
block costs about as much as a full one (version 37's tail probe). The first version of
this file (commit b7da24f: tiles of 64-192 rows of one expert, each on its own program)
had the same bits but lost: where an expert's tiles differ in height (3 + 2 blocks)
their programs drift apart, and the second reads the weight strip from HBM again (Nsight
Compute, version 39, 288 rows an expert: 3.84 GB from DRAM at 29% L2 hits in 1.46 ms,
where the shipped Gluon tile read 2.65 GB in 1.05 ms).

So here one program computes all of an expert's rows (up to six 64-row blocks: a "unit";
`row_units_kernel` splits a larger expert's blocks into as few units as that allows, as
even as they go) for a strip of BLOCK_N = 64 columns of gate and of up: its two consumer
warp groups take half the blocks each (up to three: 192 rows, 192 accumulator
registers a thread), both reading each K step's weight boxes from the same ring slot,
which both release (an `empty` barrier of two arrivals). Each expert's weights are read
once, the two halves cannot drift, and a unit's rows cost their 64-row blocks.

The products: a warp group's product is the strip's 64 columns (wgmma's M) times its
rows (N), the weight boxes as A and the row blocks, read transposed, as B. A register
tensor's dimensions are powers of two, so three blocks are two accumulators a product,
rows 0-127 and 128-191, each K step issuing both; a warp group's height picks one of
three compiled paths at run time (a warp group with no rows only paces the ring). The
epilogue transposes each accumulator's SwiGLU into h's rows. Same skeleton otherwise as
`gluon_gate_up.py` (`gluon_common.py`: a loader warp filling a ring by TMA, a persistent
walk, the consumers in two partitions as PINGPONG's), with one TMA box a row block, so a
unit's loads are as tall as its rows.

Only `scripts/tail_probe.py` runs it ("Gluon rows"); the layer does not race it.
Measured (version 39, an H100, every expert of Mixtral-8x7B's shape given the same rows):
the same bits as the shipped Gluon tile, 7-8% faster than the best shipped tile where
those pad 288 or 320 rows to 384, 1-12% slower where nothing is padded (256, 384 rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from moebench.fast_launch import launch, next_power_of_2
from moebench.impls.triton import gluon_common as common
from moebench.impls.triton import tma as tma_tiles
from moebench.impls.triton.gluon_common import mma_layout, store_layout, tile_coords

ROW_BLOCK = 64  # the alignment's rows a block
MAX_UNIT_BLOCKS = 6  # a unit's most row blocks: three a warp group, 192 rows
# (BLOCK_N, BLOCK_K, STAGES): a stage holds six row blocks and two weight boxes, 64 KB at
# BLOCK_K = 64, so 3 stages and the two consumers' epilogue scratch fit
TILES = ((64, 64, 3), (64, 32, 6))


@triton.jit
def row_units_kernel(
    padded_ends_ptr, units_ptr, num_units_ptr, num_experts, BLOCK_E: tl.constexpr,
    ROW_BLOCK: tl.constexpr, MAX_UNIT_BLOCKS: tl.constexpr,
):  # fmt: skip
    """units[u] <- first row block * 8 + row blocks of unit u: each expert's blocks split
    into ceil(blocks / MAX_UNIT_BLOCKS) units whose heights differ by at most a block, the
    experts in order; num_units[0] <- their count. One program."""
    offs_e = tl.arange(0, BLOCK_E)
    ok = offs_e < num_experts
    ends = tl.load(padded_ends_ptr + offs_e, mask=ok, other=0)
    starts = tl.load(padded_ends_ptr + offs_e - 1, mask=ok & (offs_e > 0), other=0)
    blocks = tl.where(ok, (ends - starts) // ROW_BLOCK, 0)
    units = (blocks + MAX_UNIT_BLOCKS - 1) // MAX_UNIT_BLOCKS
    first_unit = tl.cumsum(units, 0) - units
    tl.store(num_units_ptr, tl.sum(units, 0))
    per_unit = blocks // tl.maximum(units, 1)
    taller = blocks % tl.maximum(units, 1)  # the first `taller` units take a block more
    first_block = starts // ROW_BLOCK
    for j in range(0, tl.max(units, 0)):
        height = per_unit + (j < taller).to(tl.int32)
        begin = first_block + j * per_unit + tl.minimum(j, taller)
        tl.store(units_ptr + first_unit + j, begin * 8 + height, mask=j < units)


@gluon.jit
def _halves(entry):
    """A unit's table entry -> (first row block, the first warp group's blocks, the
    second's): the first takes the larger half."""
    first_block = entry // 8
    height = entry % 8
    first = (height + 1) // 2
    return first_block, first, height - first


@gluon.jit
def _load_rows(a_desc, bufs, slot, ready, first_block, height, k, BLOCK_K: gl.constexpr):
    """One warp group's row blocks of a K step into its buffers: two into `main` when it
    has two or three, its third (or only) one into `tail`."""
    main_bufs, tail_bufs = bufs
    ROWS: gl.constexpr = a_desc.block_type.shape[0]
    first_row = first_block * ROWS
    for j in gl.static_range(2):
        tma.async_copy_global_to_shared(
            a_desc, [first_row + j * ROWS, k * BLOCK_K], ready,
            main_bufs.index(slot).slice(j * ROWS, ROWS), pred=height >= 2,
        )  # fmt: skip
    tail_row = first_row + gl.where(height == 3, 2 * ROWS, 0)
    tma.async_copy_global_to_shared(
        a_desc, [tail_row, k * BLOCK_K], ready, tail_bufs.index(slot),
        pred=(height == 1) | (height == 3),
    )  # fmt: skip


@gluon.jit
def _load_partition(
    a_desc, w_desc, rows_bufs, gate_bufs, up_bufs, ready_bars, empty_bars, units_ptr,
    num_units_ptr, block_expert_ptr, D, F, num_programs, BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
):  # fmt: skip
    """The loader: every K step of every unit of this program, into the ring, one box a
    row block of the unit."""
    rows0, rows1 = rows_bufs
    STAGES: gl.constexpr = gate_bufs.type.shape[0]
    row_bytes: gl.constexpr = a_desc.block_type.nbytes
    w_bytes: gl.constexpr = 2 * w_desc.block_type.nbytes
    num_units = gl.load(num_units_ptr)
    num_blocks_n = F // BLOCK_N
    k_steps = gl.cdiv(D, BLOCK_K)
    step = 0
    for tile in range(gl.program_id(0), num_units * num_blocks_n, num_programs):
        pid_m, pid_n = tile_coords(tile, num_units, num_blocks_n, GROUP_M)
        first_block, first, second = _halves(gl.load(units_ptr + pid_m))
        gate_row = gl.load(block_expert_ptr + first_block) * 2 * F + pid_n * BLOCK_N
        for k in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(empty_bars.index(slot), ((step // STAGES) & 1) ^ 1)
            ready = ready_bars.index(slot)
            # (an expect is an arrival: exactly one of these, with the unit's bytes)
            for blocks in gl.static_range(1, 7):
                mbarrier.expect(ready, w_bytes + blocks * row_bytes, pred=first + second == blocks)
            _load_rows(a_desc, rows0, slot, ready, first_block, first, k, BLOCK_K)
            _load_rows(a_desc, rows1, slot, ready, first_block + first, second, k, BLOCK_K)
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
    """Consumer CONSUMER (a warp group) of 2: its half of each unit of this program's
    walk, through the path compiled for its height; BLOCK_M is a row block's height."""
    (
        rows_bufs, gate_bufs, up_bufs, ready_bars, empty_bars, h_ptr, units_ptr,
        num_units_ptr, D, F, stride_h_p, num_programs,
    ) = shared  # fmt: skip
    num_units = gl.load(num_units_ptr)
    num_blocks_n = F // BLOCK_N
    k_steps = gl.cdiv(D, BLOCK_K)
    STAGES: gl.constexpr = gate_bufs.type.shape[0]
    pid = gl.program_id(0)
    my_tiles = gl.cdiv(gl.maximum(num_units * num_blocks_n - pid, 0), num_programs)
    ring = (rows_bufs[CONSUMER], gate_bufs, up_bufs, ready_bars, empty_bars)
    for i in range(my_tiles):
        pid_m, pid_n = tile_coords(pid + i * num_programs, num_units, num_blocks_n, GROUP_M)
        first_block, first, second = _halves(gl.load(units_ptr + pid_m))
        if CONSUMER == 0:
            height = first
            first_row = first_block * BLOCK_M
        else:
            height = second
            first_row = (first_block + first) * BLOCK_M
        out = (h_ptr, stride_h_p, first_row, pid_n)
        step = i * k_steps
        if height == 3:
            _tile(ring, out, step, k_steps, BLOCK_M, BLOCK_N, True, True)
        elif height == 2:
            _tile(ring, out, step, k_steps, BLOCK_M, BLOCK_N, True, False)
        elif height == 1:
            _tile(ring, out, step, k_steps, BLOCK_M, BLOCK_N, False, True)
        else:  # no rows of this unit: pace the ring, releasing each slot once
            for _ in range(k_steps):
                slot = step % STAGES
                mbarrier.wait(ready_bars.index(slot), (step // STAGES) & 1)
                mbarrier.arrive(empty_bars.index(slot))
                step += 1


@gluon.jit
def _tile(
    ring, out, step, k_steps, ROW_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr,
    MAIN: gl.constexpr, TAIL: gl.constexpr,
):  # fmt: skip
    """One warp group's K loop and epilogue of a unit: MAIN, its first two row blocks (an
    accumulator of BLOCK_N x 128 a product); TAIL, one more block (BLOCK_N x 64) after
    MAIN's or alone."""
    rows_bufs, gate_bufs, up_bufs, ready_bars, empty_bars = ring
    main_bufs, tail_bufs = rows_bufs
    h_ptr, stride_h_p, first_row, pid_n = out
    STAGES: gl.constexpr = gate_bufs.type.shape[0]
    WARPS: gl.constexpr = gl.num_warps()
    MAIN_ROWS: gl.constexpr = 2 * ROW_BLOCK
    TAIL_AT: gl.constexpr = MAIN_ROWS if MAIN else 0
    IN_FLIGHT: gl.constexpr = 4 if MAIN and TAIL else 2
    main_layout: gl.constexpr = mma_layout(MAIN_ROWS, WARPS)
    tail_layout: gl.constexpr = mma_layout(ROW_BLOCK, WARPS)
    if MAIN:
        gate_main = gl.zeros((BLOCK_N, MAIN_ROWS), gl.float32, main_layout)
        up_main = gl.zeros((BLOCK_N, MAIN_ROWS), gl.float32, main_layout)
    if TAIL:
        gate_tail = gl.zeros((BLOCK_N, ROW_BLOCK), gl.float32, tail_layout)
        up_tail = gl.zeros((BLOCK_N, ROW_BLOCK), gl.float32, tail_layout)
    for k in range(k_steps):
        slot = step % STAGES
        mbarrier.wait(ready_bars.index(slot), (step // STAGES) & 1)
        gate_w = gate_bufs.index(slot)
        up_w = up_bufs.index(slot)
        if MAIN:
            x_main = main_bufs.index(slot).permute((1, 0))
            gate_main = warpgroup_mma(gate_w, x_main, gate_main, is_async=True)
            up_main = warpgroup_mma(up_w, x_main, up_main, is_async=True)
        if TAIL:
            x_tail = tail_bufs.index(slot).permute((1, 0))
            gate_tail = warpgroup_mma(gate_w, x_tail, gate_tail, is_async=True)
            up_tail = warpgroup_mma(up_w, x_tail, up_tail, is_async=True)
        # this step's in flight: the previous step's have read their slot
        if MAIN and TAIL:
            gate_main, up_main, gate_tail, up_tail = warpgroup_mma_wait(
                num_outstanding=IN_FLIGHT, deps=(gate_main, up_main, gate_tail, up_tail)
            )
        elif MAIN:
            gate_main, up_main = warpgroup_mma_wait(
                num_outstanding=IN_FLIGHT, deps=(gate_main, up_main)
            )
        else:
            gate_tail, up_tail = warpgroup_mma_wait(
                num_outstanding=IN_FLIGHT, deps=(gate_tail, up_tail)
            )
        mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES), pred=k > 0)
        step += 1
    if MAIN:
        gate_main, up_main = warpgroup_mma_wait(num_outstanding=0, deps=(gate_main, up_main))
    if TAIL:
        gate_tail, up_tail = warpgroup_mma_wait(num_outstanding=0, deps=(gate_tail, up_tail))
    mbarrier.arrive(empty_bars.index((step + STAGES - 1) % STAGES))
    if MAIN:
        _swiglu_store_rows(gate_main, up_main, h_ptr, stride_h_p, first_row, pid_n, WARPS)
    if TAIL:
        tail_row = first_row + TAIL_AT
        _swiglu_store_rows(gate_tail, up_tail, h_ptr, stride_h_p, tail_row, pid_n, WARPS)


@gluon.jit
def _swiglu_store_rows(acc_gate, acc_up, h_ptr, stride_h_p, first_row, pid_n, WARPS: gl.constexpr):
    """`gluon_gate_up._swiglu_store` of a transposed tile (columns x rows): SwiGLU in
    float32, in the same operations' order, rounded once, then turned into h's rows
    (BLOCK_N columns of rows first_row...) and stored in 16-byte row segments."""
    BLOCK_N: gl.constexpr = acc_gate.type.shape[0]
    ROWS: gl.constexpr = acc_gate.type.shape[1]
    h = acc_gate * (1 / (1 + gl.exp(-acc_gate))) * acc_up
    layout: gl.constexpr = store_layout(BLOCK_N, WARPS)
    h = gl.convert_layout(gl.permute(h.to(h_ptr.dtype.element_ty), (1, 0)), layout)
    rows = first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    gl.store(h_ptr + rows[:, None].to(gl.int64) * stride_h_p + cols[None, :], h)


@gluon.jit
def gate_up_rows_kernel(
    a_desc, w_desc, h_ptr, units_ptr, num_units_ptr, block_expert_ptr, D, F, stride_h_p,
    num_programs, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
    STAGES: gl.constexpr,
):  # fmt: skip
    """h[row] <- SwiGLU of the gathered row through its expert's gate and up rows, by
    units of `row_units_kernel`'s table (module docstring): a_desc boxes 64 x BLOCK_K of
    the gathered rows (P x D, in 64-row blocks), w_desc BLOCK_N x BLOCK_K of the weights
    viewed (E 2F) x D; num_programs programs, each walking every num_programs-th tile
    (unit and strip of columns)."""
    ROWS: gl.constexpr = a_desc.block_type.shape[0]
    main_shape: gl.constexpr = [STAGES, 2 * ROWS, BLOCK_K]
    tail_shape: gl.constexpr = [STAGES, ROWS, BLOCK_K]
    w_shape: gl.constexpr = [STAGES] + w_desc.block_type.shape  # noqa: RUF005
    # each consumer's rows: two blocks and one apart (a shared buffer's dimensions are
    # powers of two too)
    rows_bufs = (
        (
            gl.allocate_shared_memory(a_desc.dtype, main_shape, a_desc.layout),
            gl.allocate_shared_memory(a_desc.dtype, tail_shape, a_desc.layout),
        ),
        (
            gl.allocate_shared_memory(a_desc.dtype, main_shape, a_desc.layout),
            gl.allocate_shared_memory(a_desc.dtype, tail_shape, a_desc.layout),
        ),
    )
    gate_bufs = gl.allocate_shared_memory(w_desc.dtype, w_shape, w_desc.layout)
    up_bufs = gl.allocate_shared_memory(w_desc.dtype, w_shape, w_desc.layout)
    ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=2)  # both consumers release a slot
    loader_args = (
        a_desc, w_desc, rows_bufs, gate_bufs, up_bufs, ready_bars, empty_bars, units_ptr,
        num_units_ptr, block_expert_ptr, D, F, num_programs, BLOCK_N, BLOCK_K, GROUP_M,
    )  # fmt: skip
    consumer_args = (
        rows_bufs, gate_bufs, up_bufs, ready_bars, empty_bars, h_ptr, units_ptr,
        num_units_ptr, D, F, stride_h_p, num_programs,
    )  # fmt: skip
    common.specialize(
        _mma_partition, consumer_args, _load_partition, loader_args, ROWS, BLOCK_N, BLOCK_K,
        GROUP_M, True,
    )  # fmt: skip


KERNELS = (row_units_kernel, tma_tiles.gather_rows_kernel, gate_up_rows_kernel)


def shared_bytes(config: dict, element_bytes: int) -> int:
    """Shared memory the config takes at most: its ring (six row blocks and two weight
    boxes a stage) and its two consumers' epilogue scratch."""
    rows = MAX_UNIT_BLOCKS * ROW_BLOCK
    ring = config["STAGES"] * (rows + 2 * config["BLOCK_N"]) * config["BLOCK_K"] * element_bytes
    return ring + common.SCRATCH_BYTES


def candidates(D: int, F: int, element_bytes: int) -> list[dict]:
    """The configs (`"GLUON_ROWS": True`, BLOCK_M the alignment's 64) that suit these
    widths, as `gluon_gate_up.fits` decides for its own."""
    configs = []
    for block_n, block_k, stages in TILES:
        config = {"BLOCK_M": ROW_BLOCK, "BLOCK_N": block_n, "BLOCK_K": block_k,
                  "GROUP_M": 8, "STAGES": stages, "GLUON_ROWS": True}  # fmt: skip
        aligned = not (D * element_bytes % 16 or F * element_bytes % 16 or F % block_n)
        if aligned and shared_bytes(config, element_bytes) <= common.SHARED_BYTES:
            configs.append(config)
    return configs


def row_units(alignment, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(units, num_units) of `row_units_kernel` for a 64-row alignment, on its device."""
    assert alignment.block_m == ROW_BLOCK and alignment.padded_ends_E is not None
    device = alignment.block_expert_B.device
    units_R = torch.empty(alignment.max_blocks, device=device, dtype=torch.int32)
    num_units_1 = torch.empty(1, device=device, dtype=torch.int32)
    launch(
        row_units_kernel, (1,), alignment.padded_ends_E, units_R, num_units_1, num_experts,
        BLOCK_E=next_power_of_2(num_experts), ROW_BLOCK=ROW_BLOCK,
        MAX_UNIT_BLOCKS=MAX_UNIT_BLOCKS, num_warps=4,
    )  # fmt: skip
    return units_R, num_units_1


def launch_gate_up(
    x_TD: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    h_PF: torch.Tensor,
    alignment,
    top_k: int,
    config: dict,
    programs_max: int,
) -> None:
    """`gluon_gate_up.launch_gate_up`'s h_PF from a 64-row alignment: the unit table,
    the gather of x's rows, then `gate_up_rows_kernel` on at most `programs_max`
    programs; w_gate_up_E2FD contiguous."""
    E, two_f, D = w_gate_up_E2FD.shape
    F = two_f // 2
    block_n, block_k = config["BLOCK_N"], config["BLOCK_K"]
    units_R, num_units_1 = row_units(alignment, E)
    a_PD = tma_tiles.gathered_rows(x_TD, alignment, top_k)
    programs = min(alignment.max_blocks * (F // block_n), programs_max)
    launch(
        gate_up_rows_kernel, (programs,),
        common.descriptor(a_PD, [ROW_BLOCK, block_k]),
        common.descriptor(w_gate_up_E2FD.view(E * two_f, D), [block_n, block_k]),
        h_PF, units_R, num_units_1, alignment.block_expert_B, D, F, h_PF.stride(0),
        programs, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
        STAGES=config["STAGES"], num_warps=4,
        maxnreg=common.max_registers({"BLOCK_M": 2 * ROW_BLOCK, "PINGPONG": True}),
    )  # fmt: skip
