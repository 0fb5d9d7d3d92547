"""The fused layer's down GEMM warp-specialised in Gluon (Triton's explicit-layout
language): tuning candidates beside `tma.py`'s, raced only with `$MOEBENCH_GLUON_WS=1`
(`layer.races_gluon`) until a card has timed them in the layer (triton/NOTES.md, version 27).

Shape legend as in `kernels.py`. Same result as `tma.down_tma_kernel`, bit for bit where
the K steps are the same (each row of h @ W_down[expert] in float32, times its
assignment's routing weight, to that assignment's row of out; padding rows write
nothing), computed by a persistent grid (one program a streaming multiprocessor) split
into roles:

- **The loader**, one warp with few registers, walks the program's tiles (GROUP_M row
  blocks at a time, as `kernels._block_coords`) and each K step waits for a free slot of
  a ring of STAGES shared-memory slots (its `empty` mbarrier), then issues the TMA copies
  of h's row block and the expert's weight tile into it, which complete on the slot's
  `ready` mbarrier. It fills the next tile's slots while the consumers run this tile's
  epilogue: the Triton kernels' software pipeline waits at a CTA barrier there, and
  version 23's counters put a third of the large-batch GEMMs' stalls at it.
- **The consumers** wait for `ready`, issue the wgmma asynchronously, wait until only it
  is in flight, and hand the previous step's slot back. Cooperative: one consumer of
  `consumer_warps` warps (8 at 128-row blocks: two warpgroups, 64 rows each; 4 at 64).
  PINGPONG (128-row blocks): two consumers of four warps take alternate tiles, so that
  one's epilogue runs under the other's K loop (down's K loop is short: 12-32 steps of
  64 on the four presets, so its epilogue is a large share of a tile). They take turns at
  the ring through a pair of `order` mbarriers: a consumer starts a tile's K loop only
  once the other has waited for all of its previous tile's slots, because an mbarrier's
  wait is on the parity of its phase: waiting for a slot's next fill but one, it would
  pass at once on the fill the slot still holds.

The epilogue multiplies in the wgmma's own layout and rounds, then moves the rows
through shared memory (a scratch buffer of each consumer's, apart from the ring) to a
layout whose warps store whole 16-byte row segments: from the wgmma's layout a thread
would store 4 bytes at a time.

Gluon has no interpreter: these kernels compile here for sm_90 (`moebench.offline_compile`,
tests/test_gluon_down.py) and run only on a Hopper card.
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
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from moebench import fast_launch
from moebench.fast_launch import ceil_div, launch

# An H100's or H200's shared memory a block may use (227 KB), less the barriers'.
SHARED_BYTES = 232448 - 1024
# The epilogue's scratch, at most: 8-32 KB in every compile for sm_90 here (Triton moves
# a tile through it in pieces; tests/test_gluon_down.py holds the compiles to this bound).
SCRATCH_BYTES = 32768
# Registers a thread: the loader's warp group, and (PINGPONG) the second consumer's. The
# first consumer gets what the kernel's `maxnreg` leaves (`max_registers`).
REGISTER_FILE = 65536
LOADER_REGISTERS = 40
CONSUMER_REGISTERS = 232
# (as the kernels read them: a JIT function reads only constexpr globals)
_LOADER_REGISTERS = gl.constexpr(LOADER_REGISTERS)
_CONSUMER_REGISTERS = gl.constexpr(CONSUMER_REGISTERS)
# (BLOCK_N, BLOCK_K, STAGES) per row-block height: the configs of version 26's winners
# (128 rows: N256 S4 on DeepSeek-V3's and Mixtral-8x7B's 8192 tokens, N128 S6 PINGPONG on
# Qwen3-30B-A3B's 8192 and Mixtral-8x7B's 1024; measured with version 25's kernels, lost
# with their branch, which these re-implement) and their neighbours.
TILES = {
    128: ((256, 64, 3), (256, 64, 4), (128, 64, 4), (128, 64, 6)),
    64: ((256, 64, 4), (128, 64, 6)),
}


def available(device: torch.device) -> bool:
    """Whether these kernels run on `device`: Hopper (capability 9.x: wgmma is Hopper's
    alone), or an offline compile for it (`moebench.offline_compile`)."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.get_device_capability(index)[0] == 9
    return fast_launch.compiling_offline()


