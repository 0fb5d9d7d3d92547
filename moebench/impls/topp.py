"""`topp`: dynamic top-p routing ("Harder Tasks Need More Experts: Dynamic Routing in MoE
Models", Huang et al. 2024; official code github.com/ZhenweiAn/Dynamic_MoE,
`modeling/modeling_moe.py`).

Each token takes the fewest most-probable experts whose router probabilities add up to
more than the option `p` (default 0.4, the official `top_p_threshold`): experts are
ranked by probability and taken while the mass of the experts ranked above them is at
most `p` (so the first is always taken). The gate weights are the chosen experts' raw
router probabilities, not renormalised (as the official code): a token's gates sum to
its chosen mass (> p), not to 1. Easy tokens (a confident router) use one expert, hard
ones many: the cost per token varies, recorded as `topp_experts_mean` and
`topp_experts_std`.

Dynamic loss (the paper's entropy regulariser, which pushes the router to be confident),
column `dynamic_loss`: the mean over tokens of the entropy -sum_e P_e log P_e (nats) of
the router's full softmax distribution.

The experts run as grouped GEMMs over a flat list of (token, expert, weight) assignments,
any number per token (`GroupedMoE.routed_assignments`); finding the assignments takes one
device sync (their count is data-dependent).

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
A (token, expert) assignments (any number per token).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moebench.case import Case
from moebench.designs import (
    assignment_stats,
    mean_std,
    reference_experts,
    reference_stack,
    require_base_router,
    router_probs,
)
from moebench.impls.grouped import GroupedMoE
from moebench.layer import LayerStats
from moebench.registry import register
from moebench.weights import ExpertWeights

DEFAULT_P = 0.4


def top_p_mask(probs_TE: torch.Tensor, p: float) -> torch.Tensor:
    """Bool T x E: for each token the fewest most-probable experts whose probabilities
    add up to > p (an expert is taken while the mass ranked above it is <= p)."""
    sorted_TE, order_TE = torch.sort(probs_TE, dim=-1, descending=True)
    mass_above_TE = torch.cumsum(sorted_TE, dim=-1) - sorted_TE
    keep_sorted_TE = mass_above_TE <= p
    keep_sorted_TE[:, 0] = True
    return torch.zeros_like(keep_sorted_TE).scatter(1, order_TE, keep_sorted_TE)


def _p_option(case: Case) -> float:
    p = float(case.option("p", DEFAULT_P))
    if not 0 < p <= 1:
        raise ValueError(f"topp option 'p' must be in (0, 1], got {p}")
    return p


def top_p_gates(probs_TE: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_TE, gate_TE float32): the top-p experts and their raw probabilities."""
    mask_TE = top_p_mask(probs_TE, p)
    return mask_TE, probs_TE * mask_TE


def dynamic_loss(probs_TE: torch.Tensor) -> float:
    """The paper's dynamic loss: mean over tokens of -sum_e P_e log P_e (nats)."""
    return float(torch.special.entr(probs_TE.double()).sum(dim=-1).mean())


class TopPMoE(GroupedMoE):
    """Top-p routing over the base router's distribution; grouped experts."""

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        self.p = _p_option(case)
        self._last_topp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with self.timer.phase("router"):
            probs_TE = router_probs(self.router, x_TD)
            mask_TE, gate_TE = top_p_gates(probs_TE, self.p)
        with self.timer.phase("permute"):
            # expert-major order, so the assignments come out grouped by expert
            expert_A, token_A = torch.nonzero(mask_TE.t(), as_tuple=True)
            weight_A = gate_TE[token_A, expert_A]
        self._last_topp = (expert_A, probs_TE.detach(), mask_TE.sum(dim=-1))
        y_TD = self.routed_assignments(x_TD, token_A, expert_A, weight_A)
        return self.add_shared(x_TD, y_TD)

    def stats(self) -> LayerStats | None:
        if self._last_topp is None:
            return None
        expert_A, probs_TE, _ = self._last_topp
        return assignment_stats(expert_A, probs_TE, self.num_experts)

    def extra_metrics(self) -> dict[str, float]:
        """topp_experts_mean / topp_experts_std: routed experts per token in the last
        forward (mean and population std over tokens); dynamic_loss (module docstring)."""
        if self._last_topp is None:
            return {}
        mean, std = mean_std(self._last_topp[2])
        return {
            "topp_experts_mean": mean,
            "topp_experts_std": std,
            "dynamic_loss": dynamic_loss(self._last_topp[1]),
        }


@torch.no_grad()
def topp_reference(
    weights_list: list[ExpertWeights], x_TD: torch.Tensor, case: Case
) -> torch.Tensor:
    """Design reference: top-p routing in float32, plain per-expert loop."""
    p = _p_option(case)

    def layer(weights: ExpertWeights, x32_TD: torch.Tensor, carry: Any) -> tuple[Any, Any]:
        logits_TE = x32_TD @ weights.w_router_DE.float() + weights.router_bias_E.float()
        mask_TE, gate_TE = top_p_gates(torch.softmax(logits_TE, dim=-1), p)
        gate_TE = gate_TE.to(x_TD.dtype).float()  # rounded as the layer rounds it
        return reference_experts(weights, x32_TD, gate_TE, mask_TE), None

    return reference_stack(weights_list, x_TD, layer)


@register(
    "topp",
    family="dynamic-k",
    description="top-p routing (Huang et al. 2024): each token takes the fewest experts "
    "with mass > p (default 0.4), gated by their raw probabilities; dynamic_loss",
    exact=False,
    options=("p",),
    reference=topp_reference,
)
def build(weights: ExpertWeights, case: Case) -> nn.Module:
    require_base_router(case, "top-p (the fewest experts reaching probability p)")
    return TopPMoE(weights, case)
