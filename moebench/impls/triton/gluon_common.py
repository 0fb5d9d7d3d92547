"""What the fused layer's two warp-specialised Gluon GEMMs (`gluon_gate_up.py`,
`gluon_down.py`) share: the roles, the ring's barriers, the tile walk, the layouts, the
registers and the configs' rules. Each GEMM file holds its own loader, consumer,
epilogue and kernel.

Both kernels are persistent (one program a streaming multiprocessor) and split into
roles (`specialize`):

- **The loader**, one warp with few registers, walks the program's tiles (GROUP_M row
  blocks at a time, `tile_coords`) and each K step waits for a free slot of a ring of
  STAGES shared-memory slots (its `empty` mbarrier), then issues the TMA copies of the
  step's boxes into it, which complete on the slot's `ready` mbarrier. It fills the next
  tile's slots while the consumers run this tile's epilogue: the Triton kernels'
  software pipeline waits at a CTA barrier there, and version 23's counters put a third
  of the large-batch GEMMs' stalls at it.
- **The consumers** wait for `ready`, issue the wgmma asynchronously, wait until only
  this step's is in flight, and hand the previous step's slot back. Cooperative: one
  consumer of `consumer_warps` warps (8 at 128-row blocks: two warp groups, 64 rows
  each; 4 at 64). PINGPONG (128-row blocks): two consumers of four warps take alternate
  tiles, so that one's epilogue runs under the other's K loop. They take turns at the
  ring through a pair of `order` mbarriers: a consumer starts a tile's K loop only once
  the other has waited for all of its previous tile's slots, because an mbarrier's wait
  is on the parity of its phase: waiting for a slot's next fill but one, it would pass
  at once on the fill the slot still holds.

The epilogues compute in the wgmma's own layout (`mma_layout`) and round, then move the
rows through shared memory (a scratch buffer of each consumer's, apart from the ring) to
a layout whose warps store whole 16-byte row segments (`store_layout`): from the wgmma's
layout a thread would store 4 bytes at a time.

Gluon has no interpreter: the kernels compile here for sm_90 (`moebench.offline_compile`,
tests/test_gluon_down.py, tests/test_gluon_gate_up.py) and run only on a Hopper card.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from moebench import fast_launch

# An H100's or H200's shared memory a block may use (227 KB), less the barriers'.
SHARED_BYTES = 232448 - 1024
# The epilogue's scratch, at most: 8-32 KB in every compile for sm_90 here (Triton moves
# a tile through it in pieces; the tests' compiles hold the kernels to this bound).
SCRATCH_BYTES = 32768
# Registers a thread: the loader's warp group (40), and (PINGPONG) the second consumer's
# (232), written as numbers in `specialize`; the first consumer gets what the kernel's
# `maxnreg` leaves (`max_registers`). Not constexpr globals: Triton 3.6 hashes a
# function's constexpr globals into the cache keys of only those callers hashed after
# it, so the keys, and the tuner's fingerprints of them, would depend on the order the
# kernels were first hashed (compiled) in (triton/NOTES.md, version 31).
REGISTER_FILE = 65536

_GLUON_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def available(device: torch.device) -> bool:
    """Whether these kernels run on `device`: Hopper (capability 9.x: wgmma is Hopper's
    alone), or an offline compile for it (`moebench.offline_compile`)."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.get_device_capability(index)[0] == 9
    return fast_launch.compiling_offline()


def takes(dtype: torch.dtype) -> bool:
    """Whether the kernels take this dtype (bfloat16 and float16: wgmma's 16-bit inputs)."""
    return dtype in _GLUON_DTYPES


def descriptor(matrix: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A TMA descriptor of `matrix` in boxes of `block`, in the shared layout wgmma reads."""
    layout = gl.NVMMASharedLayout.get_default_for(block, _GLUON_DTYPES[matrix.dtype])
    return TensorDescriptor.from_tensor(matrix, block, layout)


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


def candidates(
    tiles: dict, block_m: int, pingpong_width: int, fits: Callable[[dict], bool]
) -> list[dict]:
    """The configs (`"GLUON_WS": True`) of a GEMM's `tiles` ((BLOCK_N, BLOCK_K, STAGES)
    per row-block height) at `block_m` rows that `fits` takes, those of 128 rows and
    `pingpong_width` columns also PINGPONG."""
    configs = []
    for block_n, block_k, stages in tiles.get(block_m, ()):
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
                  "STAGES": stages, "GLUON_WS": True}  # fmt: skip
        configs.append(config)
        if block_m == 128 and block_n == pingpong_width:
            configs.append({**config, "PINGPONG": True})
    return [config for config in configs if fits(config)]


@gluon.constexpr_function
def store_layout(BLOCK_N, num_warps):
    """Rows of BLOCK_N columns stored 8 elements (16 bytes) a thread, a warp's threads
    along whole row segments."""
    threads_n = BLOCK_N // 8 if BLOCK_N < 256 else 32  # (`min` is Triton's in here)
    return gl.BlockedLayout([1, 8], [32 // threads_n, threads_n], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def mma_layout(BLOCK_N, num_warps):
    """The wgmma accumulator's layout: warps stacked along the rows, one instruction as
    wide as the tile (at most 256 columns)."""
    instr_n = BLOCK_N if BLOCK_N < 256 else 256  # (`min` is Triton's in here)
    return gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, instr_n, 16]
    )


@gluon.jit
def tile_coords(tile, num_blocks_m, num_blocks_n, GROUP_M: gl.constexpr):
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
def ring_barriers(STAGES: gl.constexpr):
    """The ring's mbarriers, initialised: a `ready` and an `empty` one a slot, and the
    consumers' pair of `order` ones (PINGPONG's turns at the ring)."""
    ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(order_bars.index(i), count=1)
    return ready_bars, empty_bars, order_bars


@gluon.jit
def specialize(
    consume, shared, load, loader_args, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, PINGPONG: gl.constexpr,
):  # fmt: skip
    """The kernel split into its roles: `consume(shared, BLOCK_M, BLOCK_N, BLOCK_K,
    GROUP_M, CONSUMER, CONSUMERS)` in the kernel's warps (`shared`: the ring, the
    barriers and the kernel's run-time arguments; with PINGPONG, consumer 0 of 2 there
    and consumer 1 in a warp group of its own), `load(*loader_args)` in one warp.
    (`warp_specialize` calls a function named in the source, not one passed in, which
    arrives wrapped as a constexpr: hence the two roles below, which call what they are
    passed. The compiled kernels are the same as with the partitions named directly, to
    the instruction: NOTES.md, version 30.)"""
    if PINGPONG:
        gl.warp_specialize(
            [
                (_consumer_role, (consume, shared, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, 0, 2)),
                (_loader_role, (load, loader_args)),
                (_consumer_role, (consume, shared, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, 1, 2)),
            ],
            [1, gl.num_warps()],
            [40, 232],  # (the loader's, the second consumer's registers)
        )
    else:
        gl.warp_specialize(
            [
                (_consumer_role, (consume, shared, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, 0, 1)),
                (_loader_role, (load, loader_args)),
            ],
            [1],
            [40],  # (the loader's registers)
        )


@gluon.jit
def _consumer_role(
    consume, shared, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    GROUP_M: gl.constexpr, CONSUMER: gl.constexpr, CONSUMERS: gl.constexpr,
):  # fmt: skip
    consume(shared, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, CONSUMER, CONSUMERS)


@gluon.jit
def _loader_role(load, loader_args):
    load(*loader_args)
