"""The base class every MoE layer derives from: router + routed experts + shared experts.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k.

A subclass implements `routed(x_TD, gate_weights_TK, expert_ids_TK) -> y_TD`; the base
class routes (under the layer's router convention, `moebench.routing.route`), adds the
shared experts (gated where the convention says so), and keeps references to the routing
tensors of the last call (no copy, no sync: nothing in the timed path) so that `stats()`
can report the load afterwards. A subclass may run the shared experts on a side CUDA
stream beside the Router and its routed experts (`overlaps_shared`): the same kernels and
the same sum, so the same bits, in less time where the routed experts leave the card's
multiprocessors idle (they wait on the weights' reads, or on short kernels' boundaries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from moebench.case import Case
from moebench.measure.phases import NULL_TIMER, PhaseTimer, Timer
from moebench.routing import Router, switch_aux_loss
from moebench.weights import ExpertWeights


def swiglu(
    x_TD: torch.Tensor, w_gate_DF: torch.Tensor, w_up_DF: torch.Tensor, w_down_FD: torch.Tensor
) -> torch.Tensor:
    """One SwiGLU expert: (silu(x W_gate) * (x W_up)) W_down."""
    return (F.silu(x_TD @ w_gate_DF) * (x_TD @ w_up_DF)) @ w_down_FD


@dataclass
class LayerStats:
    """Routing, load and balance of one layer's last forward, as plain Python numbers.

    tokens_per_expert: (token, slot) assignments each routed expert computed, after any
    drop (one entry per routed expert the layer holds: a merged layer's groups, MoE++'s
    FFN experts). demand_per_expert: what the router asked of each, before drops.
    experts_per_token: mean distinct routed experts the router chose per token (before
    drops). router_entropy: mean over tokens of the entropy (nats) of the routing
    distribution the layer chose from.
    """

    tokens_per_expert: list[int]
    demand_per_expert: list[int]
    dropped_slots: int
    total_slots: int
    aux_loss: float
    experts_per_token: float
    router_entropy: float

    @property
    def imbalance(self) -> float:
        """Router demand: max / mean of `demand_per_expert` (1.0 = balanced)."""
        return _max_over_mean(self.demand_per_expert)

    @property
    def served_imbalance(self) -> float:
        """After drops: max / mean of `tokens_per_expert`."""
        return _max_over_mean(self.tokens_per_expert)

    @property
    def dropped_frac(self) -> float:
        return self.dropped_slots / self.total_slots if self.total_slots else 0.0

    @property
    def experts_used(self) -> int:
        """Routed experts that computed at least one (kept) token."""
        return sum(1 for n in self.tokens_per_expert if n > 0)

    def columns(self) -> dict[str, Any]:
        """The balance columns of a results row (one layer)."""
        return balance_columns([self])


def _max_over_mean(counts: list[int]) -> float:
    mean = sum(counts) / max(len(counts), 1)
    return max(counts) / mean if mean else float("nan")


def _mean_defined(values: list[float]) -> float:
    """Mean of the values that are not NaN (NaN if none is)."""
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else float("nan")


def balance_columns(per_layer: list[LayerStats]) -> dict[str, Any]:
    """The balance columns of a row from each layer's stats (one, or a stack's):
    tokens_per_expert summed per expert index; imbalance, served_imbalance, aux_loss,
    experts_per_token and router_entropy the mean over layers (a layer where no expert
    got a token has no imbalance and is left out of its mean); imbalance_max the worst
    layer's imbalance; dropped_frac pooled over every layer's slots."""
    imbalances = [s.imbalance for s in per_layer]
    defined = [v for v in imbalances if not math.isnan(v)]
    total_slots = sum(s.total_slots for s in per_layer)
    return {
        "tokens_per_expert": [sum(c) for c in zip(*(s.tokens_per_expert for s in per_layer))],
        "imbalance": _mean_defined(imbalances),
        "imbalance_max": max(defined) if defined else float("nan"),
        "served_imbalance": _mean_defined([s.served_imbalance for s in per_layer]),
        "dropped_frac": sum(s.dropped_slots for s in per_layer) / total_slots
        if total_slots
        else 0.0,
        "aux_loss": _mean_defined([s.aux_loss for s in per_layer]),
        "experts_per_token": _mean_defined([s.experts_per_token for s in per_layer]),
        "router_entropy": _mean_defined([s.router_entropy for s in per_layer]),
    }


def routing_entropy(probs_TE: torch.Tensor) -> float:
    """Mean over tokens of the entropy (nats) of each token's routing distribution."""
    if probs_TE.shape[0] == 0:
        return float("nan")
    return float(torch.special.entr(probs_TE.double()).sum(dim=-1).mean())


