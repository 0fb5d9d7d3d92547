"""`grouped`: dropless MoE on grouped GEMMs (MegaBlocks / torchtitan style).

(token, slot) assignments are sorted by expert so each expert's tokens are contiguous;
one grouped matrix product per weight (`torch.nn.functional.grouped_mm`, or the older
`torch._grouped_mm`) computes every expert at once; a scatter-add un-permutes. Where the
torch build or the dtype has no grouped GEMM, a per-expert loop over the same sorted
buffer stands in (reported in `impl_detail`).

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k, A = T x K.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from moebench.case import Case
from moebench.layer import MoELayer, expert_parameters
from moebench.registry import register
from moebench.weights import ExpertWeights

GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_works(device: torch.device, dtype: torch.dtype, backward: bool) -> bool:
    """Probe: the op exists and runs here (and its backward, if `backward`). Some builds
    lack a kernel for a dtype or device, or its backward."""
    if GROUPED_MM is None:
        return False
    try:
        a = torch.randn(32, 16, device=device, dtype=dtype, requires_grad=backward)
        b = torch.randn(2, 16, 16, device=device, dtype=dtype, requires_grad=backward)
        offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
        out = GROUPED_MM(a, b, offs=offs)
        if backward:  # a dense gradient: sum()'s expanded one has strides the op rejects
            out.backward(torch.randn_like(out))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class GroupedMoE(MoELayer):
    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD = expert_parameters(weights)
        self.use_grouped_mm = grouped_mm_works(
            weights.device, weights.dtype, backward=case.workload.mode == "train"
        )
        self.impl_detail = "grouped_mm" if self.use_grouped_mm else "per-expert fallback"

    def _experts(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if self.use_grouped_mm:
            offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
            gate_AF = GROUPED_MM(x_AD, self.w_gate_EDF, offs=offsets_E)
            up_AF = GROUPED_MM(x_AD, self.w_up_EDF, offs=offsets_E)
            return GROUPED_MM(F.silu(gate_AF) * up_AF, self.w_down_EFD, offs=offsets_E)
        outputs = []
        for expert, x_ND in enumerate(torch.split(x_AD, counts_E.tolist())):
            h_NF = F.silu(x_ND @ self.w_gate_EDF[expert]) * (x_ND @ self.w_up_EDF[expert])
            outputs.append(h_NF @ self.w_down_EFD[expert])
        return torch.cat(outputs)

    def routed_assignments(
        self,
        x_TD: torch.Tensor,
        token_A: torch.Tensor,
        expert_A: torch.Tensor,
        weight_A: torch.Tensor,
    ) -> torch.Tensor:
        """sum over assignments a of weight_A[a] * expert_A[a](x_TD[token_A[a]]), as T x D
        in x's dtype: assignments sorted by expert, one grouped GEMM per weight matrix."""
        if token_A.numel() == 0:
            return torch.zeros_like(x_TD)
        timer = self.timer
        with timer.phase("permute"):
            order_A = torch.argsort(expert_A, stable=True)
            token_A = token_A[order_A]
            # one count per expert the layer holds (merging holds fewer than it routes to)
            counts_E = torch.bincount(expert_A, minlength=self.w_gate_EDF.shape[0])
            x_AD = x_TD[token_A]
        with timer.phase("expert"):
            out_AD = self._experts(x_AD, counts_E)
        with timer.phase("unpermute"):
            out_AD = out_AD * weight_A[order_A, None].to(x_TD.dtype)
            return torch.zeros_like(x_TD).index_add(0, token_A, out_AD)

    def active_param_counts(self, experts_per_token: float) -> tuple[int, int]:
        """(total, active per token) for a layer whose tokens use `experts_per_token`
        routed experts on average; every non-expert parameter (router, shared experts,
        a design's own small parameters) counts as active."""
        total = sum(p.numel() for p in self.parameters())
        expert = self.w_gate_EDF[0].numel() * 3
        other = total - self.num_experts * expert
        return total, round(experts_per_token * expert + other)

    def routed(
        self, x_TD: torch.Tensor, gate_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        """The top-k slots as assignments (token t's K slots are assignments tK..tK+K-1)
        through the one assignment path."""
        T, K = expert_ids_TK.shape
        token_A = torch.arange(T * K, device=x_TD.device) // K
        return self.routed_assignments(
            x_TD, token_A, expert_ids_TK.flatten(), gate_weights_TK.flatten()
        )


@register(
    "grouped",
    family="dropless",
    description="dropless: tokens sorted by expert, one grouped GEMM per weight",
)
def build(weights: ExpertWeights, case: Case) -> nn.Module:
    return GroupedMoE(weights, case)
