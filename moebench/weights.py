"""One weight set per (shape, seed, routing, dtype, device), shared by every implementation:
the `ExpertWeights` type and the "random" source (other sources: moebench.weight_sources,
whose `make_weights` is the entry point for any case).

Shape legend: D hidden, F expert ffn width, E routed experts, S shared-expert width
(shared_experts x F; several shared experts are one FFN of the summed width).

Weights are drawn from N(0, 0.02^2) by a seeded generator on the target device, so two
implementations of one case compute the same function on the same numbers; the router's
from N(0, router_scale^2) (the case field, default 0.02): a larger scale gives sharper,
lower-entropy routing, closer to a trained router's. Inputs are N(0, 1): never zeros
(docs/design.md, "Measuring honestly"). A router convention that reads weights of its own
gets them too: a zero correction bias (an untrained DeepSeek-V3 router has none) and a
shared-expert gate vector drawn like the rest, after it, so the other tensors are those
of the same shape without it.
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
    # Router-convention weights (LayerShape.correction_bias, .shared_expert_gate), float32:
    correction_bias_E: torch.Tensor | None = None  # selection-only bias (DeepSeek-V3)
    w_shared_expert_gate_D: torch.Tensor | None = None  # shared output x sigmoid(x . w)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the set (those present), router first."""
        found = [
            self.w_router_DE,
            self.router_bias_E,
            self.correction_bias_E,
            self.w_gate_EDF,
            self.w_up_EDF,
            self.w_down_EFD,
            self.w_shared_gate_DS,
            self.w_shared_up_DS,
            self.w_shared_down_SD,
            self.w_shared_expert_gate_D,
        ]
        return [t for t in found if t is not None]

    @property
    def dtype(self) -> torch.dtype:
        return self.w_gate_EDF.dtype

    @property
    def device(self) -> torch.device:
        return self.w_gate_EDF.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def has_shared_expert_gate(shape: LayerShape) -> bool:
    """True if the layer scales its shared experts by a sigmoid gate (and has some)."""
    return shape.shared_expert_gate == "sigmoid" and shape.shared_experts > 0


def weights_key(case: Case) -> tuple:
    """Cases with equal keys share one weight set. The tensors depend on the widths, the
    expert counts, seed, routing, dtype, device, source and router scale; not on top_k or
    the capacity factor, which only the layer reads (through `ExpertWeights.shape`), so a
    sweep over those draws the weights once; nor on the router convention, except whether
    it has weights of its own (a correction bias, a shared-expert gate)."""
    s = case.shape
    return (
        s.hidden, s.ffn, s.num_experts, s.shared_experts, s.activation,
        case.seed, case.routing, case.dtype, case.device, case.weights, case.router_scale,
        s.correction_bias, has_shared_expert_gate(s),
    )  # fmt: skip


# Seeds of successive layers of a stack are this far apart.
LAYER_SEED_STRIDE = 1_000_033


def random_weights(case: Case, layer: int = 0) -> ExpertWeights:
    """Draw the weight set of layer `layer` of `case` (deterministic in shape, seed,
    routing, device and layer index), whatever `case.weights` says: the "random" source.
    The routing bias is the same for every layer."""
    shape = case.shape
    device = torch.device(case.device)
    dtype = torch_dtype(case.dtype)
    generator = torch.Generator(device=device).manual_seed(case.seed + LAYER_SEED_STRIDE * layer)

    def normal(*size: int, out_dtype: torch.dtype = dtype, std: float = WEIGHT_STD) -> torch.Tensor:
        t = torch.randn(*size, generator=generator, device=device, dtype=torch.float32)
        return t.mul_(std).to(out_dtype)

    D, F, E = shape.hidden, shape.ffn, shape.num_experts
    weights = ExpertWeights(
        shape=shape,
        w_router_DE=normal(D, E, out_dtype=torch.float32, std=case.router_scale),
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
    if shape.correction_bias:
        weights.correction_bias_E = torch.zeros(E, device=device)
    if has_shared_expert_gate(shape):
        weights.w_shared_expert_gate_D = normal(D, out_dtype=torch.float32)
    return weights


# Seed offsets of the input batches: those the timed calls rotate through, and the one no
# timed call sees, checked after timing (`case_run`).
TIMED_INPUTS_SEED_OFFSET = 1_000_003
UNSEEN_INPUT_SEED_OFFSET = 5_000_011


def make_inputs(case: Case, count: int, unseen: bool = False) -> list[torch.Tensor]:
    """`count` distinct N(0, 1) input batches x_TD, so repeats rotate through them; with
    `unseen`, batches of another seed, which no timed call is given."""
    device = torch.device(case.device)
    offset = UNSEEN_INPUT_SEED_OFFSET if unseen else TIMED_INPUTS_SEED_OFFSET
    generator = torch.Generator(device=device).manual_seed(case.seed + offset)
    shape = (case.tokens, case.shape.hidden)
    return [
        torch.randn(*shape, generator=generator, device=device).to(torch_dtype(case.dtype))
        for _ in range(count)
    ]
