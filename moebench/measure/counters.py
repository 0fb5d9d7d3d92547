"""Counts: parameters (total, active per token, touched), FLOPs, minimum bytes.

One path for every implementation (`param_counts`). A layer's parameters are three parts:

- routed experts, from the routing that ran (the layer's `stats()`, a `LayerStats`):
  held = one per entry of `tokens_per_expert` (a merged layer's groups, MoE++'s FFN
  experts), active per token = `experts_per_token` (distinct experts the router chose,
  before drops), touched = the experts that computed at least one (kept) token;
- shared experts, from the shape: held, active and touched by every token;
- the rest: the base router (D x E, float32; every token uses all of it), or, for a design
  with parameters of its own, what its `own_param_counts()` returns (its router and
  its own parameters: MoE++'s constant experts, say), each counted as used only when the
  last forward used it. A layer without `stats()` that defines `own_param_counts()` routes
  nothing (the dense FFN): its own counts are the whole layer.

A layer with neither (a plugin module of its own) is counted analytically from the shape:
top_k experts active, every expert touched.

For SwiGLU experts every parameter a token uses costs 2 FLOPs (one multiply-add), so
forward FLOPs = 2 x tokens x active_params (router included); a training step (forward +
backward) costs 3x the forward. Minimum bytes is the least a forward must move through
memory: the touched parameters read once, the input read once and the output written once;
a training step also writes a gradient for each touched parameter and reads/writes the
gradients of input and output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.case import Case, LayerShape
from moebench.layer import LayerStats


@dataclass(frozen=True)
class ParamCounts:
    """total: held by the layer. active: used per token (mean). touched: used by this
    call. router: the router's share of touched (float32 weights, whatever the dtype)."""

    total: int
    active: int
    touched: int
    router: int

    def __add__(self, other: ParamCounts) -> ParamCounts:
        """Counts of two parts, or two layers of a stack, together."""
        return ParamCounts(
            self.total + other.total,
            self.active + other.active,
            self.touched + other.touched,
            self.router + other.router,
        )


NO_PARAMS = ParamCounts(0, 0, 0, 0)


def base_router_counts(shape: LayerShape) -> ParamCounts:
    """The base router: D x E weights, every one used by every token."""
    router = shape.router_params
    return ParamCounts(router, router, router, router)


def routed_expert_counts(shape: LayerShape, stats: LayerStats | None) -> ParamCounts:
    """Routed and shared experts, from the routing that ran (`stats`), or analytically
    (top_k active, every expert touched) when nothing is known of it."""
    expert = shape.expert_params
    shared = shape.shared_experts * expert
    if stats is None:
        held, per_token, used = shape.num_experts, float(shape.top_k), shape.num_experts
    else:
        held, per_token, used = (
            len(stats.tokens_per_expert),
            stats.experts_per_token,
            stats.experts_used,
        )
    return ParamCounts(
        total=held * expert + shared,
        active=round(per_token * expert) + shared,
        touched=used * expert + shared,
        router=0,
    )


def param_counts(case: Case, layer: torch.nn.Module, stats: LayerStats | None) -> ParamCounts:
    """Parameter counts of one layer after the call whose routing `stats` describes (the
    module docstring says how each part is counted)."""
    own = getattr(layer, "own_param_counts", None)
    if callable(own) and not hasattr(layer, "stats"):
        return own()
    rest = own() if callable(own) else base_router_counts(case.shape)
    return routed_expert_counts(case.shape, stats) + rest


def flops(case: Case, params: ParamCounts) -> int:
    """FLOPs of one timed call (forward, or forward + backward in train mode)."""
    forward = 2 * case.tokens * params.active
    return 3 * forward if case.workload.mode == "train" else forward


def min_bytes(case: Case, params: ParamCounts, dtype: torch.dtype) -> int:
    """Fewest bytes one timed call must move through device memory."""
    element = torch.empty((), dtype=dtype).element_size()
    weights = (params.touched - params.router) * element + params.router * 4
    # x in and y out of every layer of the stack
    activations = 2 * case.tokens * case.shape.hidden * element * case.workload.layers
    if case.workload.mode == "train":
        return 2 * weights + 2 * activations
    return weights + activations


def work_columns(
    case: Case,
    params: ParamCounts,
    dtype: torch.dtype,
    latency_s: float,
    ceilings: dict[str, float] | None = None,
) -> dict[str, float | int]:
    """The parameter, work and roofline columns of a row measured at `latency_s` a call.
    roofline_frac needs the run's measured ceilings (copy_gbps, matmul_tflops_<dtype>)."""
    work_flops = flops(case, params)
    work_bytes = min_bytes(case, params, dtype)
    columns: dict[str, float | int] = {
        "total_params": params.total,
        "active_params": params.active,
        "touched_params": params.touched,
        "router_params": params.router,
        "flops": work_flops,
        "min_bytes": work_bytes,
        "achieved_tflops": work_flops / latency_s / 1e12,
        "achieved_gbps": work_bytes / latency_s / 1e9,
    }
    matmul_key = f"matmul_tflops_{case.dtype}"
    if ceilings and matmul_key in ceilings and "copy_gbps" in ceilings:
        floor_s = max(
            work_flops / (ceilings[matmul_key] * 1e12),
            work_bytes / (ceilings["copy_gbps"] * 1e9),
        )
        columns["roofline_frac"] = floor_s / latency_s
    return columns
