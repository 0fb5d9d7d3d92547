"""The router, its conventions, and routing distributions.

Shape legend: T tokens, D hidden, E routed experts, K experts per token (top_k),
G expert groups, P experts per group (E / G).

The router convention is part of the layer (`LayerShape`: scoring, norm_topk_prob,
n_groups, topk_groups, correction_bias, routed_scaling; presets carry their model's).
`route` computes it, in float32, for the `Router` every exact layer uses and for the
reference alike. The default is moebench's base router: softmax over the logits, top-k,
the k probabilities renormalised to sum 1.

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

import functools
import importlib
import importlib.util
import math
import warnings
from dataclasses import fields
from types import ModuleType

import torch
from torch import nn

from moebench.case import LayerShape
from moebench.router_logits import (
    PIECES,
    SplitLogits,
    WeightPieces,
    sum_pieces,
    tensor_core_path,
    weight_pieces,
)


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


# The router-convention fields of LayerShape and their defaults (the base router).
ROUTER_FIELDS: dict[str, object] = {
    f.name: f.default
    for f in fields(LayerShape)
    if f.name
    in (
        "scoring",
        "norm_topk_prob",
        "n_groups",
        "topk_groups",
        "correction_bias",
        "routed_scaling",
        "shared_expert_gate",
    )
}


def router_departures(shape: LayerShape) -> list[str]:
    """`field=value` for each router-convention field of `shape` off the base router."""
    return [
        f"{name}={getattr(shape, name)!r}"
        for name, default in ROUTER_FIELDS.items()
        if getattr(shape, name) != default
    ]


def describe_router(shape: LayerShape) -> str:
    """The router convention in a few words (for `moebench list` and messages)."""
    parts = [f"{shape.scoring} top-{shape.top_k}"]
    if shape.n_groups > 1:
        parts.append(f"from the best {shape.groups_kept} of {shape.n_groups} groups")
    if shape.correction_bias:
        parts.append("selection + correction bias")
    parts.append("renormalised" if shape.norm_topk_prob else "raw gates")
    if shape.routed_scaling != 1.0:
        parts.append(f"x{shape.routed_scaling:g}")
    if shape.shared_experts:
        gated = shape.shared_expert_gate == "sigmoid"
        parts.append("sigmoid-gated shared expert" if gated else "shared expert added")
    return ", ".join(parts)


def route(
    logits_TE: torch.Tensor, shape: LayerShape, correction_bias_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_TK float32, expert_ids_TK int64, probs_TE float32) from float32 logits
    under `shape`'s router convention (LayerShape's docstring), as transformers computes
    it (MixtralTopKRouter, Qwen2/3MoeTopKRouter, OlmoeTopKRouter, DeepseekV3TopkRouter).

    correction_bias_E steers the selection only, when shape.correction_bias. probs_TE is
    the score distribution normalised per token (the softmax itself, or the sigmoid
    scores over their sum), for the load-balancing statistics."""
    if shape.scoring == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
    else:
        scores_TE = torch.softmax(logits_TE, dim=-1)
    choice_TE = scores_TE
    if shape.correction_bias and correction_bias_E is not None:
        choice_TE = scores_TE + correction_bias_E
    if shape.n_groups > 1 and shape.groups_kept < shape.n_groups:
        T, E = choice_TE.shape
        per_group = E // shape.n_groups
        choice_TGP = choice_TE.view(T, shape.n_groups, per_group)
        group_score_TG = choice_TGP.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        kept_TJ = group_score_TG.topk(shape.groups_kept, dim=-1).indices
        kept_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter(1, kept_TJ, True)
        choice_TE = choice_TGP.masked_fill(~kept_TG[..., None], float("-inf")).view(T, E)
    expert_ids_TK = choice_TE.topk(shape.top_k, dim=-1).indices
    gate_TK = scores_TE.gather(1, expert_ids_TK)
    if shape.norm_topk_prob:
        # sigmoid scores need not sum to anything: DeepSeek-V3's guard against 0 / 0
        guard = 1e-20 if shape.scoring == "sigmoid" else 0.0
        gate_TK = gate_TK / (gate_TK.sum(dim=-1, keepdim=True) + guard)
    if shape.routed_scaling != 1.0:
        gate_TK = gate_TK * shape.routed_scaling
    if shape.scoring == "sigmoid":
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    else:
        probs_TE = scores_TE
    return gate_TK, expert_ids_TK, probs_TE


# Experts per row that `route_kernel` holds in registers.
KERNEL_ROUTE_MAX_EXPERTS = 1024


def kernel_route_applies(shape: LayerShape, x_TD: torch.Tensor) -> bool:
    """Whether `route_kernel.route_top_k` computes `shape`'s convention here: at most
    KERNEL_ROUTE_MAX_EXPERTS experts, a power-of-two count of at least 16 if selection is
    group-limited (the kernel splits its row of at least 16 lanes into equal groups), on
    CUDA with Triton importable."""
    E = shape.num_experts
    group_limited = shape.n_groups > 1 and shape.groups_kept < shape.n_groups
    return (
        x_TD.device.type == "cuda"
        and E <= KERNEL_ROUTE_MAX_EXPERTS
        and (not group_limited or (E >= 16 and E & (E - 1) == 0))
        and route_kernels() is not None
    )


