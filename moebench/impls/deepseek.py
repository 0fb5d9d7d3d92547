"""`deepseek`: DeepSeekMoE / DeepSeek-V3 fine-grained experts with shared experts.

Many small routed experts (fine-grained segmentation) plus shared experts that every token
passes through (`shape.shared_experts`, already in the weights: one FFN of width
shared_experts x ffn). DeepSeek-V3's router is a router convention of the layer, which
every exact implementation computes (`moebench.routing.route`; the `deepseek-v3` preset
carries it): sigmoid scores, group-limited selection (`n_groups`, `topk_groups`), the
weight set's `correction_bias_E` added for the selection only, gates renormalised and
multiplied by `routed_scaling`. So this layer is `GroupedMoE` (grouped GEMM experts),
exact, checked against the reference on every case, and what it adds is the column
`deepseek_groups_per_token` (mean distinct expert groups a token's experts come from):
what group-limited routing buys, fewer groups = fewer devices to send a token to.

Shape legend: T tokens, K top_k, G expert groups.
"""

from __future__ import annotations

import torch
from torch import nn

from moebench.case import Case
from moebench.impls.grouped import GroupedMoE
from moebench.registry import register
from moebench.weights import ExpertWeights


class DeepSeekMoE(GroupedMoE):
    """`GroupedMoE` with the group statistics of DeepSeek's routing."""

    def extra_metrics(self) -> dict[str, float]:
        """deepseek_groups_per_token: mean number of distinct expert groups (n_groups
        equal groups; 1 without groups) the last forward's tokens were routed to."""
        if self._last is None:
            return {}
        expert_ids_TK = self._last[0]
        groups = self.router.shape.n_groups
        per_group = self.num_experts // groups
        group_TK = torch.div(expert_ids_TK, per_group, rounding_mode="floor")
        hit_TG = torch.zeros(
            group_TK.shape[0], groups, dtype=torch.bool, device=group_TK.device
        ).scatter(1, group_TK, True)
        return {"deepseek_groups_per_token": float(hit_TG.sum(dim=-1).double().mean())}


@register(
    "deepseek",
    family="fine-grained",
    description="DeepSeekMoE/V3: grouped experts + expert-group statistics (the router "
    "convention: scoring, n_groups, topk_groups, correction_bias, routed_scaling)",
)
def build(weights: ExpertWeights, case: Case) -> nn.Module:
    return DeepSeekMoE(weights, case)
