"""`hierarchical`: a two-level MoE, each expert a mixture of sub-experts (Shazeer et al.
2017, "Outrageously Large Neural Networks", appendix B; the two-level mixtures of Jordan
and Jacobs 1994).

The case's E routed experts are split evenly into G groups (option `groups`) of M = E / G
sub-experts. A primary router picks `group_top_k` groups per token; inside each chosen
group a secondary router picks `sub_top_k` sub-experts; the output is the sum over the
chosen (group, sub-expert) pairs of primary gate x secondary gate x sub-expert(x). Both
levels gate as the paper's Softmax(KeepTopK(.)): the kept probabilities renormalised to
sum to 1, so every token's gates sum to 1, as the flat router's do.

Weights: the sub-experts are the case's experts; the secondary router of group g is the
columns [g M, (g+1) M) of the base router (and of the routing bias, so a skewed routing
skews the sub-experts); the primary router, D x G, is drawn N(0, router_scale^2) from a CPU
generator seeded from the case's seed and the layer's index. With one group and
`group_top_k = 1` the layer is the flat top-k layer on the same weights.

Every token takes exactly group_top_k x sub_top_k sub-experts, which must equal the
case's top_k (the active experts per token), so a hierarchical case and its flat twin
hold the same total and active parameters. The experts run as `grouped` runs them (one
grouped GEMM per weight over tokens sorted by sub-expert; no device sync). Balance at
both levels: `imbalance` and `aux_loss` over sub-experts (Switch loss with the product
distribution P(g) P(j | g)), `group_imbalance` and `group_aux_loss` over groups.

Shape legend: T tokens, D hidden, E sub-experts, G groups, M sub-experts per group,
A chosen groups per token (group_top_k), B sub-experts per chosen group (sub_top_k),
K = A x B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moebench.case import Case
from moebench.designs import reference_experts, reference_stack, require_base_router
from moebench.impls.grouped import GroupedMoE
from moebench.measure.counters import ParamCounts
from moebench.registry import register
from moebench.routing import switch_aux_loss
from moebench.weights import ExpertWeights

# Seed offset of the primary router (apart from the weight, input and other designs' seeds).
PRIMARY_SEED_OFFSET = 3_000_017


@dataclass(frozen=True)
class Hierarchy:
    """G groups of M sub-experts; A groups and B sub-experts per chosen group per token."""

    groups: int
    per_group: int
    group_top_k: int
    sub_top_k: int

    @classmethod
    def from_case(cls, case: Case) -> Hierarchy:
        """Read and check the options against the case's shape; errors name the option."""
        num_experts, top_k = case.shape.num_experts, case.shape.top_k
        groups = int(case.option("groups", 1))
        if groups < 1 or num_experts % groups:
            raise ValueError(
                f"hierarchical option 'groups' must divide num_experts={num_experts}, got {groups}"
            )
        group_top_k = int(case.option("group_top_k", 1))
        if not 1 <= group_top_k <= groups:
            raise ValueError(
                f"hierarchical option 'group_top_k' must be in [1, groups={groups}], "
                f"got {group_top_k}"
            )
        per_group = num_experts // groups
        sub_top_k = int(case.option("sub_top_k", top_k // group_top_k))
        if not 1 <= sub_top_k <= per_group:
            raise ValueError(
                f"hierarchical option 'sub_top_k' must be in [1, {per_group}] (sub-experts "
                f"per group), got {sub_top_k}"
            )
        if group_top_k * sub_top_k != top_k:
            raise ValueError(
                f"hierarchical: group_top_k x sub_top_k = {group_top_k} x {sub_top_k} must "
                f"equal top_k={top_k} (the active experts per token)"
            )
        return cls(groups, per_group, group_top_k, sub_top_k)


def primary_router_weights(case: Case, layer: int, groups: int) -> torch.Tensor:
    """The primary router W_DG (float32, on the case's device), the same on every device
    and run for a given seed and layer."""
    generator = torch.Generator().manual_seed(case.seed + PRIMARY_SEED_OFFSET + 7919 * layer)
    w_DG = torch.randn(case.shape.hidden, groups, generator=generator) * case.router_scale
    return w_DG.to(case.device)


@dataclass
class TwoLevelRouting:
    """One forward's routing, every tensor float32 or int64."""

    gate_TK: torch.Tensor  # primary gate x secondary gate per chosen sub-expert
    expert_ids_TK: torch.Tensor  # sub-expert index in [0, E)
    group_ids_TA: torch.Tensor
    group_probs_TG: torch.Tensor  # primary distribution
    probs_TE: torch.Tensor  # product distribution P(g) P(j | g) over all sub-experts


def route_two_levels(
    x32_TD: torch.Tensor,
    w_primary_DG: torch.Tensor,
    w_router_DE: torch.Tensor,
    bias_E: torch.Tensor,
    hierarchy: Hierarchy,
) -> TwoLevelRouting:
    """Primary softmax top-A over groups, then inside each chosen group a softmax top-B
    over its sub-experts; kept probabilities renormalised at each level."""
    G, M = hierarchy.groups, hierarchy.per_group
    group_probs_TG = torch.softmax(x32_TD @ w_primary_DG, dim=-1)
    group_top_TA, group_ids_TA = torch.topk(group_probs_TG, hierarchy.group_top_k, dim=-1)
    group_gate_TA = group_top_TA / group_top_TA.sum(dim=-1, keepdim=True)
    sub_logits_TGM = (x32_TD @ w_router_DE + bias_E).view(-1, G, M)
    sub_probs_TGM = torch.softmax(sub_logits_TGM, dim=-1)
    chosen_TAM = torch.gather(sub_probs_TGM, 1, group_ids_TA[:, :, None].expand(-1, -1, M))
    sub_top_TAB, sub_ids_TAB = torch.topk(chosen_TAM, hierarchy.sub_top_k, dim=-1)
    sub_gate_TAB = sub_top_TAB / sub_top_TAB.sum(dim=-1, keepdim=True)
    T = x32_TD.shape[0]
    return TwoLevelRouting(
        gate_TK=(group_gate_TA[:, :, None] * sub_gate_TAB).reshape(T, -1),
        expert_ids_TK=(group_ids_TA[:, :, None] * M + sub_ids_TAB).reshape(T, -1),
        group_ids_TA=group_ids_TA,
        group_probs_TG=group_probs_TG,
        probs_TE=(group_probs_TG[:, :, None] * sub_probs_TGM).reshape(T, -1),
    )


def imbalance(counts: torch.Tensor) -> float:
    """max / mean of a load vector (1.0 = perfectly balanced)."""
    mean = float(counts.float().mean())
    return float(counts.max()) / mean if mean else float("nan")


class HierarchicalMoE(GroupedMoE):
    """Two-level routing over grouped sub-experts (the flat layer's GEMM path)."""

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        self.hierarchy = Hierarchy.from_case(case)
        layer = getattr(weights, "layer", 0)
        self.w_primary_DG = nn.Parameter(primary_router_weights(case, layer, self.hierarchy.groups))
        self._last_groups: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with self.timer.phase("router"):
            routing = route_two_levels(
                x_TD.float(),
                self.w_primary_DG,
                self.router.w_router_DE,
                self.router.bias_E,
                self.hierarchy,
            )
        # What MoELayer.stats() reads: the sub-expert assignments and their distribution.
        self._last = (routing.expert_ids_TK, routing.probs_TE.detach())
        self._last_groups = (routing.group_ids_TA, routing.group_probs_TG.detach())
        y_TD = self.routed(x_TD, routing.gate_TK.to(x_TD.dtype), routing.expert_ids_TK)
        return self.add_shared(x_TD, y_TD)

    def own_param_counts(self) -> ParamCounts:
        """Both routers, used by every token: the secondary (the base router, D x E) and
        the primary (D x G)."""
        routers = self.router.w_router_DE.numel() + self.w_primary_DG.numel()
        return ParamCounts(total=routers, active=routers, touched=routers, router=routers)

    def extra_metrics(self) -> dict[str, Any]:
        """group_imbalance (max / mean tokens per group, a token counted once per chosen
        group) and group_aux_loss (Switch loss over groups) of the last forward."""
        if self._last_groups is None:
            return {}
        group_ids_TA, group_probs_TG = self._last_groups
        G = self.hierarchy.groups
        counts_G = torch.bincount(group_ids_TA.flatten(), minlength=G)
        return {
            "group_imbalance": imbalance(counts_G),
            "group_aux_loss": float(switch_aux_loss(group_probs_TG, group_ids_TA, G)),
        }


@torch.no_grad()
def hierarchical_reference(
    weights_list: list[ExpertWeights], x_TD: torch.Tensor, case: Case
) -> torch.Tensor:
    """Design reference in float32: the two-level gates built group by group in a plain
    loop, then the plain per-expert loop over the sub-experts."""
    hierarchy = Hierarchy.from_case(case)
    G, M = hierarchy.groups, hierarchy.per_group

    def layer(weights: ExpertWeights, x32_TD: torch.Tensor, carry: Any) -> tuple[Any, Any]:
        w_primary_DG = primary_router_weights(case, getattr(weights, "layer", 0), G)
        w_router_DE = weights.w_router_DE.float()
        bias_E = weights.router_bias_E.float()
        T, E = x32_TD.shape[0], weights.shape.num_experts
        group_probs_TG = torch.softmax(x32_TD @ w_primary_DG, dim=-1)
        top_groups_TA, groups_TA = torch.topk(group_probs_TG, hierarchy.group_top_k, dim=-1)
        top_groups_TA = top_groups_TA / top_groups_TA.sum(dim=-1, keepdim=True)
        # The logits come from one GEMM over all sub-experts, as in the layer: a GEMM of
        # another shape rounds differently and flips near-tied choices.
        sub_logits_TE = x32_TD @ w_router_DE + bias_E
        gate_TE = torch.zeros(T, E, device=x32_TD.device)
        for g in range(G):
            token_N, slot_N = torch.where(groups_TA == g)
            if token_N.numel() == 0:
                continue
            columns = slice(g * M, (g + 1) * M)
            sub_probs_NM = torch.softmax(sub_logits_TE[token_N, columns], dim=-1)
            top_subs_NB, subs_NB = torch.topk(sub_probs_NM, hierarchy.sub_top_k, dim=-1)
            top_subs_NB = top_subs_NB / top_subs_NB.sum(dim=-1, keepdim=True)
            group_gate_N = top_groups_TA[token_N, slot_N]
            for b in range(hierarchy.sub_top_k):
                gate_TE[token_N, g * M + subs_NB[:, b]] = group_gate_N * top_subs_NB[:, b]
        mask_TE = gate_TE > 0
        gate_TE = gate_TE.to(x_TD.dtype).float()  # rounded as the layer rounds it
        return reference_experts(weights, x32_TD, gate_TE, mask_TE), None

    return reference_stack(weights_list, x_TD, layer)


@register(
    "hierarchical",
    family="hierarchical",
    description="two-level MoE: top groups, then top sub-experts inside each group",
    exact=False,
    options=("groups", "group_top_k", "sub_top_k"),
    reference=hierarchical_reference,
)
def build(weights: ExpertWeights, case: Case) -> nn.Module:
    require_base_router(case, "a softmax over groups, then a softmax top-k inside each")
    return HierarchicalMoE(weights, case)
