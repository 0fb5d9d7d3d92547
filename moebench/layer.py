"""The base class every MoE layer derives from: router + routed experts + shared experts.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k.

A subclass implements `routed(x_TD, gate_weights_TK, expert_ids_TK) -> y_TD`; the base
class routes (under the layer's router convention, `moebench.routing.route`), adds the
shared experts (gated where the convention says so), and keeps references to the routing
tensors of the last call (no copy, no sync: nothing in the timed path) so that `stats()`
can report the load afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from moebench.case import Case
from moebench.measure.phases import NULL_TIMER, Timer
from moebench.routing import Router, switch_aux_loss
from moebench.weights import ExpertWeights


def swiglu(
    x_TD: torch.Tensor, w_gate_DF: torch.Tensor, w_up_DF: torch.Tensor, w_down_FD: torch.Tensor
) -> torch.Tensor:
    """One SwiGLU expert: (silu(x W_gate) * (x W_up)) W_down."""
    return (F.silu(x_TD @ w_gate_DF) * (x_TD @ w_up_DF)) @ w_down_FD


@dataclass
class LayerStats:
    """Load and balance of the last forward, as plain Python numbers."""

    tokens_per_expert: list[int]
    dropped_slots: int
    total_slots: int
    aux_loss: float

    @property
    def imbalance(self) -> float:
        """max / mean of tokens per expert (1.0 = perfectly balanced)."""
        mean = sum(self.tokens_per_expert) / max(len(self.tokens_per_expert), 1)
        return max(self.tokens_per_expert) / mean if mean else float("nan")

    @property
    def dropped_frac(self) -> float:
        return self.dropped_slots / self.total_slots if self.total_slots else 0.0

    @property
    def experts_used(self) -> int:
        return sum(1 for n in self.tokens_per_expert if n > 0)

    def columns(self) -> dict[str, Any]:
        """The balance columns of a results row."""
        return {
            "tokens_per_expert": self.tokens_per_expert,
            "imbalance": self.imbalance,
            "dropped_frac": self.dropped_frac,
            "aux_loss": self.aux_loss,
        }


class MoELayer(nn.Module):
    """Router, routed experts (the subclass's job) and shared experts.

    Phases (moebench.measure.phases): `forward` marks "router" and "shared"; a subclass
    marks "permute", "expert" and "unpermute" in `routed` with `self.timer.phase(name)`
    (what it leaves unmarked is counted in `other_ms`)."""

    timer: Timer = NULL_TIMER

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__()
        shape = weights.shape
        self.num_experts = shape.num_experts
        self.top_k = shape.top_k
        problems = case.shape.router_problems()
        if problems:
            raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))
        self.router = Router(
            weights.w_router_DE, weights.router_bias_E, shape, weights.correction_bias_E
        )
        self.shared: nn.ParameterList | None = None
        self.w_shared_expert_gate_D: nn.Parameter | None = None
        if weights.w_shared_gate_DS is not None:
            self.shared = nn.ParameterList(
                [weights.w_shared_gate_DS, weights.w_shared_up_DS, weights.w_shared_down_SD]
            )
            if weights.w_shared_expert_gate_D is not None:
                self.w_shared_expert_gate_D = nn.Parameter(weights.w_shared_expert_gate_D)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        # Set by layers that drop (token, slot) assignments: bool mask, shape T x K.
        self._last_dropped_TK: torch.Tensor | None = None

    def routed(
        self, x_TD: torch.Tensor, gate_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with self.timer.phase("router"):
            gate_weights_TK, expert_ids_TK, probs_TE = self.router(x_TD)
        self._last = (expert_ids_TK, probs_TE)
        y_TD = self.routed(x_TD, gate_weights_TK, expert_ids_TK)
        return self.add_shared(x_TD, y_TD)

    def add_shared(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        """y plus the shared experts' output (y itself without shared experts)."""
        if self.shared is None:
            return y_TD
        with self.timer.phase("shared"):
            return y_TD + self.shared_output(x_TD)

    def shared_output(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The shared experts' output, scaled per token by sigmoid(x . w) in float32 where
        the layer gates them (Qwen2-MoE's shared_expert_gate)."""
        assert self.shared is not None
        y_TD = swiglu(x_TD, *self.shared)
        if self.w_shared_expert_gate_D is None:
            return y_TD
        gate_T = torch.sigmoid(x_TD.float() @ self.w_shared_expert_gate_D)
        return y_TD * gate_T.to(x_TD.dtype)[:, None]

    def kept_assignments(self) -> tuple[torch.Tensor, int]:
        """Expert ids of the last forward's (token, slot) assignments that were computed,
        and how many were dropped (capacity limits). Syncs the device."""
        assert self._last is not None
        expert_ids_TK = self._last[0]
        if self._last_dropped_TK is None:
            return expert_ids_TK, 0
        return expert_ids_TK[~self._last_dropped_TK], int(self._last_dropped_TK.sum())

    def stats(self) -> LayerStats | None:
        """Load of the last forward (syncs the device; call outside timed regions)."""
        if self._last is None:
            return None
        expert_ids_TK, probs_TE = self._last
        kept_ids, dropped = self.kept_assignments()
        counts = torch.bincount(kept_ids.flatten(), minlength=self.num_experts)
        return LayerStats(
            tokens_per_expert=[int(n) for n in counts.tolist()],
            dropped_slots=dropped,
            total_slots=expert_ids_TK.numel(),
            aux_loss=float(switch_aux_loss(probs_TE, expert_ids_TK, self.num_experts)),
        )


def expert_parameters(weights: ExpertWeights) -> list[nn.Parameter]:
    """The three routed-expert weight tensors as Parameters (no copy)."""
    return [nn.Parameter(t) for t in (weights.w_gate_EDF, weights.w_up_EDF, weights.w_down_EFD)]


ADDITIVE_SUFFIXES = ("_bytes", "_ms", "_count", "_j")


class Stack(nn.Module):
    """`layers` MoE layers in sequence with residual connections: x <- x + layer(x).

    A layer that needs state from the layer before it (MoE++'s gating residuals pass the
    previous router's logits on) defines `forward_with_carry(x_TD, carry) -> (y_TD,
    carry)`; `carry` is None for the first layer. Other layers are called plainly.
    Its `timer` marks nothing itself: it is there so that the train step can mark the
    backward call of a stack as of a single layer.
    """

    timer: Timer = NULL_TIMER

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        details = {getattr(layer, "impl_detail", None) for layer in layers}
        self.impl_detail = details.pop() if len(details) == 1 else "mixed"

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        carry = None
        for layer in self.layers:
            if hasattr(layer, "forward_with_carry"):
                y_TD, carry = layer.forward_with_carry(x_TD, carry)
            else:
                y_TD = layer(x_TD)
            x_TD = x_TD + y_TD
        return x_TD

    def stats(self) -> LayerStats | None:
        """Load summed over the layers (per expert index); aux loss averaged."""
        per_layer = [layer.stats() for layer in self.layers if hasattr(layer, "stats")]
        per_layer = [s for s in per_layer if s is not None]
        if not per_layer:
            return None
        return LayerStats(
            tokens_per_expert=[sum(c) for c in zip(*(s.tokens_per_expert for s in per_layer))],
            dropped_slots=sum(s.dropped_slots for s in per_layer),
            total_slots=sum(s.total_slots for s in per_layer),
            aux_loss=sum(s.aux_loss for s in per_layer) / len(per_layer),
        )

    def extra_metrics(self) -> dict[str, Any]:
        """The layers' design-specific metrics combined: quantities that add up over
        layers (names ending in _bytes, _ms, _count, _j) are summed, lists are summed
        element-wise, other numbers (fractions, rates, means) are averaged."""
        per_layer = [
            layer.extra_metrics() for layer in self.layers if hasattr(layer, "extra_metrics")
        ]
        if not per_layer:
            return {}
        combined: dict[str, Any] = {}
        for key in per_layer[0]:
            values = [m[key] for m in per_layer if m.get(key) is not None]
            if not values:
                combined[key] = None
            elif isinstance(values[0], list):
                combined[key] = [sum(v) for v in zip(*values)]
            elif key.endswith(ADDITIVE_SUFFIXES):
                combined[key] = sum(values)
            else:
                combined[key] = sum(values) / len(values)
        return combined
