"""Token -> expert alignment on the device, with no device-to-host synchronisation.

Shape legend: T tokens, K top_k, E routed experts, A = T x K assignments, P padded rows
(a bound known on the host), B = P / BLOCK_M row blocks.

The (token, slot) assignments are sorted by expert and each expert's run is padded to a
multiple of BLOCK_M (as vLLM's moe_align_block_size does), so every row block of the
grouped GEMMs belongs to one expert. The real padded length lives on the device
(`num_padded_1`); the host sizes buffers and grids from the bound
P = A + min(E, A) x (BLOCK_M - 1), since each non-empty expert adds under one block of
padding. Everything here is a handful of small torch kernels (sort, searchsorted,
cumsum, index_put), none of which reads a value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Alignment:
    """The padded expert-sorted row list shared by both GEMMs of one forward."""

    sorted_ids_P: torch.Tensor  # int32 assignment index per row; num_assign = padding
    block_expert_B: torch.Tensor  # int32 expert of each row block (E past the end)
    num_padded_1: torch.Tensor  # int32 real padded length P' <= P, on the device
    num_assign: int  # A
    block_m: int

    @property
    def max_rows(self) -> int:
        return self.sorted_ids_P.numel()

    @property
    def max_blocks(self) -> int:
        return self.block_expert_B.numel()


def max_padded_rows(num_assign: int, num_experts: int, block_m: int) -> int:
    """The host-side bound P on the padded length, rounded up to whole blocks."""
    rows = num_assign + min(num_experts, num_assign) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_to_blocks(expert_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the assignments of `expert_ids_TK` by expert and pad each expert's run to a
    multiple of `block_m` (rows of padding hold the sentinel A)."""
    device = expert_ids_TK.device
    expert_A = expert_ids_TK.flatten()
    num_assign = expert_A.numel()
    sorted_expert_A, order_A = torch.sort(expert_A, stable=True)
    # Start of each expert's run in the sorted order: counts without bincount (a sync).
    bounds_E1 = torch.arange(num_experts + 1, device=device, dtype=sorted_expert_A.dtype)
    starts_E1 = torch.searchsorted(sorted_expert_A, bounds_E1)
    counts_E = starts_E1[1:] - starts_E1[:-1]
    padded_E = (counts_E + block_m - 1) // block_m * block_m
    padded_starts_E1 = torch.zeros(num_experts + 1, device=device, dtype=torch.int64)
    padded_starts_E1[1:] = torch.cumsum(padded_E, 0)
    # Row of sorted assignment i: its expert's padded start plus its rank in the run.
    rank_A = torch.arange(num_assign, device=device) - starts_E1[sorted_expert_A]
    row_A = padded_starts_E1[sorted_expert_A] + rank_A
    max_rows = max_padded_rows(num_assign, num_experts, block_m)
    sorted_ids_P = torch.full((max_rows,), num_assign, device=device, dtype=torch.int32)
    sorted_ids_P[row_A] = order_A.to(torch.int32)
    block_starts_B = torch.arange(0, max_rows, block_m, device=device, dtype=torch.int64)
    block_expert_B = torch.searchsorted(padded_starts_E1[1:], block_starts_B, right=True)
    return Alignment(
        sorted_ids_P=sorted_ids_P,
        block_expert_B=block_expert_B.to(torch.int32),
        num_padded_1=padded_starts_E1[num_experts:].to(torch.int32),
        num_assign=num_assign,
        block_m=block_m,
    )
