"""Pieces the design variants share (`topp`, `moepp`, `dsmoe`, `deepseek`, `merging`):
the base router's full distribution, load statistics of a forward given as flat
(token, expert) assignments, and plain float32 references over experts and over stacks.

Shape legend: T tokens, D hidden, E routed experts, A (token, expert) assignments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from moebench.case import Case
from moebench.layer import LayerStats, routing_stats, swiglu
from moebench.registry import Unsupported
from moebench.routing import Router, describe_router, router_departures, switch_aux_loss
from moebench.weights import ExpertWeights


def require_base_router(case: Case, routes_by: str) -> None:
    """Refuse (`Unsupported`: a `skipped` row) a case whose router convention is not the
    base router (softmax, top-k renormalised, no groups, no correction, no scaling, shared
    experts ungated): a design that routes by its own rule over the softmax probabilities
    (`routes_by`, a few words) cannot compute the layer it names."""
    departures = router_departures(case.shape)
    if departures:
        label = f"preset {case.preset!r}" if case.preset else "this case"
        raise Unsupported(
            f"{case.impl} routes by {routes_by} over softmax probabilities and adds the "
            f"shared experts ungated; it cannot compute the router of {label} "
            f"({describe_router(case.shape)}: {', '.join(departures)})"
        )


def router_probs(router: Router, x_TD: torch.Tensor) -> torch.Tensor:
    """The base router's full softmax distribution (float32, T x E), no top-k."""
    return torch.softmax(x_TD.float() @ router.w_router_DE + router.bias_E, dim=-1)


def assignment_stats(
    expert_A: torch.Tensor, probs_TE: torch.Tensor, num_experts: int
) -> LayerStats:
    """Load of a forward given as flat distinct (token, expert) assignments (none
    dropped); aux loss as the Switch loss with f_e the fraction of assignments sent to
    expert e."""
    aux = (
        float(switch_aux_loss(probs_TE, expert_A.view(-1, 1), num_experts))
        if expert_A.numel()
        else float("nan")
    )
    return routing_stats(expert_A, probs_TE.shape[0], num_experts, probs_TE, aux_loss=aux)


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
        out = expert_output32(weights, expert, x32_TD[token_idx])
        y_TD.index_add_(0, token_idx, out * gate_TE[token_idx, expert, None])
    return add_shared32(weights, x32_TD, y_TD)


def expert_output32(weights: ExpertWeights, expert: int, x32_ND: torch.Tensor) -> torch.Tensor:
    """Routed expert `expert` of `weights` on float32 tokens, in float32."""
    return swiglu(
        x32_ND,
        weights.w_gate_EDF[expert].float(),
        weights.w_up_EDF[expert].float(),
        weights.w_down_EFD[expert].float(),
    )


def add_shared32(weights: ExpertWeights, x32_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
    """y plus the shared experts' float32 output (y unchanged without shared experts),
    scaled per token by sigmoid(x . w) where the weight set has a shared-expert gate."""
    if weights.w_shared_gate_DS is None:
        return y_TD
    shared_TD = swiglu(
        x32_TD,
        weights.w_shared_gate_DS.float(),
        weights.w_shared_up_DS.float(),
        weights.w_shared_down_SD.float(),
    )
    if weights.w_shared_expert_gate_D is not None:
        shared_TD = (
            shared_TD * torch.sigmoid(x32_TD @ weights.w_shared_expert_gate_D.float())[:, None]
        )
    return y_TD + shared_TD


ReferenceLayer = Callable[[ExpertWeights, torch.Tensor, Any], tuple[torch.Tensor, Any]]


# The inputs each layer of a stack got in the checked call, and the list the reference
# layers' outputs go to (see `stack_inputs`).
_STACK_INPUTS: ContextVar[tuple[list[torch.Tensor], list[torch.Tensor]] | None] = ContextVar(
    "stack_inputs", default=None
)


@contextmanager
def stack_inputs(inputs: list[torch.Tensor] | None) -> Iterator[list[torch.Tensor]]:
    """Inside, `reference_stack` computes a stack layer by layer on `inputs` (the input
    each layer of the implementation's stack got, `Stack.recorded`) instead of chaining
    its own outputs, and appends each reference layer's float32 output to the yielded
    list. The check sets it, so that design references keep their (weights_list, x_TD,
    case) signature. `inputs` None: nothing changes."""
    outputs: list[torch.Tensor] = []
    token = _STACK_INPUTS.set(None if inputs is None else (inputs, outputs))
    try:
        yield outputs
    finally:
        _STACK_INPUTS.reset(token)


@torch.no_grad()
def reference_stack(
    weights_list: list[ExpertWeights], x_TD: torch.Tensor, layer: ReferenceLayer
) -> torch.Tensor:
    """A design reference over a stack, float32: `layer(weights, x32_TD, carry) ->
    (y32_TD, carry)` (carry None for the first layer). One layer: its output; several:
    x <- x + layer(x) with each layer's input rounded to x's dtype, as the layers under
    test see it (like `reference_stack_output`). Inside `stack_inputs(inputs)`: layer by
    layer, x_0 + sum_j layer_j(inputs[j]), the carry passed on from the reference's own
    layers."""
    recorded = _STACK_INPUTS.get()
    if recorded is not None and len(weights_list) > 1:
        inputs, outputs = recorded
        assert len(inputs) == len(weights_list), "one recorded input per layer"
        out32_TD, carry = inputs[0].float(), None
        for weights, x_j in zip(weights_list, inputs):
            y32_TD, carry = layer(weights, x_j.float(), carry)
            outputs.append(y32_TD)
            out32_TD = out32_TD + y32_TD
        return out32_TD
    x32_TD = x_TD.float()
    carry: Any = None
    for weights in weights_list:
        y32_TD, carry = layer(weights, x32_TD.to(x_TD.dtype).float(), carry)
        if len(weights_list) == 1:
            return y32_TD
        x32_TD = x32_TD + y32_TD
    return x32_TD
