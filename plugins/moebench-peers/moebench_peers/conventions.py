"""Router conventions: which function a peer's MoE block computes, and its plain reference.

Blocks of the same shape differ in how the router turns logits into gate weights, and
whether the shared expert is gated. A `Convention` names those choices; `MOEBENCH_BASE`
is moebench's base MoE layer (softmax over all experts, top-k, gates renormalised to sum
1, shared experts added ungated), which Mixtral and Qwen3-MoE compute. A block with
another convention is registered as a variant (exact=False) whose `rel_err` is measured
against `convention_reference` of its own convention, never against the base layer's;
its distance to the base layer is recorded as `fidelity_err`.

Where moebench's `LayerShape` carries a router convention of its own (scoring,
norm_topk_prob, n_groups, topk_groups, routed_scaling, shared_expert_gate), `case_convention`
reads it, so an adapter can refuse a case whose function its block does not compute; on a
moebench without those fields every case is the base. A weight set's `correction_bias_E`
(DeepSeek-V3's selection bias) and `w_shared_expert_gate_D` (Qwen2-MoE's shared-expert
gate) are used where present.

Shape legend: T tokens, D hidden, E routed experts, K top_k, G expert groups, P experts
per group (E / G), J groups kept per token, S shared-expert width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from moebench.case import Case, LayerShape
from moebench.weights import ExpertWeights


@dataclass(frozen=True)
class Convention:
    """How a block routes and mixes its experts.

    scoring: per-expert scores from the router logits, "softmax" or "sigmoid".
    norm_topk_prob: the chosen experts' scores are divided by their sum.
    n_groups, topk_groups: group-limited routing (DeepSeek-V3): experts form n_groups
      equal groups, a group scores the sum of its two best scores, only the topk_groups
      best groups are eligible. n_groups = 1: no limit.
    routed_scaling: the gates are multiplied by this (DeepSeek-V3: 2.5).
    shared_gate: the shared expert's output is scaled per token by sigmoid(x w) (Qwen2-MoE).
    """

    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    n_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    shared_gate: bool = False

    def describe(self) -> str:
        """A short phrase for messages and descriptions."""
        parts = [self.scoring, "renormalised top-k" if self.norm_topk_prob else "raw top-k"]
        if self.n_groups > 1:
            parts.append(f"{self.topk_groups} of {self.n_groups} groups")
        if self.routed_scaling != 1.0:
            parts.append(f"x{self.routed_scaling:g}")
        if self.shared_gate:
            parts.append("sigmoid-gated shared expert")
        return ", ".join(parts)


MOEBENCH_BASE = Convention()
# Where a weight set keeps the conventions' own tensors (float32, shapes E and D).
CORRECTION_BIAS = "correction_bias_E"
SHARED_GATE_WEIGHT = "w_shared_expert_gate_D"


def case_convention(shape: LayerShape) -> Convention:
    """The router convention a case's layer computes (the base where the shape has none)."""
    n_groups = getattr(shape, "n_groups", 1)
    return Convention(
        scoring=getattr(shape, "scoring", "softmax"),
        norm_topk_prob=getattr(shape, "norm_topk_prob", True),
        n_groups=n_groups,
        topk_groups=getattr(shape, "topk_groups", 0) or n_groups,
        routed_scaling=getattr(shape, "routed_scaling", 1.0),
        shared_gate=getattr(shape, "shared_expert_gate", "none") == "sigmoid"
        and shape.shared_experts > 0,
    )


def correction_bias(weights: ExpertWeights) -> torch.Tensor:
    """The weight set's selection-only correction bias (float32, E), or zeros."""
    bias_E = getattr(weights, CORRECTION_BIAS, None)
    if bias_E is None:
        return torch.zeros(weights.shape.num_experts, device=weights.device)
    return bias_E.float()


def route(
    logits_TE: torch.Tensor, convention: Convention, top_k: int, correction_bias_E: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_TK, expert_ids_TK) in float32 from float32 logits. correction_bias_E steers
    the choice only (DeepSeek-V3's balancing bias), never the gate values."""
    if convention.scoring == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE)
    choice_TE = scores_TE + correction_bias_E
    if convention.n_groups > 1:
        T, E = choice_TE.shape
        choice_TGP = choice_TE.view(T, convention.n_groups, E // convention.n_groups)
        group_score_TG = choice_TGP.topk(2, dim=-1).values.sum(dim=-1)
        kept_TJ = group_score_TG.topk(convention.topk_groups, dim=-1).indices
        kept_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter(1, kept_TJ, True)
        choice_TE = choice_TGP.masked_fill(~kept_TG[..., None], float("-inf")).view(T, E)
    expert_ids_TK = choice_TE.topk(top_k, dim=-1).indices
    gate_TK = scores_TE.gather(1, expert_ids_TK)
    if convention.norm_topk_prob:
        gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)
    return gate_TK * convention.routed_scaling, expert_ids_TK


def swiglu32(x32_ND: torch.Tensor, w_gate_DF: torch.Tensor, w_up_DF, w_down_FD) -> torch.Tensor:
    """One SwiGLU FFN in float32."""
    return (F.silu(x32_ND @ w_gate_DF.float()) * (x32_ND @ w_up_DF.float())) @ w_down_FD.float()


@torch.no_grad()
def layer_reference(
    weights: ExpertWeights, x32_TD: torch.Tensor, convention: Convention
) -> torch.Tensor:
    """One layer of `convention` on `weights`, in float32, as a plain loop over experts."""
    logits_TE = x32_TD @ weights.w_router_DE.float() + weights.router_bias_E.float()
    gate_TK, expert_ids_TK = route(
        logits_TE, convention, weights.shape.top_k, correction_bias(weights)
    )
    y_TD = torch.zeros_like(x32_TD)
    for expert in range(weights.shape.num_experts):
        token_idx, slot_idx = torch.where(expert_ids_TK == expert)
        if token_idx.numel() == 0:
            continue
        out_ND = swiglu32(
            x32_TD[token_idx],
            weights.w_gate_EDF[expert],
            weights.w_up_EDF[expert],
            weights.w_down_EFD[expert],
        )
        y_TD.index_add_(0, token_idx, out_ND * gate_TK[token_idx, slot_idx, None])
    if weights.w_shared_gate_DS is not None:
        shared_TD = swiglu32(
            x32_TD, weights.w_shared_gate_DS, weights.w_shared_up_DS, weights.w_shared_down_SD
        )
        if convention.shared_gate:
            gate_D = getattr(weights, SHARED_GATE_WEIGHT, None)
            assert gate_D is not None, f"a gated shared expert needs {SHARED_GATE_WEIGHT}"
            shared_TD = shared_TD * torch.sigmoid(x32_TD @ gate_D.float())[:, None]
        y_TD = y_TD + shared_TD
    return y_TD


Reference = Callable[[list[ExpertWeights], torch.Tensor, Case], torch.Tensor]


def convention_reference(convention: Convention) -> Reference:
    """moebench's `reference(weights_list, x_TD, case) -> y_TD` (float32) for a block of
    `convention`: one layer, or a residual stack x <- x + layer(x) whose layer inputs are
    rounded to x's dtype, as the layers under test see them."""

    @torch.no_grad()
    def reference(weights_list: list[ExpertWeights], x_TD: torch.Tensor, case: Case):
        x32_TD = x_TD.float()
        for weights in weights_list:
            layer_in_TD = x32_TD.to(x_TD.dtype).float()
            y32_TD = layer_reference(weights, layer_in_TD, convention)
            if len(weights_list) == 1:
                return y32_TD
            x32_TD = x32_TD + y32_TD
        return x32_TD

    return reference
