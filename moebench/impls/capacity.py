"""`capacity`: GShard / Switch capacity-limited experts.

Each expert takes at most C = ceil(capacity_factor x T x K / E) (token, slot)
assignments; first slots have priority over second slots (GShard), then token order.
Assignments past C are dropped: they add nothing to the output (the model's residual
carries the token on) and are counted in `dropped_frac`. Kept tokens go into a padded
E x C x D buffer computed with three batched matmuls. With no drop it is the reference
function; with drops it is a variant whose deviation is `fidelity_err`.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k, C capacity.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from moebench.case import Case
from moebench.layer import MoELayer, expert_parameters
from moebench.registry import register
from moebench.weights import ExpertWeights


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor x tokens x top_k / num_experts), at least 1."""
    return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def slot_positions(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Position of each (token, slot) in its expert's queue, slot-major priority."""
    T, K = expert_ids_TK.shape
    ids_A = expert_ids_TK.t().reshape(-1)  # slot-major: all first choices first
    order_A = torch.argsort(ids_A, stable=True)
    counts_E = torch.bincount(ids_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    pos_sorted_A = torch.arange(ids_A.numel(), device=ids_A.device) - starts_E[ids_A[order_A]]
    pos_A = torch.empty_like(pos_sorted_A)
    pos_A[order_A] = pos_sorted_A
    return pos_A.view(K, T).t()


class CapacityMoE(MoELayer):
    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD = expert_parameters(weights)
        self.capacity_factor = case.shape.capacity_factor

    def routed(
        self, x_TD: torch.Tensor, gate_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        T, D = x_TD.shape
        timer = self.timer
        with timer.phase("permute"):
            capacity = expert_capacity(T, self.top_k, self.num_experts, self.capacity_factor)
            pos_TK = slot_positions(expert_ids_TK, self.num_experts)
            keep_TK = pos_TK < capacity
            self._last_dropped_TK = ~keep_TK
            token_idx, slot_idx = torch.nonzero(keep_TK, as_tuple=True)
            experts = expert_ids_TK[token_idx, slot_idx]
            positions = pos_TK[token_idx, slot_idx]
            buffer_ECD = x_TD.new_zeros(self.num_experts, capacity, D)
            buffer_ECD[experts, positions] = x_TD[token_idx]
        with timer.phase("expert"):
            h_ECF = F.silu(torch.bmm(buffer_ECD, self.w_gate_EDF)) * torch.bmm(
                buffer_ECD, self.w_up_EDF
            )
            out_ECD = torch.bmm(h_ECF, self.w_down_EFD)
        with timer.phase("unpermute"):
            out_ND = out_ECD[experts, positions] * gate_weights_TK[token_idx, slot_idx, None]
            return torch.zeros_like(x_TD).index_add(0, token_idx, out_ND)


@register(
    "capacity",
    family="capacity",
    description="GShard/Switch: capacity_factor slots per expert, padded bmm, overflow dropped",
    exact=False,
)
def build(weights: ExpertWeights, case: Case) -> CapacityMoE:
    return CapacityMoE(weights, case)
