"""The fused layer: moebench's Router, then alignment and two fused Triton GEMMs.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
A = T x K assignments, P padded sorted rows.

Forward (no device-to-host sync): align (align.py) -> gate_up kernel (gathered token
loads, SwiGLU epilogue) -> down kernel (routing weight in the epilogue, rows scattered to
their assignments) -> sum over the K slots of each token. Backward: the forward is
recomputed with torch's grouped GEMM (the `grouped` layer's code) and differentiated by
autograd; a fused backward is not written yet.
"""

from __future__ import annotations

import torch

from moebench.case import Case
from moebench.impls.grouped import GroupedMoE
from moebench.impls.triton import kernels, tuning
from moebench.impls.triton.align import align_to_blocks
from moebench.weights import ExpertWeights


def _key(kernel: str, x_TD: torch.Tensor, w_gate_EDF: torch.Tensor, top_k: int) -> str:
    E, D, F = w_gate_EDF.shape
    bucket = tuning.token_bucket(x_TD.shape[0])
    dtype = str(x_TD.dtype).removeprefix("torch.")
    return f"{kernel} D{D} F{F} E{E} K{top_k} {dtype} T{bucket}"


def fused_experts(
    x_TD: torch.Tensor,
    gate_weights_TK: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    w_down_EFD: torch.Tensor,
) -> torch.Tensor:
    """sum_k gate_weights_TK[t, k] * SwiGLU_{expert_ids_TK[t, k]}(x_TD[t]), as T x D."""
    T, D = x_TD.shape
    E, _, F = w_gate_EDF.shape
    K = expert_ids_TK.shape[1]
    if T == 0:
        return torch.zeros_like(x_TD)
    x_TD = x_TD.contiguous()
    block_m = tuning.block_m_for(T, K, E)
    alignment = align_to_blocks(expert_ids_TK, E, block_m)
    h_PF = torch.empty(alignment.max_rows, F, device=x_TD.device, dtype=x_TD.dtype)
    out_AD = torch.empty(T * K, D, device=x_TD.device, dtype=x_TD.dtype)
    gate_weight_A = gate_weights_TK.to(x_TD.dtype).contiguous().view(-1)

    def gate_up(config: dict) -> None:
        kernels.launch_gate_up(x_TD, w_gate_EDF, w_up_EDF, h_PF, alignment, K, config)

    def down(config: dict) -> None:
        kernels.launch_down(h_PF, w_down_EFD, gate_weight_A, out_AD, alignment, config)

    device = x_TD.device
    gate_up_config = tuning.TUNER.choose(
        device,
        _key("gate_up", x_TD, w_gate_EDF, K),
        lambda: tuning.candidates("gate_up", block_m),
        gate_up,
    )
    gate_up(gate_up_config)
    down_config = tuning.TUNER.choose(
        device,
        _key("down", x_TD, w_gate_EDF, K),
        lambda: tuning.candidates("down", block_m),
        down,
    )
    down(down_config)
    if K == 1:
        return out_AD
    return out_AD.view(T, K, D).sum(dim=1)


class _FusedExpertsFunction(torch.autograd.Function):
    """The fused forward; a backward through the grouped-GEMM layer's recomputation."""

    @staticmethod
    def forward(ctx, layer, x_TD, gate_weights_TK, expert_ids_TK, w_gate, w_up, w_down):
        ctx.layer = layer
        ctx.save_for_backward(x_TD, gate_weights_TK, expert_ids_TK)
        return fused_experts(x_TD, gate_weights_TK, expert_ids_TK, w_gate, w_up, w_down)

    @staticmethod
    def backward(ctx, grad_y_TD):
        x_TD, gate_weights_TK, expert_ids_TK = ctx.saved_tensors
        layer: TritonMoE = ctx.layer
        params = [layer.w_gate_EDF, layer.w_up_EDF, layer.w_down_EFD]
        with torch.enable_grad():
            x_TD = x_TD.detach().requires_grad_(ctx.needs_input_grad[1])
            gate_weights_TK = gate_weights_TK.detach().requires_grad_(ctx.needs_input_grad[2])
            y_TD = GroupedMoE.routed(layer, x_TD, gate_weights_TK, expert_ids_TK)
            wanted = [x_TD, gate_weights_TK, *params]
            needs = [ctx.needs_input_grad[i] for i in (1, 2, 4, 5, 6)]
            inputs = [t for t, need in zip(wanted, needs) if need]
            grads = iter(torch.autograd.grad(y_TD, inputs, grad_y_TD) if inputs else ())
        return (None, *[next(grads) if need else None for need in needs[:2]], None,
                *[next(grads) if need else None for need in needs[2:]])  # fmt: skip


class TritonMoE(GroupedMoE):
    """Dropless top-k MoE on fused Triton kernels (the `grouped` layer's parameters, its
    grouped GEMM serving the backward)."""

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        backward = "grouped_mm" if self.use_grouped_mm else "per-expert loop"
        self.impl_detail = f"triton fused fwd; {backward} bwd"

    def _experts(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The backward's recomputation: torch's grouped GEMM where its operands meet its
        16-byte stride rule (its weight gradient reads x_AD transposed, so the row count
        counts too), else the grouped layer's per-expert loop."""
        sizes = (x_AD.shape[0], x_AD.shape[1], self.w_gate_EDF.shape[2])
        aligned = all(n * x_AD.element_size() % 16 == 0 for n in sizes)
        grouped_mm = self.use_grouped_mm
        self.use_grouped_mm = grouped_mm and aligned
        try:
            return super()._experts(x_AD, counts_E)
        finally:
            self.use_grouped_mm = grouped_mm

    def routed(
        self, x_TD: torch.Tensor, gate_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        weights = (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD)
        wants_grad = torch.is_grad_enabled() and (
            x_TD.requires_grad
            or gate_weights_TK.requires_grad
            or any(w.requires_grad for w in weights)
        )
        if wants_grad:
            return _FusedExpertsFunction.apply(self, x_TD, gate_weights_TK, expert_ids_TK, *weights)
        return fused_experts(x_TD, gate_weights_TK, expert_ids_TK, *weights)
