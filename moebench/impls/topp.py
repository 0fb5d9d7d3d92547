"""`topp`: dynamic top-p routing ("Harder Tasks Need More Experts", Huang et al. 2024).

Each token takes the fewest experts whose router probabilities add up to at least the
option `p` (default 0.5): experts are ranked by probability and taken while the mass of
the experts ranked above them is still below `p` (so the first is always taken). The gate
weights are the chosen probabilities renormalised to sum to 1, as the base router does for
its top-k, so with `p` reached after exactly top_k experts the token computes the base
function. Easy tokens (a confident router) use one expert, hard ones many: the cost per
token varies, recorded as `topp_experts_mean` and `topp_experts_std`.

The experts run as grouped GEMMs over a flat list of (token, expert, weight) assignments,
any number per token (`AssignmentMixin` on `GroupedMoE`, whose `_experts` does the
GEMMs); finding the assignments takes one device sync (their count is data-dependent).

This file also holds the pieces the other variable-k designs (`moepp`, `dsmoe`) and the
design references (`deepseek`) share: `AssignmentMixin`, `router_probs`, `mean_std`,
`assignment_stats`, `reference_experts` and `reference_stack`. They come first and need
no registering module: importing `moebench.impls.grouped` for the first time runs the
registry's `load_all`, which imports those designs, which import these pieces from this
half-imported module. So `GroupedMoE` is imported below them, not at the top.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
A (token, expert) assignments (any number per token).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moebench.case import Case
from moebench.layer import LayerStats, swiglu
from moebench.routing import Router, switch_aux_loss
from moebench.weights import ExpertWeights

# ------------------------------------------------------------------ shared pieces
# (none of them may import a module that registers: see the module docstring)


def router_probs(router: Router, x_TD: torch.Tensor) -> torch.Tensor:
    """The base router's full softmax distribution (float32, T x E), no top-k."""
    return torch.softmax(x_TD.float() @ router.w_router_DE + router.bias_E, dim=-1)


