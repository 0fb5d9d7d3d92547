"""`reference`: the plain per-expert loop, the ground truth every exact layer is checked
against; and `reference_output`, the float32 golden output used for that check.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k.
"""

from __future__ import annotations

import torch

from moebench.case import Case
from moebench.designs import reference_experts, reference_stack
from moebench.layer import MoELayer, expert_parameters, swiglu
from moebench.registry import register
from moebench.routing import route
from moebench.weights import ExpertWeights


class ReferenceMoE(MoELayer):
    """For each expert: gather its tokens, run the expert, scatter-add weighted outputs."""

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD = expert_parameters(weights)

    def routed(
        self, x_TD: torch.Tensor, gate_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        timer = self.timer
        y_TD = torch.zeros_like(x_TD)
        for expert in range(self.num_experts):
            with timer.phase("permute"):
                token_idx, slot_idx = torch.where(expert_ids_TK == expert)
                if token_idx.numel() == 0:
                    continue
                x_ND = x_TD[token_idx]
            with timer.phase("expert"):
                out = swiglu(
                    x_ND, self.w_gate_EDF[expert], self.w_up_EDF[expert], self.w_down_EFD[expert]
                )
            with timer.phase("unpermute"):
                weighted = out * gate_weights_TK[token_idx, slot_idx, None]
                y_TD = y_TD.index_add(0, token_idx, weighted)
        return y_TD


@register(
    "reference",
    family="reference",
    description="plain loop over experts (gather, SwiGLU, scatter-add): the ground truth",
    dtypes=("float32", "bfloat16", "float16", "float64"),
)
def build(weights: ExpertWeights, case: Case) -> ReferenceMoE:
    return ReferenceMoE(weights, case)


@torch.no_grad()
def reference_output(
    weights: ExpertWeights, x_TD: torch.Tensor, keep_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """The layer's output in float32 (one expert upcast at a time, so it fits beside the
    weights), under the router convention of `weights.shape` (`moebench.routing.route`).
    keep_TK: optional bool mask of (token, slot) assignments to keep, for layers that
    drop some on purpose."""
    x32_TD = x_TD.float()
    logits_TE = x32_TD @ weights.w_router_DE.float() + weights.router_bias_E.float()
    gate_TK, expert_ids_TK, probs_TE = route(logits_TE, weights.shape, weights.correction_bias_E)
    # Round the gate weights as the layer does, so the check measures the experts' error.
    gate_TK = gate_TK.to(x_TD.dtype).float()
    if keep_TK is not None:
        gate_TK = gate_TK * keep_TK
    # Top-k ids are distinct per token, so the T x E scatter loses nothing.
    gate_TE = torch.zeros_like(probs_TE).scatter_(1, expert_ids_TK, gate_TK)
    chosen_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, expert_ids_TK, True)
    return reference_experts(weights, x32_TD, gate_TE, chosen_TE)


@torch.no_grad()
def reference_stack_output(weights: list[ExpertWeights], x_TD: torch.Tensor) -> torch.Tensor:
    """The float32 output of a stack of layers with residuals (x <- x + layer(x)). Each
    layer's input is rounded to the stack's dtype, as the layers under test see it;
    inside `designs.stack_inputs`, layer by layer on the recorded inputs."""

    def layer(weights: ExpertWeights, x32_TD: torch.Tensor, carry: None) -> tuple:
        return reference_output(weights, x32_TD.to(x_TD.dtype)), None

    return reference_stack(weights, x_TD, layer)
