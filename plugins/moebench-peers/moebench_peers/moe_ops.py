"""`moe-ops`: the moe-ops library's pure-Triton MoE operators as one moebench layer.

moe-ops (PyPI `moe-ops`, 0.1.0) ships differentiable Triton kernels for each step of a
dropless MoE layer; this adapter chains them the way its README does:

    gate_TK, ids_TK = fused_topk_softmax(logits_TE, K)    top-k of the logits, softmax
                                                          over those k = moebench's router
    x_AD, row_map, offsets = permute(x_TD, ids_TK, E=E)   counting sort by expert
    gate_up_A2F = grouped_gemm(x_AD, w_gate_up_E2FD, offsets, trans_b=True)
    y_AD = grouped_gemm(silu(gate) * up, w_down_EDF, offsets, trans_b=True)
    y_TD = unpermute(y_AD, row_map, gate_TK, T, K)        gather-add, weighted

Gate and up projections are one grouped GEMM on the experts' [gate; up] rows, in moe-ops'
(E, N, K) weight layout (converted from moebench's once, in `build`). The router logits
are float32 (x in float32 times moebench's float32 router, plus the case's routing bias,
so "zipf"/"hot" routing runs too) and the gates stay float32 into unpermute. Shared
experts, which moe-ops has no operator for, are one plain SwiGLU in torch.

Router conventions other than moebench's base (where moebench's LayerShape carries one:
OLMoE's raw top-k, DeepSeek-V3's sigmoid groups and correction bias, Qwen2-MoE's gated
shared expert) have no moe-ops kernel: their routing runs in torch (`route`, float32) and
the experts still on moe-ops; `impl_detail` says which router ran.

CUDA only (Triton), bfloat16 or float16 (moe-ops' supported dtypes); on Hopper its grouped
GEMM uses TMA. Without moe-ops (or Triton) the case is refused, naming what to install.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
A = T x K (token, expert) assignments, S shared-expert width.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from moebench import register
from moebench.case import Case
from moebench.weights import ExpertWeights
from moebench_peers.conventions import (
    MOEBENCH_BASE,
    SHARED_GATE_WEIGHT,
    Convention,
    case_convention,
    correction_bias,
    route,
)
from moebench_peers.recorder import RoutingRecorder
from moebench_peers.refusal import UnsupportedCaseError

INSTALL_HINT = "pip install 'moebench-peers[moe-ops]' (moe-ops and Triton, on a CUDA machine)"


def _moe_ops(impl: str) -> Any:
    """The moe_ops module, or a refusal naming what to install."""
    try:
        return importlib.import_module("moe_ops")
    except ImportError as exc:
        raise UnsupportedCaseError(
            impl, f"moe-ops is not importable ({exc}); {INSTALL_HINT}"
        ) from None


class MoeOpsLayer(RoutingRecorder, nn.Module):
    """Router, routed experts and shared experts on moe-ops' kernels."""

    def __init__(self, ops: Any, weights: ExpertWeights, convention: Convention = MOEBENCH_BASE):
        nn.Module.__init__(self)
        self.ops = ops
        shape = weights.shape
        self.num_experts, self.top_k = shape.num_experts, shape.top_k
        self.convention = convention
        self.scoring = convention.scoring
        self.w_router_DE = nn.Parameter(weights.w_router_DE.float().clone())
        self.register_buffer("router_bias_E", weights.router_bias_E.float().clone())
        self.register_buffer("correction_bias_E", correction_bias(weights).clone())
        self.w_gate_up_E2FD = nn.Parameter(
            torch.cat([weights.w_gate_EDF, weights.w_up_EDF], dim=2).transpose(1, 2).contiguous()
        )
        self.w_down_EDF = nn.Parameter(weights.w_down_EFD.transpose(1, 2).contiguous())
        self.shared: nn.ParameterList | None = None
        if weights.w_shared_gate_DS is not None:
            self.shared = nn.ParameterList(
                [weights.w_shared_gate_DS, weights.w_shared_up_DS, weights.w_shared_down_SD]
            )
        self.w_shared_expert_gate_D: nn.Parameter | None = None
        if convention.shared_gate:
            gate_D = getattr(weights, SHARED_GATE_WEIGHT)
            self.w_shared_expert_gate_D = nn.Parameter(gate_D.to(weights.dtype).clone())
        try:
            version = importlib.metadata.version("moe-ops")
        except importlib.metadata.PackageNotFoundError:  # imported from a source tree
            version = "(version unknown)"
        tma = "TMA grouped GEMM" if ops.supports_tma(weights.dtype) else "grouped GEMM"
        router = "fused top-k softmax" if convention == MOEBENCH_BASE else "torch router"
        self.impl_detail = f"moe-ops {version}: {router}, counting-sort permute, {tma}"

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        T = x_TD.shape[0]
        logits_TE = x_TD.float() @ self.w_router_DE + self.router_bias_E
        if self.convention == MOEBENCH_BASE:
            gate_TK, expert_ids_TK = self.ops.fused_topk_softmax(logits_TE, self.top_k)
        else:
            gate_TK, expert_ids_TK = route(
                logits_TE, self.convention, self.top_k, self.correction_bias_E
            )
            expert_ids_TK = expert_ids_TK.int()
        self.record(logits_TE, expert_ids_TK)
        x_AD, row_id_map_A, offsets = self.ops.permute(x_TD, expert_ids_TK, E=self.num_experts)
        gate_up_A2F = self.ops.grouped_gemm(x_AD, self.w_gate_up_E2FD, offsets, trans_b=True)
        gate_AF, up_AF = gate_up_A2F.chunk(2, dim=-1)
        h_AF = F.silu(gate_AF) * up_AF
        y_AD = self.ops.grouped_gemm(h_AF, self.w_down_EDF, offsets, trans_b=True)
        y_TD = self.ops.unpermute(y_AD, row_id_map_A, gate_TK, T, self.top_k)
        if self.shared is not None:
            w_gate_DS, w_up_DS, w_down_SD = self.shared
            shared_TD = (F.silu(x_TD @ w_gate_DS) * (x_TD @ w_up_DS)) @ w_down_SD
            if self.w_shared_expert_gate_D is not None:
                shared_TD = shared_TD * torch.sigmoid(x_TD @ self.w_shared_expert_gate_D)[:, None]
            y_TD = y_TD + shared_TD
        return y_TD


@register(
    "moe-ops",
    family="moe-ops",
    description="moe-ops (pure Triton): fused top-k softmax, counting-sort permute, "
    "grouped GEMM, gather-add unpermute",
    devices=("cuda",),
    dtypes=("bfloat16", "float16"),
)
def build(weights: ExpertWeights, case: Case) -> nn.Module:
    ops = _moe_ops(case.impl)
    E = weights.shape.num_experts
    if E & (E - 1):
        # Its permute histograms expert ids with tl.arange(0, E): a power of two only.
        raise UnsupportedCaseError(
            case.impl, f"moe-ops' permute needs a power-of-two expert count, got {E}"
        )
    convention = case_convention(weights.shape)
    if convention.shared_gate and getattr(weights, SHARED_GATE_WEIGHT, None) is None:
        raise UnsupportedCaseError(case.impl, f"the weight set has no {SHARED_GATE_WEIGHT}")
    return MoeOpsLayer(ops, weights, convention)