def routing_stats(
    expert_A: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    probs_TE: torch.Tensor,
    aux_loss: float,
    kept_A: torch.Tensor | None = None,
    total_slots: int | None = None,
) -> LayerStats:
    """The one way a layer reports its routing: `expert_A`, the routed expert of each
    distinct (token, expert) assignment the router made (before drops); `kept_A`, a bool
    mask of those that were computed (None: all); `probs_TE`, the distribution routed
    from; `total_slots`, the (token, slot) count dropped_frac divides by (default: the
    assignments; MoE++ also counts the slots sent to zero-computation experts)."""
    demand_E = torch.bincount(expert_A.flatten(), minlength=num_experts)
    served_E = (
        demand_E
        if kept_A is None
        else torch.bincount(expert_A.flatten()[kept_A.flatten()], minlength=num_experts)
    )
    assignments = expert_A.numel()
    return LayerStats(
        tokens_per_expert=[int(n) for n in served_E.tolist()],
        demand_per_expert=[int(n) for n in demand_E.tolist()],
        dropped_slots=assignments - int(served_E.sum()),
        total_slots=assignments if total_slots is None else total_slots,
        aux_loss=aux_loss,
        experts_per_token=assignments / num_tokens if num_tokens else float("nan"),
        router_entropy=routing_entropy(probs_TE),
    )


# nn.Module's call (hooks, then forward), named once: `MoELayer.__call__` is on every call
_MODULE_CALL = nn.Module.__call__


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
        self.hidden = shape.hidden
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        # Set by layers that drop (token, slot) assignments: bool mask, shape T x K.
        self._last_dropped_TK: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The layer on tokens x hidden input, or on any leading dimensions x hidden
        (batch x sequence x hidden, say: flattened to tokens, the output shaped back);
        other input is refused with a message that names its shape, before any
        subclass's `forward` sees it. (It runs inside every un-graphed timed call: a shape
        check and one frame, 0.1-0.5 us on a 2026 x86 host.)"""
        shape = x.shape
        if len(shape) == 2 and shape[1] == self.hidden:
            return _MODULE_CALL(self, x, *args, **kwargs)
        if len(shape) < 2 or shape[-1] != self.hidden:
            raise ValueError(
                f"{type(self).__name__} takes tokens x hidden input (hidden = {self.hidden}),"
                f" or any leading dimensions x {self.hidden}; got shape {tuple(shape)}"
            )
        y = _MODULE_CALL(self, x.reshape(-1, self.hidden), *args, **kwargs)
        return y.reshape(*shape[:-1], y.shape[-1])

    def routed(
        self, x_TD: torch.Tensor, gate_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        side = self._shared_stream(x_TD)
        if side is not None:
            main = torch.cuda.current_stream(x_TD.device)
            # Every fork waits on the main stream, so the side stream's tensors of the last
            # call (their blocks return to its pool) are not reused before main has read them.
            side.wait_stream(main)
            with torch.cuda.stream(side), self.timer.phase("shared"):
                shared_TD = self.shared_output(x_TD)
        with self.timer.phase("router"):
            gate_weights_TK, expert_ids_TK, probs_TE = self.router(x_TD)
        self._last = (expert_ids_TK, probs_TE)
        y_TD = self.routed(x_TD, gate_weights_TK, expert_ids_TK)
        if side is None:
            return self.add_shared(x_TD, y_TD)
        main.wait_stream(side)
        return y_TD + shared_TD

    def overlaps_shared(self, x_TD: torch.Tensor) -> bool:
        """Whether this call's shared experts may run on a side stream beside the Router
        and the routed experts (a subclass's choice; CUDA inference only, and never in
        the phase breakdown, whose phases are timed one after another)."""
        return False

    def _shared_stream(self, x_TD: torch.Tensor) -> torch.cuda.Stream | None:
        """The side stream of this call's shared experts, or None to run them after the
        routed experts on the caller's stream."""
        if (
            self.shared is None
            or not x_TD.is_cuda
            or torch.is_grad_enabled()
            or isinstance(self.timer, PhaseTimer)
            or not self.overlaps_shared(x_TD)
        ):
            return None
        stream = self._side_streams.get(x_TD.device)
        if stream is None:
            stream = self._side_streams[x_TD.device] = torch.cuda.Stream(x_TD.device)
        return stream

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
        """Routing and load of the last forward (syncs the device; call outside timed
        regions)."""
        if self._last is None:
            return None
        expert_ids_TK, probs_TE = self._last
        return routing_stats(
            expert_ids_TK,
            expert_ids_TK.shape[0],
            self.num_experts,
            probs_TE,
            aux_loss=float(switch_aux_loss(probs_TE, expert_ids_TK, self.num_experts)),
            kept_A=None if self._last_dropped_TK is None else ~self._last_dropped_TK,
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
        # With record set, forward keeps each layer's input and output (recorded): the
        # check compares each layer with its reference on the input it got.
        self.record = False
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        details = {getattr(layer, "impl_detail", None) for layer in layers}
        self.impl_detail = details.pop() if len(details) == 1 else "mixed"

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        carry = None
        recorded: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if self.record else None
        for layer in self.layers:
            if hasattr(layer, "forward_with_carry"):
                y_TD, carry = layer.forward_with_carry(x_TD, carry)
            else:
                y_TD = layer(x_TD)
            if recorded is not None:
                recorded.append((x_TD.detach(), y_TD.detach()))
            x_TD = x_TD + y_TD
        if recorded is not None:
            self.recorded = recorded
        return x_TD

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
