"""`deepseek`: DeepSeekMoE / DeepSeek-V3 fine-grained experts with shared experts.

Many small routed experts (fine-grained segmentation) plus shared experts that every token
passes through (`shape.shared_experts`, already in the weights: one FFN of width
shared_experts x ffn, added by `MoELayer`). What this file changes is the router:

- `scoring` = "softmax" (DeepSeekMoE, V2) or "sigmoid" (V3): per-expert scores s_e from
  the router logits (which include the case's routing bias, so skew is real).
- group-limited routing (`n_groups` > 1, `topk_groups`): the E experts form n_groups
  equal groups; a group's score is the sum of its two highest choice scores (V3); only the
  topk_groups best groups stay eligible; the top-k is taken inside them.
- choice scores = s_e + `correction_bias_E`, V3's auxiliary-loss-free balancing bias: it
  steers the selection only, never the gate weights. No weight set carries one, so it is a
  zero buffer here; set `layer.router.correction_bias_E` to study it.
- gate weights = the chosen experts' scores s_e normalised to sum 1, times
  `routed_scaling` (V3: 2.5).

With scoring="softmax", no groups and routed_scaling 1 this is the base router exactly
(bit for bit), so the layer computes the base MoE function; it is registered as a variant
(exact=False) with its own plain reference so every case gets `rel_err` against its
design and `fidelity_err` against the base layer. Experts run on `GroupedMoE`'s grouped
GEMMs. `deepseek_groups_per_token` (mean distinct groups a token's experts come from)
shows what group-limited routing buys: fewer groups = fewer devices to send a token to.

Shape legend: T tokens, D hidden, E routed experts, K top_k, G expert groups,
P experts per group (E / G), J groups kept per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from moebench.case import Case
from moebench.designs import reference_experts, reference_stack
from moebench.impls.grouped import GroupedMoE
from moebench.registry import register
from moebench.routing import float32_copy
from moebench.weights import ExpertWeights

Scoring = Literal["softmax", "sigmoid"]
SCORINGS: tuple[str, ...] = ("softmax", "sigmoid")


@dataclass(frozen=True)
class DeepSeekRouting:
    """The router's knobs, read from the case options and validated."""

    top_k: int
    scoring: Scoring = "softmax"
    n_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0

    @classmethod
    def from_case(cls, case: Case) -> DeepSeekRouting:
        """Read `scoring`, `n_groups`, `topk_groups` (default: n_groups, i.e. no limit)
        and `routed_scaling`; raise ValueError naming the option that cannot work."""
        shape = case.shape
        n_groups = int(case.option("n_groups", 1))
        routing = cls(
            top_k=shape.top_k,
            scoring=case.option("scoring", "softmax"),
            n_groups=n_groups,
            topk_groups=int(case.option("topk_groups", n_groups)),
            routed_scaling=float(case.option("routed_scaling", 1.0)),
        )
        E = shape.num_experts
        problems = []
        if routing.scoring not in SCORINGS:
            problems.append(f"'scoring' {routing.scoring!r} not in {list(SCORINGS)}")
        if n_groups < 1 or E % n_groups:
            problems.append(f"'n_groups' {n_groups} must be >= 1 and divide {E} experts")
        elif not 1 <= routing.topk_groups <= n_groups:
            problems.append(f"'topk_groups' {routing.topk_groups} must be in 1..{n_groups}")
        elif routing.topk_groups * (E // n_groups) < shape.top_k:
            problems.append(
                f"'topk_groups' {routing.topk_groups} x {E // n_groups} experts per group "
                f"< top_k {shape.top_k}"
            )
        if routing.routed_scaling <= 0:
            problems.append(f"'routed_scaling' must be > 0, got {routing.routed_scaling}")
        if problems:
            raise ValueError("deepseek options: " + "; ".join(problems))
        return routing


def deepseek_route(
    logits_TE: torch.Tensor, correction_bias_E: torch.Tensor, routing: DeepSeekRouting
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_TK float32, expert_ids_TK, probs_TE) from float32 router logits.

    probs_TE is the score distribution normalised per token (the softmax itself, or the
    sigmoid scores over their sum), for the load-balancing statistics."""
    if routing.scoring == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE)
    choice_TE = scores_TE + correction_bias_E
    if routing.n_groups > 1:
        T, E = choice_TE.shape
        per_group = E // routing.n_groups
        choice_TGP = choice_TE.view(T, routing.n_groups, per_group)
        group_score_TG = choice_TGP.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        kept_TJ = group_score_TG.topk(routing.topk_groups, dim=-1).indices
        kept_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter(1, kept_TJ, True)
        choice_TE = choice_TGP.masked_fill(~kept_TG[..., None], float("-inf")).view(T, E)
    expert_ids_TK = choice_TE.topk(routing.top_k, dim=-1).indices
    gate_TK = scores_TE.gather(1, expert_ids_TK)
    gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)
    if routing.routed_scaling != 1.0:
        gate_TK = gate_TK * routing.routed_scaling
    probs_TE = (
        scores_TE
        if routing.scoring == "softmax"
        else (scores_TE / scores_TE.sum(dim=-1, keepdim=True))
    )
    return gate_TK, expert_ids_TK, probs_TE


class DeepSeekRouter(nn.Module):
    """Softmax or sigmoid scores, optional group limit, normalised and scaled gates."""

    def __init__(self, w_router_DE: torch.Tensor, bias_E: torch.Tensor, routing: DeepSeekRouting):
        super().__init__()
        self.w_router_DE = nn.Parameter(float32_copy(w_router_DE), requires_grad=True)
        self.register_buffer("bias_E", float32_copy(bias_E))
        self.register_buffer("correction_bias_E", torch.zeros_like(self.bias_E))
        self.routing = routing
        self.top_k = routing.top_k

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (gate_weights_TK in x's dtype, expert_ids_TK, probs_TE float32)."""
        logits_TE = x_TD.float() @ self.w_router_DE + self.bias_E
        gate_TK, expert_ids_TK, probs_TE = deepseek_route(
            logits_TE, self.correction_bias_E, self.routing
        )
        return gate_TK.to(x_TD.dtype), expert_ids_TK, probs_TE


class DeepSeekMoE(GroupedMoE):
    """`GroupedMoE` (grouped GEMM experts, shared experts) with the DeepSeek router."""

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        self.routing = DeepSeekRouting.from_case(case)
        self.router = DeepSeekRouter(weights.w_router_DE, weights.router_bias_E, self.routing)

    def extra_metrics(self) -> dict[str, float]:
        """deepseek_groups_per_token: mean number of distinct expert groups (n_groups
        equal groups; 1 without groups) the last forward's tokens were routed to."""
        if self._last is None:
            return {}
        expert_ids_TK = self._last[0]
        per_group = self.num_experts // self.routing.n_groups
        group_TK = torch.div(expert_ids_TK, per_group, rounding_mode="floor")
        hit_TG = torch.zeros(
            group_TK.shape[0], self.routing.n_groups, dtype=torch.bool, device=group_TK.device
        ).scatter(1, group_TK, True)
        return {"deepseek_groups_per_token": float(hit_TG.sum(dim=-1).double().mean())}


@torch.no_grad()
def deepseek_reference(
    weights_list: list[ExpertWeights], x_TD: torch.Tensor, case: Case
) -> torch.Tensor:
    """Design reference: the DeepSeek routing in float32, then a plain per-expert loop
    and the shared experts (a stack: residual layers)."""
    routing = DeepSeekRouting.from_case(case)

    def layer(weights: ExpertWeights, x32_TD: torch.Tensor, carry: Any) -> tuple[Any, Any]:
        logits_TE = x32_TD @ weights.w_router_DE.float() + weights.router_bias_E.float()
        no_correction_E = torch.zeros_like(logits_TE[0])
        gate_TK, expert_ids_TK, _ = deepseek_route(logits_TE, no_correction_E, routing)
        gate_TK = gate_TK.to(x_TD.dtype).float()  # rounded as the layer rounds it
        mask_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, expert_ids_TK, True)
        gate_TE = torch.zeros_like(logits_TE).scatter(1, expert_ids_TK, gate_TK)
        return reference_experts(weights, x32_TD, gate_TE, mask_TE), None

    return reference_stack(weights_list, x_TD, layer)


@register(
    "deepseek",
    family="fine-grained",
    description="DeepSeekMoE/V3: shared + fine-grained experts, softmax|sigmoid, group-limited",
    exact=False,
    options=("scoring", "n_groups", "topk_groups", "routed_scaling"),
    reference=deepseek_reference,
)
def build(weights: ExpertWeights, case: Case) -> nn.Module:
    return DeepSeekMoE(weights, case)
