"""The `__IMPL__` implementation: replace `routed` with your kernel.

moebench hands every implementation the same weights (`ExpertWeights`) and inputs, checks
its output against the float32 reference before timing it (a `mismatch` row if it is off
by more than the dtype's tolerance), then times it. `MoELayer` does the routing and the
shared experts; `routed` computes the routed experts.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k, A = T x K.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from moebench import register
from moebench.layer import MoELayer, expert_parameters


class __CLASS__(MoELayer):
    """Assignments sorted by expert, one matrix product per expert on its slice."""

    def __init__(self, weights, case):
        super().__init__(weights, case)  # router, shared experts
        self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD = expert_parameters(weights)

    def routed(
        self, x_TD: torch.Tensor, gate_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        expert_ids_A = expert_ids_TK.flatten()
        order_A = torch.argsort(expert_ids_A, stable=True)
        token_A = order_A // self.top_k
        counts_E = torch.bincount(expert_ids_A, minlength=self.num_experts).tolist()
        x_AD = x_TD[token_A]
        outputs = []
        for expert, x_ND in enumerate(torch.split(x_AD, counts_E)):
            h_NF = F.silu(x_ND @ self.w_gate_EDF[expert]) * (x_ND @ self.w_up_EDF[expert])
            outputs.append(h_NF @ self.w_down_EFD[expert])
        y_AD = torch.cat(outputs) * gate_weights_TK.flatten()[order_A, None]
        return torch.zeros_like(x_TD).index_add(0, token_A, y_AD)


@register("__IMPL__", family="__FAMILY__", description="__IMPL__ (from moebench init)")
def build(weights, case):
    return __CLASS__(weights, case)
