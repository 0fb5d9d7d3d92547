"""Analytic counts: parameters (total, active per token, touched), FLOPs, minimum bytes.

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

from moebench.case import Case
from moebench.layer import LayerStats


@dataclass(frozen=True)
class ParamCounts:
    """total: held by the layer. active: used per token. touched: used by this batch."""

    total: int
    active: int
    touched: int
    router: int

    def __add__(self, other: ParamCounts) -> ParamCounts:
        """Counts of two layers together (a stack)."""
        return ParamCounts(
            self.total + other.total,
            self.active + other.active,
            self.touched + other.touched,
            self.router + other.router,
        )


def param_counts(case: Case, layer: torch.nn.Module, stats: LayerStats | None) -> ParamCounts:
    """Parameter counts; a layer with its own structure reports (total, active) through a
    `param_counts()` method, and then every parameter counts as touched."""
    own = getattr(layer, "param_counts", None)
    if callable(own):
        total, active = own()
        return ParamCounts(total=total, active=active, touched=total, router=0)
    shape = case.shape
    expert = shape.expert_params
    shared = shape.shared_experts * expert
    router = shape.router_params
    experts_used = stats.experts_used if stats is not None else shape.num_experts
    return ParamCounts(
        total=shape.num_experts * expert + shared + router,
        active=shape.top_k * expert + shared + router,
        touched=experts_used * expert + shared + router,
        router=router,
    )


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
