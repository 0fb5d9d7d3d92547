"""The Router's top-k and the fused layer's alignment in one launch, for calls of a few
tokens: taken only with `$MOEBENCH_ROUTE_ALIGN=1` (`layer.TritonMoE`) until a card has
timed it (triton/NOTES.md, version 28).

Shape legend as in `align.py`. Why: OLMoE-1B-7B's graphed 64-token layer is 1.07-1.09x
its floor against issue 14's 1.05x, and its GEMMs alone are 1.02x. What is left is the
small kernels around them, chained by dependent launch: the logits, the top-k (64
programs of one row each), the alignment (one program), the sum over slots. A short
kernel's cost on that chain is mostly the wait at its boundary. Here one program routes
every token (`route_kernel.route_rows`, ROWS at a time: the same function) and then,
after a barrier, aligns their assignments (`align.align_in_steps`): one boundary and
one launch fewer. The gates and experts are the Router kernel's bits; the fp32
probabilities (`aux_loss`'s) differ from them in the last bits on a card, because 8
warps add a row's terms in another order than the Router's one-warp programs.
`scripts/stage_probe.py` measures what the Router and the alignment add to the call,
and so what this can save at most.

For 2 to 64 tokens (one token needs no alignment), at most MEDIUM_ASSIGNMENTS
assignments and SMALL_EXPERTS experts (`takes`), inference only: the top-k's gradient
is the Router's own kernel's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebench.dependent_launch import release_dependents, wait_for_predecessor
from moebench.fast_launch import launch
from moebench.impls.triton.align import (
    BLOCKS_PER_STEP,
    MEDIUM_ASSIGNMENTS,
    MEDIUM_BLOCK,
    SMALL_EXPERTS,
    Alignment,
    align_in_steps,
    alignment_outputs,
    in_steps_scratch,
)
from moebench.route_kernel import route_arguments, route_rows

MAX_TOKENS = 64  # the calls dependent launch chains (`dependent_launch.for_tokens`)
# Tokens x experts the program routes at once (32 a thread on its 8 warps): the rounds of
# a top-k are one after another, but each round's rows are reduced together, so all of
# OLMoE-1B-7B's or Qwen3-30B-A3B's 64 tokens go in one pass. Group-limited selection
# holds more at once (DeepSeek-V3 took 255 registers at 32 tokens of 256 experts, 173 at
# 16): half as many there.
ROW_ELEMENTS = 8192


@triton.jit
def route_align_kernel(
    parts_ptr, bias_ptr, correction_ptr, gate_ptr, ids_ptr, probs_ptr, T, E, scaling,
    counts_ptr, rank_ptr, padded_starts_ptr, sorted_ids_ptr, block_expert_ptr,
    num_padded_ptr, padded_ends_ptr, row_of_assign_ptr, num_assign, max_rows, max_blocks,
    PARTS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
    SIGMOID: tl.constexpr, CORRECTION: tl.constexpr, GROUPS: tl.constexpr,
    GROUPS_KEPT: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """One program: `route_rows` of all T tokens, ROWS at a time, then `align_in_steps`
    of their T x TOP_K assignments (ids_ptr, just written, read back after a barrier)."""
    wait_for_predecessor(PDL)
    release_dependents(PDL)
    for first_t in range(0, T, ROWS):
        route_rows(
            parts_ptr, bias_ptr, correction_ptr, gate_ptr, ids_ptr, probs_ptr, T, E, scaling,
            first_t, PARTS, TOP_K, BLOCK_K, NORM, SIGMOID, CORRECTION, GROUPS, GROUPS_KEPT,
            ROWS, BLOCK_E,
        )  # fmt: skip
    tl.debug_barrier()  # every token's experts stored before any thread reads one back
    align_in_steps(
        ids_ptr, counts_ptr, rank_ptr, padded_starts_ptr, sorted_ids_ptr, block_expert_ptr,
        num_padded_ptr, padded_ends_ptr, row_of_assign_ptr, num_assign, E, max_rows,
        max_blocks, BLOCK_M, BLOCK_A, BLOCK_E, BLOCKS_PER_STEP,
    )  # fmt: skip


def takes(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether `route_and_align` serves a call of `tokens` tokens: 2 to MAX_TOKENS, at
    most MEDIUM_ASSIGNMENTS assignments and SMALL_EXPERTS experts (one program)."""
    return (
        2 <= tokens <= MAX_TOKENS
        and tokens * top_k <= MEDIUM_ASSIGNMENTS
        and num_experts <= SMALL_EXPERTS
    )


def route_and_align(
    parts_TSE: torch.Tensor,
    parts: int,
    bias_E: torch.Tensor,
    shape,
    gate_dtype: torch.dtype,
    correction_E: torch.Tensor | None,
    block_m: int,
    pdl: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Alignment]:
    """(gate_TK, ids_TK, probs_TE) as `route_kernel.route_top_k` gives them, and the
    `Alignment` `align.align_to_blocks` gives for ids_TK at `block_m`, from one launch of
    `route_align_kernel` (`pdl`: with dependent launch). Inference only."""
    parts_TSE = parts_TSE.contiguous()
    routed, args, constants = route_arguments(
        parts_TSE, parts, bias_E, shape, gate_dtype, correction_E
    )
    T, K = routed[1].shape
    E = routed[2].shape[1]
    num_assign = T * K
    device = parts_TSE.device
    outputs = alignment_outputs(num_assign, E, block_m, device)
    sorted_ids_P, block_expert_B, num_padded_1, padded_ends_E, row_of_assign_A = outputs
    counts_E, rank_A, padded_starts_E = in_steps_scratch(num_assign, E, device)
    block_e = constants["BLOCK_E"]
    row_elements = ROW_ELEMENTS // 2 if constants["GROUPS"] > 1 else ROW_ELEMENTS
    launch(
        route_align_kernel, (1,),
        *args, counts_E, rank_A, padded_starts_E, sorted_ids_P, block_expert_B, num_padded_1,
        padded_ends_E, row_of_assign_A, num_assign, sorted_ids_P.numel(),
        block_expert_B.numel(),
        **constants, ROWS=max(1, min(row_elements // block_e, triton.next_power_of_2(T))),
        BLOCK_M=block_m, BLOCK_A=MEDIUM_BLOCK, BLOCKS_PER_STEP=BLOCKS_PER_STEP, PDL=pdl,
        num_warps=8, launch_pdl=pdl,
    )  # fmt: skip
    return (*routed, Alignment(*outputs, num_assign, block_m))
