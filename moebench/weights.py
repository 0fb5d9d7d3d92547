"""One weight set per (shape, seed, routing, dtype, device), shared by every implementation.

Shape legend: D hidden, F expert ffn width, E routed experts, S shared-expert width
(shared_experts x F; several shared experts are one FFN of the summed width).

Weights are drawn from N(0, 0.02^2) by a seeded generator on the target device, so two
implementations of one case compute the same function on the same numbers. Inputs are
N(0, 1): never zeros (docs/design.md, "Measuring honestly").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.case import Case, LayerShape
from moebench.routing import routing_bias

WEIGHT_STD = 0.02


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name` ("bfloat16", ...)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclass
class ExpertWeights:
    """The layer's function. Router weights are float32; expert weights in the case dtype."""

    shape: LayerShape
    w_router_DE: torch.Tensor
    router_bias_E: torch.Tensor
    w_gate_EDF: torch.Tensor
    w_up_EDF: torch.Tensor
    w_down_EFD: torch.Tensor
    w_shared_gate_DS: torch.Tensor | None = None
    w_shared_up_DS: torch.Tensor | None = None
    w_shared_down_SD: torch.Tensor | None = None
    # Index of this set's layer in a stack: designs that draw parameters of their own
    # (hierarchical's primary router) draw them per layer.
    layer: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.w_gate_EDF.dtype

    @property
    def device(self) -> torch.device:
        return self.w_gate_EDF.device

    def nbytes(self) -> int:
        tensors = [
            self.w_router_DE,
            self.router_bias_E,
            self.w_gate_EDF,
            self.w_up_EDF,
            self.w_down_EFD,
            self.w_shared_gate_DS,
            self.w_shared_up_DS,
            self.w_shared_down_SD,
        ]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def weights_key(case: Case) -> tuple:
    """Cases with equal keys share one weight set. The tensors depend on the widths, the
    expert counts, seed, routing, dtype, device and source; not on top_k or the capacity
    factor, which only the layer reads (through `ExpertWeights.shape`), so a sweep over
    those draws the weights once."""
    s = case.shape
    return (
        s.hidden, s.ffn, s.num_experts, s.shared_experts, s.activation,
        case.seed, case.routing, case.dtype, case.device, case.weights,
    )  # fmt: skip


# Seeds of successive layers of a stack are this far apart.
LAYER_SEED_STRIDE = 1_000_033


def make_weights(case: Case, layer: int = 0) -> ExpertWeights:
    """Draw the weight set of layer `layer` of `case` (deterministic in shape, seed,
    routing, device and layer index). The routing bias is the same for every layer.
    `case.weights` other than "random" names another source (moebench.weight_sources)."""
    if case.weights != "random":
        from moebench.weight_sources import load_weights

        loaded = load_weights(case, layer)
        loaded.layer = layer
        return loaded
    shape = case.shape
    device = torch.device(case.device)
    dtype = torch_dtype(case.dtype)
    generator = torch.Generator(device=device).manual_seed(case.seed + LAYER_SEED_STRIDE * layer)

    def normal(*size: int, out_dtype: torch.dtype = dtype) -> torch.Tensor:
        t = torch.randn(*size, generator=generator, device=device, dtype=torch.float32)
        return t.mul_(WEIGHT_STD).to(out_dtype)

    D, F, E = shape.hidden, shape.ffn, shape.num_experts
    weights = ExpertWeights(
        shape=shape,
        w_router_DE=normal(D, E, out_dtype=torch.float32),
        router_bias_E=routing_bias(case.routing, E, case.seed).to(device),
        w_gate_EDF=normal(E, D, F),
        w_up_EDF=normal(E, D, F),
        w_down_EFD=normal(E, F, D),
        layer=layer,
    )
    if shape.shared_experts:
        S = shape.shared_experts * F
        weights.w_shared_gate_DS = normal(D, S)
        weights.w_shared_up_DS = normal(D, S)
        weights.w_shared_down_SD = normal(S, D)
    return weights


def make_inputs(case: Case, count: int) -> list[torch.Tensor]:
    """`count` distinct N(0, 1) input batches x_TD, so repeats rotate through them."""
    device = torch.device(case.device)
    generator = torch.Generator(device=device).manual_seed(case.seed + 1_000_003)
    shape = (case.tokens, case.shape.hidden)
    return [
        torch.randn(*shape, generator=generator, device=device).to(torch_dtype(case.dtype))
        for _ in range(count)
    ]