@gluon.constexpr_function
def _store_layout(BLOCK_N, num_warps):
    """Rows of BLOCK_N columns stored 8 elements (16 bytes) a thread, a warp's threads
    along whole row segments."""
    threads_n = BLOCK_N // 8 if BLOCK_N < 256 else 32  # (`min` is Triton's in here)
    return gl.BlockedLayout([1, 8], [32 // threads_n, threads_n], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def _mma_layout(BLOCK_N, num_warps):
    """The wgmma accumulator's layout: warps stacked along the rows, one instruction as
    wide as the tile (at most 256 columns)."""
    instr_n = BLOCK_N if BLOCK_N < 256 else 256  # (`min` is Triton's in here)
    return gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, instr_n, 16]
    )


@gluon.jit
def _tile_coords(tile, num_blocks_m, num_blocks_n, GROUP_M: gl.constexpr):
    """`kernels._block_coords` in Gluon (a Gluon kernel calls Gluon functions only):
    tile -> (row block, column block), GROUP_M row blocks at a time so that one expert's
    weight tiles stay in L2 while its rows pass."""
    per_group = GROUP_M * num_blocks_n
    first_m = (tile // per_group) * GROUP_M
    group_size = gl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + ((tile % per_group) % group_size)
    pid_n = (tile % per_group) // group_size
    return pid_m, pid_n


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
        pid_m, pid_n = _tile_coords(tile, num_blocks_m, num_blocks_n, GROUP_M)
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
    mma_layout: gl.constexpr = _mma_layout(BLOCK_N, WARPS)
    num_blocks_m = gl.cdiv(gl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = gl.cdiv(D, BLOCK_N)
    k_steps = gl.cdiv(F, BLOCK_K)
    num_tiles = num_blocks_m * num_blocks_n
    pid = gl.program_id(0)
    my_tiles = gl.cdiv(gl.maximum(num_tiles - pid, 0), num_programs)
    for i in range(CONSUMER, my_tiles, CONSUMERS):
        pid_m, pid_n = _tile_coords(pid + i * num_programs, num_blocks_m, num_blocks_n, GROUP_M)
        if CONSUMERS > 1:  # wait for the other consumer's turn at the ring to end
            mbarrier.wait(order_bars.index(CONSUMER), ((i // CONSUMERS) & 1) ^ (1 - CONSUMER))
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, mma_layout)
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
            pid_n, BLOCK_M, BLOCK_N, mma_layout, WARPS,
        )  # fmt: skip


@gluon.jit
def _weighted_scatter(
    acc, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign, stride_out_a, pid_m, pid_n,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, mma_layout: gl.constexpr,
    WARPS: gl.constexpr,
):  # fmt: skip
    """`tma._weighted_scatter` in Gluon: each row of the tile times its assignment's
    routing weight (in float32, then rounded once, as the Triton kernels do), to that
    assignment's row of out; padding rows write nothing."""
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
    ids = gl.load(sorted_ids_ptr + rows)
    gate = gl.load(gate_weight_ptr + ids, mask=ids < num_assign, other=0.0).to(gl.float32)
    values = (acc * gate[:, None]).to(out_ptr.dtype.element_ty)
    layout: gl.constexpr = _store_layout(BLOCK_N, WARPS)
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
    ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(order_bars.index(i), count=1)
    loader_args = (
        h_desc, w_desc, a_bufs, b_bufs, ready_bars, empty_bars, block_expert_ptr,
        num_padded_ptr, D, F, num_programs, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )  # fmt: skip
    # (the constexprs stay out of this tuple: joined to one inside the JIT, they would
    # become run-time values)
    consumer = (
        a_bufs, b_bufs, ready_bars, empty_bars, order_bars, gate_weight_ptr, out_ptr,
        sorted_ids_ptr, num_padded_ptr, D, F, num_assign, stride_out_a, num_programs,
    )  # fmt: skip
    if PINGPONG:
        gl.warp_specialize(
            [
                (_mma_partition, (consumer, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, 0, 2)),
                (_load_partition, loader_args),
                (_mma_partition, (consumer, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, 1, 2)),
            ],
            [1, gl.num_warps()],
            [_LOADER_REGISTERS, _CONSUMER_REGISTERS],
        )
    else:
        gl.warp_specialize(
            [
                (_mma_partition, (consumer, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, 0, 1)),
                (_load_partition, loader_args),
            ],
            [1],
            [_LOADER_REGISTERS],
        )


KERNELS = (down_ws_kernel,)


def consumer_warps(config: dict) -> int:
    """The warps of one consumer (the kernel's `num_warps`): a warp group per 64 rows,
    or, with PINGPONG, one warp group for each of the two."""
    return 4 if config.get("PINGPONG") else config["BLOCK_M"] // 16


def max_registers(config: dict) -> int:
    """The kernel's `maxnreg`: a streaming multiprocessor's 64K registers over all its warp
    groups (the loader's one warp takes a whole group), at most 248; the partitions'
    `setmaxnreg` then moves them from the loader to the consumers. (136 at 64-row blocks
    did not compile: ptxas asked for 154 before the partitions split.)"""
    groups = consumer_warps(config) // 4 + 1 + (1 if config.get("PINGPONG") else 0)
    return min(REGISTER_FILE // (128 * groups) // 8 * 8, 248)


def shared_bytes(config: dict, element_bytes: int) -> int:
    """Shared memory the config takes at most: its ring and its epilogue's scratch."""
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    ring = config["STAGES"] * (block_m * block_k + block_k * block_n) * element_bytes
    return ring + SCRATCH_BYTES


def fits(config: dict, D: int, F: int, element_bytes: int) -> bool:
    """Whether these widths suit the config (as `tma.fits` for down: rows 16-byte
    aligned, no K tile running into the next expert's rows) and its shared memory fits."""
    if (D * element_bytes) % 16 or (F * element_bytes) % 16 or F % config["BLOCK_K"]:
        return False
    return shared_bytes(config, element_bytes) <= SHARED_BYTES


def candidates(block_m: int, D: int, F: int, element_bytes: int) -> list[dict]:
    """The configs (`"GLUON_WS": True`) the tuner races for down at `block_m` rows
    (64 or 128; none otherwise) beside `tma.candidates`: each tile of TILES that `fits`,
    at 128 rows the 128-wide ones also PINGPONG."""
    configs = []
    for block_n, block_k, stages in TILES.get(block_m, ()):
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
                  "STAGES": stages, "GLUON_WS": True}  # fmt: skip
        configs.append(config)
        if block_m == 128 and block_n == 128:
            configs.append({**config, "PINGPONG": True})
    return [config for config in configs if fits(config, D, F, element_bytes)]


_GLUON_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _descriptor(matrix: torch.Tensor, block: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(block, _GLUON_DTYPES[matrix.dtype])
    return TensorDescriptor.from_tensor(matrix, block, layout)


def takes(h_dtype: torch.dtype) -> bool:
    """Whether the kernels take this dtype (bfloat16 and float16: wgmma's 16-bit inputs)."""
    return h_dtype in _GLUON_DTYPES


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
        _descriptor(h_PF, [block_m, block_k]),
        _descriptor(w_down_EFD.view(E * F, D), [block_k, block_n]),
        gate_weight_A, out_AD, alignment.sorted_ids_P, alignment.block_expert_B,
        alignment.num_padded_1, D, F, alignment.num_assign, out_AD.stride(0), programs,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
        STAGES=config["STAGES"], PINGPONG=bool(config.get("PINGPONG")),
        num_warps=consumer_warps(config),
        maxnreg=max_registers(config),
    )  # fmt: skip