class AssignmentMixin:
    """For a `GroupedMoE` subclass (`class Layer(AssignmentMixin, GroupedMoE)`): routed
    experts over a flat list of assignments, so a token can use any number of experts
    (zero included). The subclass writes `forward`."""

    num_experts: int
    shared: nn.ParameterList | None
    w_gate_EDF: nn.Parameter
    _experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    parameters: Callable[..., Any]

    def routed_assignments(
        self,
        x_TD: torch.Tensor,
        token_A: torch.Tensor,
        expert_A: torch.Tensor,
        weight_A: torch.Tensor,
    ) -> torch.Tensor:
        """sum over assignments a of weight_A[a] * expert_A[a](x_TD[token_A[a]]), as T x D
        in x's dtype: assignments sorted by expert, one grouped GEMM per weight matrix."""
        if token_A.numel() == 0:
            return torch.zeros_like(x_TD)
        order_A = torch.argsort(expert_A, stable=True)
        token_A = token_A[order_A]
        counts_E = torch.bincount(expert_A, minlength=self.num_experts)
        out_AD = self._experts(x_TD[token_A], counts_E)
        out_AD = out_AD * weight_A[order_A, None].to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add(0, token_A, out_AD)

    def add_shared(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        """y plus the shared experts' output (if the shape has shared experts)."""
        if self.shared is None:
            return y_TD
        return y_TD + swiglu(x_TD, *self.shared)

    def active_param_counts(self, experts_per_token: float) -> tuple[int, int]:
        """(total, active per token) for a layer whose tokens use `experts_per_token`
        routed experts on average; every non-expert parameter (router, shared experts,
        a design's own small parameters) counts as active."""
        total = sum(p.numel() for p in self.parameters())
        expert = self.w_gate_EDF[0].numel() * 3
        other = total - self.num_experts * expert
        return total, round(experts_per_token * expert + other)


def assignment_stats(
    expert_A: torch.Tensor, probs_TE: torch.Tensor, num_experts: int
) -> LayerStats:
    """Load of a forward given as flat assignments (none dropped); aux loss as the Switch
    loss with f_e the fraction of assignments sent to expert e."""
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    aux = (
        float(switch_aux_loss(probs_TE, expert_A.view(-1, 1), num_experts))
        if expert_A.numel()
        else float("nan")
    )
    return LayerStats(
        tokens_per_expert=[int(n) for n in counts_E.tolist()],
        dropped_slots=0,
        total_slots=expert_A.numel(),
        aux_loss=aux,
    )


def mean_std(values_T: torch.Tensor) -> tuple[float, float]:
    """Mean and population standard deviation of a per-token quantity, as floats."""
    values_T = values_T.double()
    return float(values_T.mean()), float(values_T.std(correction=0))


@torch.no_grad()
def reference_experts(
    weights: ExpertWeights, x32_TD: torch.Tensor, gate_TE: torch.Tensor, mask_TE: torch.Tensor
) -> torch.Tensor:
    """Plain loop, float32: for each expert, its chosen tokens (mask_TE) through it,
    weighted by gate_TE and scatter-added; then the shared experts."""
    y_TD = torch.zeros_like(x32_TD)
    for expert in range(weights.shape.num_experts):
        token_idx = torch.where(mask_TE[:, expert])[0]
        if token_idx.numel() == 0:
            continue
        out = swiglu(
            x32_TD[token_idx],
            weights.w_gate_EDF[expert].float(),
            weights.w_up_EDF[expert].float(),
            weights.w_down_EFD[expert].float(),
        )
        y_TD.index_add_(0, token_idx, out * gate_TE[token_idx, expert, None])
    if weights.w_shared_gate_DS is not None:
        y_TD += swiglu(
            x32_TD,
            weights.w_shared_gate_DS.float(),
            weights.w_shared_up_DS.float(),
            weights.w_shared_down_SD.float(),
        )
    return y_TD


ReferenceLayer = Callable[[ExpertWeights, torch.Tensor, Any], tuple[torch.Tensor, Any]]


@torch.no_grad()
def reference_stack(
    weights_list: list[ExpertWeights], x_TD: torch.Tensor, layer: ReferenceLayer
) -> torch.Tensor:
    """A design reference over a stack, float32: `layer(weights, x32_TD, carry) ->
    (y32_TD, carry)` (carry None for the first layer). One layer: its output; several:
    x <- x + layer(x) with each layer's input rounded to x's dtype, as the layers under
    test see it (like `reference_stack_output`)."""
    x32_TD = x_TD.float()
    carry: Any = None
    for weights in weights_list:
        y32_TD, carry = layer(weights, x32_TD.to(x_TD.dtype).float(), carry)
        if len(weights_list) == 1:
            return y32_TD
        x32_TD = x32_TD + y32_TD
    return x32_TD


# ------------------------------------------------------------------ top-p

from moebench.impls.grouped import GroupedMoE  # noqa: E402  (after the shared pieces)
from moebench.registry import register  # noqa: E402


def top_p_mask(probs_TE: torch.Tensor, p: float) -> torch.Tensor:
    """Bool T x E: for each token the fewest most-probable experts whose probabilities
    add up to >= p (an expert is taken while the mass ranked above it is < p)."""
    sorted_TE, order_TE = torch.sort(probs_TE, dim=-1, descending=True)
    mass_above_TE = torch.cumsum(sorted_TE, dim=-1) - sorted_TE
    keep_sorted_TE = mass_above_TE < p
    keep_sorted_TE[:, 0] = True
    return torch.zeros_like(keep_sorted_TE).scatter(1, order_TE, keep_sorted_TE)


def _p_option(case: Case) -> float:
    p = float(case.option("p", 0.5))
    if not 0 < p <= 1:
        raise ValueError(f"topp option 'p' must be in (0, 1], got {p}")
    return p


def top_p_gates(probs_TE: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_TE, gate_TE float32): the top-p experts and their renormalised weights."""
    mask_TE = top_p_mask(probs_TE, p)
    gate_TE = probs_TE * mask_TE
    return mask_TE, gate_TE / gate_TE.sum(dim=-1, keepdim=True)


class TopPMoE(AssignmentMixin, GroupedMoE):
    """Top-p routing over the base router's distribution; grouped experts."""

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        self.p = _p_option(case)
        self._last_topp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        probs_TE = router_probs(self.router, x_TD)
        mask_TE, gate_TE = top_p_gates(probs_TE, self.p)
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
        forward (mean and population std over tokens)."""
        if self._last_topp is None:
            return {}
        mean, std = mean_std(self._last_topp[2])
        return {"topp_experts_mean": mean, "topp_experts_std": std}

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token at the last forward's mean experts per token)."""
        mean = float(self._last_topp[2].float().mean()) if self._last_topp else self.top_k
        return self.active_param_counts(mean)


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
    description="top-p routing: each token takes the fewest experts with mass >= p",
    exact=False,
    options=("p",),
    reference=topp_reference,
)
def build(weights: ExpertWeights, case: Case) -> nn.Module:
    return TopPMoE(weights, case)
