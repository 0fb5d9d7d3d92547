"""Token -> expert alignment on the device, with no device-to-host synchronisation.

Shape legend: T tokens, K top_k, E routed experts, A = T x K assignments, P padded rows
(a bound known on the host), B = P / BLOCK_M row blocks.

The (token, slot) assignments are grouped by expert and each expert's run is padded to a
multiple of BLOCK_M (as vLLM's moe_align_block_size does), so every row block of the
grouped GEMMs belongs to one expert. The real padded length lives on the device
(`num_padded_1`); the host sizes buffers and grids from the bound
P = A + min(E, A) x (BLOCK_M - 1), since each non-empty expert adds under one block of
padding.

Two small kernels (plus zeroing the counters): `count` fills the row list with the
padding sentinel and gives each assignment its rank in its expert (an atomic increment
per assignment); `offsets_scatter` turns the counts into padded starts in every program
(the first also writes the padded length and each block's expert) and writes each
assignment to its expert's start plus its rank (and that row, the inverse permutation,
which the backward gathers through). An un-graphed call of a few hundred tokens is
bound by the host's launches, and a separate one-program offsets kernel was one more.
Ranks from atomics make the order of rows inside an expert arbitrary; each row's result
does not depend on its position, so the layer's output is still the same bits on every
run.

At decode (at most SMALL_ASSIGNMENTS assignments) one program does all of it
(`_align_small_kernel`): ranks from comparing every assignment with every earlier one,
in assignment order. Four launches of a few microseconds each are most of what a
graphed one-token layer spends outside its two GEMMs. Up to MEDIUM_ASSIGNMENTS (1024;
64 tokens of a top-8 router are 512) one program runs the three kernels' steps in turn,
with a barrier between them (`_align_one_program_kernel`): one launch instead of four,
where the steps' work is a few thousand atomics and compares.

A single token needs no alignment at all (`per_assignment_blocks`): its K experts are
distinct, so one block per assignment still reads each expert's weights once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moebench.dependent_launch import release_dependents, wait_for_predecessor
from moebench.fast_launch import ceil_div, launch, next_power_of_2

COUNT_BLOCK = 1024
BLOCKS_PER_STEP = 64
SMALL_ASSIGNMENTS = 64  # and at most SMALL_EXPERTS experts: one program aligns them
SMALL_EXPERTS = 256
MEDIUM_ASSIGNMENTS = 1024  # and at most SMALL_EXPERTS experts: one program, in steps
MEDIUM_BLOCK = 256  # assignments per step of `_align_one_program_kernel`


@dataclass(frozen=True)
class Alignment:
    """The padded expert-grouped row list shared by both GEMMs of one forward; or, for
    `per_assignment_blocks`, only each block's expert (the tensors it has no use for are
    None)."""

    sorted_ids_P: torch.Tensor | None  # int32 assignment index per row; num_assign = padding
    block_expert_B: torch.Tensor  # int expert of each row block (E past the end)
    num_padded_1: torch.Tensor | None  # int32 real padded length P' <= P, on the device
    padded_ends_E: torch.Tensor | None  # int32 end row of each expert's run (grouped_mm)
    row_of_assign_A: torch.Tensor | None  # int32 row of each assignment (inverse of sorted)
    num_assign: int  # A
    block_m: int
    # int32 assignments of each expert: the real rows that begin its run, the rest padding
    # (None from the one-program decode alignment, which keeps its counts in registers)
    rows_E: torch.Tensor | None = None

    @property
    def per_assignment(self) -> bool:
        """Block a is assignment a alone, in its first row: no row list."""
        return self.sorted_ids_P is None

    @property
    def max_rows(self) -> int:
        if self.sorted_ids_P is None:
            return self.num_assign * self.block_m
        return self.sorted_ids_P.numel()

    @property
    def max_blocks(self) -> int:
        return self.block_expert_B.numel()


def max_padded_rows(num_assign: int, num_experts: int, block_m: int) -> int:
    """The host-side bound P on the padded length, rounded up to whole blocks."""
    rows = num_assign + min(num_experts, num_assign) * (block_m - 1)
    return -(-rows // block_m) * block_m


@triton.jit
def _store_block_experts(
    block_expert_ptr,
    ends,
    padded,
    offs_e,
    expert_ok,
    num_experts,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
):
    """block_expert[b] <- the expert whose padded run holds row block b, and num_experts
    for the blocks past the padded length: the sentinel everywhere, then each expert
    writes its own blocks, one block of every expert per step (as many steps as the
    largest expert has blocks, where comparing every block with every expert's end cost
    Qwen3-30B-A3B's 128 experts 7 us at 1024 tokens)."""
    for first in range(0, max_blocks, BLOCKS_PER_STEP):
        offs_b = first + tl.arange(0, BLOCKS_PER_STEP)
        sentinel = tl.zeros((BLOCKS_PER_STEP,), tl.int32) + num_experts
        tl.store(block_expert_ptr + offs_b, sentinel, mask=offs_b < max_blocks)
    tl.debug_barrier()  # the sentinel first, then the experts' blocks over it
    blocks = padded // BLOCK_M
    first_block = (ends - padded) // BLOCK_M
    for step in range(0, tl.max(tl.where(expert_ok, blocks, 0), 0)):
        tl.store(block_expert_ptr + first_block + step, offs_e, mask=expert_ok & (step < blocks))


@triton.jit
def _count_kernel(
    expert_ptr,
    counts_ptr,
    rank_ptr,
    sorted_ids_ptr,
    num_assign,
    max_rows,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)
    release_dependents(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(sorted_ids_ptr + offs, tl.zeros((BLOCK,), tl.int32) + num_assign, mask=offs < max_rows)
    ok = offs < num_assign
    expert = tl.load(expert_ptr + offs, mask=ok, other=0)
    rank = tl.atomic_add(counts_ptr + expert, 1, mask=ok, sem="relaxed")
    tl.store(rank_ptr + offs, rank, mask=ok)


@triton.jit
def _offsets_scatter_kernel(
    expert_ptr,
    counts_ptr,
    rank_ptr,
    starts_ptr,
    sorted_ids_ptr,
    row_of_assign_ptr,
    padded_ends_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_assign,
    num_experts,
    max_blocks,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
    PDL: tl.constexpr,
):
    """Each program turns the counts into padded starts itself (a cumulative sum over
    at most SMALL_EXPERTS experts), keeps them in its own row of starts_ptr (BLOCK_E a
    program) and writes its BLOCK assignments to their expert's start plus their rank;
    the first program also writes the padded ends and length and each block's expert.
    One launch where a one-program offsets kernel and a scatter kernel were two: no
    program waits on another's starts."""
    wait_for_predecessor(PDL)
    release_dependents(PDL)
    offs_e = tl.arange(0, BLOCK_E)
    expert_ok = offs_e < num_experts
    counts = tl.load(counts_ptr + offs_e, mask=expert_ok, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    my_starts_ptr = starts_ptr + tl.program_id(0) * BLOCK_E
    tl.store(my_starts_ptr + offs_e, ends - padded, mask=expert_ok)
    if tl.program_id(0) == 0:
        tl.store(padded_ends_ptr + offs_e, ends, mask=expert_ok)
        tl.store(num_padded_ptr, tl.sum(padded, 0))
        _store_block_experts(
            block_expert_ptr, ends, padded, offs_e, expert_ok, num_experts, max_blocks,
            BLOCK_M, BLOCKS_PER_STEP,
        )  # fmt: skip
    tl.debug_barrier()  # this program's starts stored before any of its threads reads one
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < num_assign
    expert = tl.load(expert_ptr + offs, mask=ok, other=0)
    rank = tl.load(rank_ptr + offs, mask=ok, other=0)
    start = tl.load(my_starts_ptr + expert, mask=ok, other=0, cache_modifier=".cg")
    tl.store(sorted_ids_ptr + start + rank, offs.to(tl.int32), mask=ok)
    tl.store(row_of_assign_ptr + offs, start + rank, mask=ok)


@triton.jit
def _align_small_kernel(
    expert_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    padded_ends_ptr,
    row_of_assign_ptr,
    num_assign,
    num_experts,
    max_rows,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
    PDL: tl.constexpr,
):
    """The whole alignment of at most BLOCK_A assignments in one program."""
    wait_for_predecessor(PDL)
    release_dependents(PDL)
    offs_a = tl.arange(0, BLOCK_A)
    a_ok = offs_a < num_assign
    expert = tl.load(expert_ptr + offs_a, mask=a_ok, other=-1).to(tl.int32)
    offs_e = tl.arange(0, BLOCK_E)
    expert_ok = offs_e < num_experts
    # rank: earlier assignments of the same expert; counts: assignments per expert
    earlier = (expert[:, None] == expert[None, :]) & (offs_a[None, :] < offs_a[:, None])
    rank = tl.sum(earlier.to(tl.int32), 1)
    is_expert = expert[:, None] == offs_e[None, :]
    counts = tl.sum(is_expert.to(tl.int32), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(padded_ends_ptr + offs_e, ends, mask=expert_ok)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    row = tl.sum(tl.where(is_expert, (ends - padded)[None, :], 0), 1) + rank
    for first in range(0, max_rows, BLOCK_A):
        offs = first + offs_a
        tl.store(
            sorted_ids_ptr + offs, tl.zeros((BLOCK_A,), tl.int32) + num_assign, mask=offs < max_rows
        )
    tl.debug_barrier()  # the sentinel everywhere before any row gets its assignment
    tl.store(sorted_ids_ptr + row, offs_a, mask=a_ok)
    tl.store(row_of_assign_ptr + offs_a, row, mask=a_ok)
    _store_block_experts(
        block_expert_ptr, ends, padded, offs_e, expert_ok, num_experts, max_blocks,
        BLOCK_M, BLOCKS_PER_STEP,
    )  # fmt: skip


@triton.jit
def _align_one_program_kernel(
    expert_ptr,
    counts_ptr,
    rank_ptr,
    padded_starts_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    padded_ends_ptr,
    row_of_assign_ptr,
    num_assign,
    num_experts,
    max_rows,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
    PDL: tl.constexpr,
):
    """`align_in_steps`, one program."""
    wait_for_predecessor(PDL)
    release_dependents(PDL)
    align_in_steps(
        expert_ptr, counts_ptr, rank_ptr, padded_starts_ptr, sorted_ids_ptr, block_expert_ptr,
        num_padded_ptr, padded_ends_ptr, row_of_assign_ptr, num_assign, num_experts, max_rows,
        max_blocks, BLOCK_M, BLOCK_A, BLOCK_E, BLOCKS_PER_STEP,
    )  # fmt: skip


@triton.jit
def align_in_steps(
    expert_ptr, counts_ptr, rank_ptr, padded_starts_ptr, sorted_ids_ptr, block_expert_ptr,
    num_padded_ptr, padded_ends_ptr, row_of_assign_ptr, num_assign, num_experts, max_rows,
    max_blocks, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
):  # fmt: skip
    """`_count_kernel`, `_offsets_kernel` and `_scatter_kernel` by one program, BLOCK_A
    assignments at a time, a barrier between the steps (a block's barrier also orders its
    global writes and atomics; the counts and starts are read past L1 all the same)."""
    offs_a = tl.arange(0, BLOCK_A)
    offs_e = tl.arange(0, BLOCK_E)
    expert_ok = offs_e < num_experts
    tl.store(counts_ptr + offs_e, tl.zeros((BLOCK_E,), tl.int32), mask=expert_ok)
    for first in range(0, max_rows, BLOCK_A):
        offs = first + offs_a
        sentinel = tl.zeros((BLOCK_A,), tl.int32) + num_assign
        tl.store(sorted_ids_ptr + offs, sentinel, mask=offs < max_rows)
    tl.debug_barrier()
    for first in range(0, num_assign, BLOCK_A):
        offs = first + offs_a
        ok = offs < num_assign
        expert = tl.load(expert_ptr + offs, mask=ok, other=0)
        rank = tl.atomic_add(counts_ptr + expert, 1, mask=ok, sem="relaxed")
        tl.store(rank_ptr + offs, rank, mask=ok)
    tl.debug_barrier()
    counts = tl.load(counts_ptr + offs_e, mask=expert_ok, other=0, cache_modifier=".cg")
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(padded_starts_ptr + offs_e, ends - padded, mask=expert_ok)
    tl.store(padded_ends_ptr + offs_e, ends, mask=expert_ok)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    _store_block_experts(
        block_expert_ptr, ends, padded, offs_e, expert_ok, num_experts, max_blocks,
        BLOCK_M, BLOCKS_PER_STEP,
    )  # fmt: skip
    tl.debug_barrier()
    for first in range(0, num_assign, BLOCK_A):
        offs = first + offs_a
        ok = offs < num_assign
        expert = tl.load(expert_ptr + offs, mask=ok, other=0)
        rank = tl.load(rank_ptr + offs, mask=ok, other=0, cache_modifier=".cg")
        start = tl.load(padded_starts_ptr + expert, mask=ok, other=0, cache_modifier=".cg")
        tl.store(sorted_ids_ptr + start + rank, offs.to(tl.int32), mask=ok)
        tl.store(row_of_assign_ptr + offs, start + rank, mask=ok)


def alignment_outputs(
    num_assign: int, num_experts: int, block_m: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """An `Alignment`'s tensors to fill, in its order: sorted ids (P), block experts (B),
    padded length (1), padded ends (E), row of each assignment (A); all int32."""
    max_rows = max_padded_rows(num_assign, num_experts, block_m)
    sizes = (max_rows, max_rows // block_m, 1, num_experts, num_assign)
    return tuple(torch.empty(n, device=device, dtype=torch.int32) for n in sizes)


def in_steps_scratch(
    num_assign: int, num_experts: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `align_in_steps` works in: (counts_E, rank_A, padded_starts_E), int32."""
    counts_E, padded_starts_E = (
        torch.empty(num_experts, device=device, dtype=torch.int32) for _ in range(2)
    )
    return counts_E, torch.empty(num_assign, device=device, dtype=torch.int32), padded_starts_E


def align_to_blocks(
    expert_ids_TK: torch.Tensor, num_experts: int, block_m: int, pdl: bool = False
) -> Alignment:
    """Group the assignments of `expert_ids_TK` by expert and pad each expert's run to a
    multiple of `block_m` (rows of padding hold the sentinel A); `pdl`: launch the
    kernels with programmatic dependent launch (`moebench.dependent_launch`)."""
    device = expert_ids_TK.device
    expert_A = expert_ids_TK.reshape(-1)
    num_assign = expert_A.numel()
    outputs = alignment_outputs(num_assign, num_experts, block_m, device)
    sorted_ids_P, block_expert_B, num_padded_1, padded_ends_E, row_of_assign_A = outputs
    max_rows, max_blocks = sorted_ids_P.numel(), block_expert_B.numel()
    if num_assign <= SMALL_ASSIGNMENTS and num_experts <= SMALL_EXPERTS:
        launch(
            _align_small_kernel, (1,),
            expert_A, sorted_ids_P, block_expert_B, num_padded_1, padded_ends_E,
            row_of_assign_A, num_assign, num_experts, max_rows, max_blocks,
            BLOCK_M=block_m, BLOCK_A=SMALL_ASSIGNMENTS,
            BLOCK_E=next_power_of_2(num_experts), BLOCKS_PER_STEP=BLOCKS_PER_STEP,
            PDL=pdl, num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
        return Alignment(*outputs, num_assign, block_m)
    if num_assign <= MEDIUM_ASSIGNMENTS and num_experts <= SMALL_EXPERTS:
        counts_E, rank_A, padded_starts_E = in_steps_scratch(num_assign, num_experts, device)
        launch(
            _align_one_program_kernel, (1,),
            expert_A, counts_E, rank_A, padded_starts_E, sorted_ids_P, block_expert_B,
            num_padded_1, padded_ends_E, row_of_assign_A, num_assign, num_experts,
            max_rows, max_blocks,
            BLOCK_M=block_m, BLOCK_A=MEDIUM_BLOCK,
            BLOCK_E=next_power_of_2(num_experts), BLOCKS_PER_STEP=BLOCKS_PER_STEP,
            PDL=pdl, num_warps=8, launch_pdl=pdl,
        )  # fmt: skip
        return Alignment(*outputs, num_assign, block_m, counts_E)
    counts_E = torch.zeros(num_experts, device=device, dtype=torch.int32)
    rank_A = torch.empty(num_assign, device=device, dtype=torch.int32)
    launch(
        _count_kernel, (ceil_div(max_rows, COUNT_BLOCK),),
        expert_A, counts_E, rank_A, sorted_ids_P, num_assign, max_rows,
        BLOCK=COUNT_BLOCK, PDL=pdl, launch_pdl=pdl,
    )  # fmt: skip
    scatter_programs = ceil_div(num_assign, COUNT_BLOCK)
    block_e = next_power_of_2(num_experts)
    starts_CE = torch.empty(scatter_programs, block_e, device=device, dtype=torch.int32)
    launch(
        _offsets_scatter_kernel, (scatter_programs,),
        expert_A, counts_E, rank_A, starts_CE, sorted_ids_P, row_of_assign_A, padded_ends_E,
        block_expert_B, num_padded_1, num_assign, num_experts, max_blocks,
        BLOCK=COUNT_BLOCK, BLOCK_M=block_m, BLOCK_E=block_e, BLOCKS_PER_STEP=BLOCKS_PER_STEP,
        PDL=pdl, launch_pdl=pdl,
    )  # fmt: skip
    return Alignment(*outputs, num_assign, block_m, counts_E)


def per_assignment_blocks(expert_ids_TK: torch.Tensor, block_m: int) -> Alignment:
    """The layout of a single token, with no kernel run: block a holds assignment a alone
    in its first row, its expert read from the token's expert ids. The K experts of one
    token are distinct, so each expert's weights are still read once."""
    assert expert_ids_TK.shape[0] == 1, "one block per assignment is for a single token"
    expert_A = expert_ids_TK.reshape(-1)
    return Alignment(None, expert_A, None, None, None, expert_A.numel(), block_m)