@functools.cache
def route_kernels() -> ModuleType | None:
    """`moebench.route_kernel` (the top-k), or None where Triton is missing or does not
    import (then the Router keeps its torch path, which computes the same function, and
    says so once)."""
    return _triton_module("route_kernel")


@functools.cache
def logits_kernels() -> ModuleType | None:
    """`moebench.logits_kernel` (the logits' parts), or None as `route_kernels`."""
    return _triton_module("logits_kernel")


def _triton_module(name: str) -> ModuleType | None:
    """moebench's module `name`, which imports Triton, or None with a warning where
    Triton is missing or its import fails."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.import_module(f"moebench.{name}")
    except Exception as error:  # a broken Triton install: any error its import raises
        warnings.warn(
            f"moebench's router kernels are off, Triton did not import ({error}); "
            "the Router runs its torch path",
            stacklevel=3,
        )
        return None


class Router(nn.Module):
    """The layer's router in float32 (so routing does not flip with the dtype), under the
    convention of `shape` (`route`). correction_bias_E: the weight set's selection bias
    (a buffer of that name, zeros if the convention has one and the weights none).
    bfloat16 inputs on CUDA get their float32 logits from bfloat16 tensor cores
    (`moebench.router_logits`), and on CUDA their choices and gates come from one Triton
    kernel (`moebench.route_kernel`): the same function, faster.

    It holds copies of the weight set's router tensors (small: D x E), so a study that
    edits one layer's router in place (forcing routes through `bias_E`, say) leaves the
    shared weights, every other implementation and the reference as they were."""

    def __init__(
        self,
        w_router_DE: torch.Tensor,
        bias_E: torch.Tensor,
        shape: LayerShape,
        correction_bias_E: torch.Tensor | None = None,
    ):
        super().__init__()
        self.w_router_DE = nn.Parameter(float32_copy(w_router_DE), requires_grad=True)
        self.register_buffer("bias_E", float32_copy(bias_E))
        if shape.correction_bias and correction_bias_E is None:
            correction_bias_E = torch.zeros_like(self.bias_E)
        self.register_buffer(
            "correction_bias_E",
            None if correction_bias_E is None else float32_copy(correction_bias_E),
        )
        self.shape = shape
        self.top_k = shape.top_k
        # The weight's bfloat16 pieces for the tensor-core path, and the (storage,
        # version) they were made from: an in-place edit of the weight remakes them.
        self._pieces: tuple[tuple[int, int], WeightPieces] | None = None

    def _pieces_of_weight(self) -> WeightPieces:
        w_DE = self.w_router_DE
        if w_DE.is_inference():  # (built under inference_mode) no version to see an edit by
            return weight_pieces(w_DE)
        made_from = (w_DE.data_ptr(), w_DE._version)
        if self._pieces is None or self._pieces[0] != made_from:
            self._pieces = (made_from, weight_pieces(w_DE))
        return self._pieces[1]

    def logit_parts(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(parts_TSE, S): the logits less the bias as S float32 column blocks of E
        whose sum they are: a few tokens on CUDA get `logits_kernel.few_token_logits`
        (`takes_few_token_logits`; with its one-launch backward in a training step),
        bfloat16 on CUDA the tensor cores' three (`router_logits`; at inference, where
        `takes_piece_logits`, in `piece_logits`' one launch), anything else one float32
        GEMM."""
        w_DE = self.w_router_DE
        kernels = logits_kernels() if x_TD.device.type == "cuda" else None
        if kernels and kernels.takes_few_token_logits(*x_TD.shape):
            return kernels.few_token_logits(x_TD, w_DE)
        records_grad = torch.is_grad_enabled() and (x_TD.requires_grad or w_DE.requires_grad)
        if kernels and not records_grad and kernels.takes_piece_logits(x_TD, w_DE.shape[1]):
            return kernels.piece_logits(x_TD, self._pieces_of_weight().side_by_side_D3E)
        if tensor_core_path(x_TD):
            return SplitLogits.apply(x_TD, w_DE, self._pieces_of_weight()), PIECES
        return x_TD.float() @ w_DE, 1

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """x @ w_router_DE + bias_E, T x E float32."""
        parts_TSE, parts = self.logit_parts(x_TD)
        return sum_pieces(parts_TSE, parts) + self.bias_E

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (gate_weights_TK in x's dtype, expert_ids_TK int64, probs_TE float32)."""
        if kernel_route_applies(self.shape, x_TD):
            parts_TSE, parts = self.logit_parts(x_TD)
            return route_kernels().route_top_k(
                parts_TSE, parts, self.bias_E, self.shape, x_TD.dtype, self.correction_bias_E
            )
        logits_TE = self.logits(x_TD)
        gate_TK, expert_ids_TK, probs_TE = route(logits_TE, self.shape, self.correction_bias_E)
        return gate_TK.to(x_TD.dtype), expert_ids_TK, probs_TE


def switch_aux_loss(
    probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Switch Transformer load-balancing loss: E * sum_e f_e * P_e, with f_e the fraction
    of (token, slot) assignments sent to expert e and P_e its mean router probability.
    Equals 1.0 for perfectly balanced routing."""
    counts_E = torch.bincount(expert_ids_TK.flatten(), minlength=num_experts)
    fraction_E = counts_E.float() / expert_ids_TK.numel()
    return num_experts * (fraction_E * probs_TE.float().mean(dim=0)).sum()
