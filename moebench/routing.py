"""The router (softmax top-k with renormalisation) and routing distributions.

Shape legend: T tokens, D hidden, E routed experts, K experts per token (top_k).

A routing distribution biases the router on purpose, so skew is real (the layer really
sends more tokens to some experts) and reproducible per seed:

- "uniform": no bias; random router weights spread tokens about evenly.
- "zipf:S": expert of rank r (a seeded permutation) gets prior p_r ~ 1 / r**S.
- "hot:K:FRACTION": K seeded "hot" experts share FRACTION of the prior, the rest share
  the remainder evenly.

The prior enters as a per-expert logit bias log(p_e) (centred), part of the layer's
weights, so every implementation computes the same skewed function. The realised load is
what the layer did, recorded as `tokens_per_expert`, not the prior.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RoutingSpecError(ValueError):
    """A routing string that does not parse."""


ROUTING_FORMS = '"uniform", "zipf:S" (S > 0), "hot:K:FRACTION" (1 <= K < E, 0 < FRACTION < 1)'


def routing_prior(spec: str, num_experts: int) -> list[float] | None:
    """Per-rank prior probabilities for `spec`, or None for uniform. Validates `spec`."""
    parts = spec.split(":")
    kind = parts[0]
    try:
        if kind == "uniform" and len(parts) == 1:
            return None
        if kind == "zipf" and len(parts) == 2:
            exponent = float(parts[1])
            if exponent > 0:
                raw = [1.0 / (rank + 1) ** exponent for rank in range(num_experts)]
                return [p / sum(raw) for p in raw]
        if kind == "hot" and len(parts) == 3:
            hot, fraction = int(parts[1]), float(parts[2])
            if 1 <= hot < num_experts and 0 < fraction < 1:
                cold = (1 - fraction) / (num_experts - hot)
                return [fraction / hot] * hot + [cold] * (num_experts - hot)
    except ValueError:
        pass
    raise RoutingSpecError(
        f"bad routing {spec!r} for {num_experts} experts; allowed: {ROUTING_FORMS}"
    )


def routing_bias(spec: str, num_experts: int, seed: int) -> torch.Tensor:
    """Logit bias (float32, shape E) that realises `spec`; experts ranked by a seeded
    permutation so that the hot experts differ between seeds but not between runs."""
    prior = routing_prior(spec, num_experts)
    if prior is None:
        return torch.zeros(num_experts)
    generator = torch.Generator().manual_seed(seed + 7919)
    order = torch.randperm(num_experts, generator=generator)
    bias = torch.empty(num_experts)
    bias[order] = torch.tensor([math.log(p) for p in prior])
    return bias - bias.mean()


def float32_copy(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy of `t` that shares no memory with it (`.float()` of a float32
    tensor is the tensor itself)."""
    return t.detach().to(torch.float32, copy=True)


class Router(nn.Module):
    """Softmax top-k router in float32 (so routing does not flip with the dtype).

    It holds copies of the weight set's router tensors (small: D x E), so a study that
    edits one layer's router in place (forcing routes through `bias_E`, say) leaves the
    shared weights, every other implementation and the reference as they were."""

    def __init__(self, w_router_DE: torch.Tensor, bias_E: torch.Tensor, top_k: int):
        super().__init__()
        self.w_router_DE = nn.Parameter(float32_copy(w_router_DE), requires_grad=True)
        self.register_buffer("bias_E", float32_copy(bias_E))
        self.top_k = top_k

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (gate_weights_TK in x's dtype, expert_ids_TK int64, probs_TE float32)."""
        logits_TE = x_TD.float() @ self.w_router_DE + self.bias_E
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_probs_TK, expert_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        gate_weights_TK = top_probs_TK / top_probs_TK.sum(dim=-1, keepdim=True)
        return gate_weights_TK.to(x_TD.dtype), expert_ids_TK, probs_TE


def switch_aux_loss(
    probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Switch Transformer load-balancing loss: E * sum_e f_e * P_e, with f_e the fraction
    of (token, slot) assignments sent to expert e and P_e its mean router probability.
    Equals 1.0 for perfectly balanced routing."""
    counts_E = torch.bincount(expert_ids_TK.flatten(), minlength=num_experts)
    fraction_E = counts_E.float() / expert_ids_TK.numel()
    return num_experts * (fraction_E * probs_TE.float().mean(dim=0)).sum()
