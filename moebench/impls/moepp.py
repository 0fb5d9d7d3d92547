"""`moepp`: MoE++ (Jin et al. 2024): zero-computation experts and gating residuals.

Besides the E FFN experts of the shape, the router can send a (token, slot) to
- Z zero experts: output 0 (the token skips that slot's computation),
- C copy experts: output = the input x,
- Q constant experts: output = a1 x + a2 v_j, a learned vector v_j mixed with the input
  by a learned gate [a1, a2] = softmax(x W_c,j),
with Z, C, Q the options `zero_experts`, `copy_experts`, `const_experts` (defaults 1, 1,
2 as in the paper). Expert index order: FFN [0, E), zero [E, E+Z), copy [E+Z, E+Z+C),
constant [E+Z+C, N), N = E + Z + C + Q.

Routing: softmax top-k over all N experts, gates renormalised (as the base router).
Gating residuals: the scores G_j = x_j W_j + G_{j-1} W_g,j of layer j add a learned
projection (W_g: N x N) of the previous layer's scores; the first layer has none. The
carry between layers goes through `forward_with_carry` (see `moebench.layer.Stack`); the
case's routing bias is added to the scores for routing only (it is not carried).

Parameters MoE++ adds (the router's extra N - E columns, W_g, v and W_c) are drawn from a
CPU generator seeded from case.seed (std 0.02; the router columns at the case's
`router_scale`, as the FFN experts' columns), so every device draws the same numbers;
they are the same for every layer of a stack (a build does not know its layer index);
the FFN experts and their router columns differ per layer, as the base weights do. The
FFN experts' routing bias is padded with zeros for the new experts; a test can force
routing by editing `layer.router.bias_N`.

Fast path: FFN assignments (one device sync to find them) on `GroupedMoE`'s grouped
GEMMs; the zero-computation experts in closed form over all tokens (a copy is a
per-token scale of x, a constant expert a scale of x plus a rank-Q term). Metrics:
`moepp_zc_slot_frac` (fraction of (token, slot) assignments sent to zero-computation
experts), `moepp_token_skip_frac` (tokens that used no FFN expert at all),
`moepp_ffn_experts_per_token`, and the split `moepp_{zero,copy,const}_slot_frac`.

Shape legend: T tokens, D hidden, F expert width, E FFN experts, K top_k, N all experts
(E + Z + C + Q), X the extra experts (Z + C + Q), Q constant experts, A FFN assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moebench.case import Case
from moebench.designs import (
    add_shared32,
    expert_output32,
    mean_std,
    reference_stack,
    require_base_router,
)
from moebench.impls.grouped import GroupedMoE
from moebench.layer import LayerStats, routing_stats
from moebench.measure.counters import ParamCounts
from moebench.registry import register
from moebench.routing import switch_aux_loss
from moebench.weights import WEIGHT_STD, ExpertWeights

# Seed offset of MoE++'s own parameters (apart from the weight and input seeds).
EXTRAS_SEED_OFFSET = 2_000_029


@dataclass(frozen=True)
class ExpertCounts:
    """How many experts of each kind; index ranges in that order: FFN, zero, copy, const."""

    ffn: int
    zero: int
    copy: int
    const: int

    @classmethod
    def from_case(cls, case: Case) -> ExpertCounts:
        counts = cls(
            ffn=case.shape.num_experts,
            zero=int(case.option("zero_experts", 1)),
            copy=int(case.option("copy_experts", 1)),
            const=int(case.option("const_experts", 2)),
        )
        for name in ("zero", "copy", "const"):
            if getattr(counts, name) < 0:
                raise ValueError(f"moepp option '{name}_experts' must be >= 0")
        return counts

    @property
    def total(self) -> int:
        return self.ffn + self.zero + self.copy + self.const

    @property
    def copy_start(self) -> int:
        return self.ffn + self.zero

    @property
    def const_start(self) -> int:
        return self.ffn + self.zero + self.copy


@dataclass
class MoEPPParams:
    """MoE++'s own parameters (float32) for one case."""

    w_router_DX: torch.Tensor  # router columns of the zero, copy and constant experts
    w_residual_NN: torch.Tensor  # W_g: previous layer's scores -> this layer's
    const_value_QD: torch.Tensor  # v_j
    const_gate_QD2: torch.Tensor  # W_c,j: x -> logits of [a1, a2]


def moepp_params(case: Case, counts: ExpertCounts, device: torch.device) -> MoEPPParams:
    """Draw MoE++'s parameters: N(0, 0.02^2) from a CPU generator seeded from case.seed
    (identical on every device and for every layer)."""
    generator = torch.Generator().manual_seed(case.seed + EXTRAS_SEED_OFFSET)
    D, X, N, Q = case.shape.hidden, counts.total - counts.ffn, counts.total, counts.const

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * WEIGHT_STD).to(device)

    # the router columns of the extra experts at the case's router scale, as the FFN ones
    w_router_DX = normal(D, X) * (case.router_scale / WEIGHT_STD)
    return MoEPPParams(w_router_DX, normal(N, N), normal(Q, D), normal(Q, D, 2))


def route_all(
    scores_TN: torch.Tensor, bias_N: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_TK float32, expert_ids_TK, probs_TN): softmax top-k over all N experts,
    the chosen probabilities renormalised."""
    probs_TN = torch.softmax(scores_TN + bias_N, dim=-1)
    top_TK, expert_ids_TK = torch.topk(probs_TN, top_k, dim=-1)
    return top_TK / top_TK.sum(dim=-1, keepdim=True), expert_ids_TK, probs_TN


class MoEPPRouter(nn.Module):
    """Scores over all N experts, with the previous layer's scores projected by W_g."""

    def __init__(
        self,
        w_router_DN: torch.Tensor,
        bias_N: torch.Tensor,
        w_residual_NN: torch.Tensor,
        top_k: int,
    ):
        super().__init__()
        self.w_router_DN = nn.Parameter(w_router_DN.float())
        self.w_residual_NN = nn.Parameter(w_residual_NN.float())
        self.register_buffer("bias_N", bias_N.float())
        self.top_k = top_k

    def forward(
        self, x32_TD: torch.Tensor, carry_TN: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate_TK float32, expert_ids_TK, probs_TN, scores_TN to carry on)."""
        scores_TN = x32_TD @ self.w_router_DN
        if carry_TN is not None:
            scores_TN = scores_TN + carry_TN @ self.w_residual_NN
        return (*route_all(scores_TN, self.bias_N, self.top_k), scores_TN)


class MoEPPLayer(GroupedMoE):
    """FFN experts on grouped GEMMs plus zero, copy and constant experts."""

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        self.counts = ExpertCounts.from_case(case)
        if self.top_k > self.counts.total:
            raise ValueError(f"top_k {self.top_k} > {self.counts.total} experts in all")
        params = moepp_params(case, self.counts, weights.device)
        extra_bias_X = torch.zeros(self.counts.total - self.counts.ffn, device=weights.device)
        self.router = MoEPPRouter(
            torch.cat([weights.w_router_DE.float(), params.w_router_DX], dim=1),
            torch.cat([weights.router_bias_E.float(), extra_bias_X]),
            params.w_residual_NN,
            self.top_k,
        )
        self.const_value_QD = nn.Parameter(params.const_value_QD)
        self.const_gate_QD2 = nn.Parameter(params.const_gate_QD2)
        self._last_moepp: tuple[torch.Tensor, torch.Tensor] | None = None
        self._carried = False  # whether the last forward used a previous layer's scores

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.forward_with_carry(x_TD, None)[0]

    def forward_with_carry(
        self, x_TD: torch.Tensor, carry_TN: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_TD, this layer's router scores for the next layer's gating residual)."""
        c = self.counts
        timer = self.timer
        with timer.phase("router"):
            x32_TD = x_TD.float()
            gate32_TK, expert_ids_TK, probs_TN, scores_TN = self.router(x32_TD, carry_TN)
            gate_TK = gate32_TK.to(x_TD.dtype)  # rounded as the base router rounds it
        self._last_moepp = (expert_ids_TK, probs_TN.detach())
        self._carried = carry_TN is not None

        with timer.phase("permute"):
            token_A, slot_A = torch.nonzero(expert_ids_TK < c.ffn, as_tuple=True)
            expert_A, weight_A = expert_ids_TK[token_A, slot_A], gate_TK[token_A, slot_A]
        y_TD = self.routed_assignments(x_TD, token_A, expert_A, weight_A)
        if c.copy or c.const:
            with timer.phase("expert"):  # the zero-computation experts
                y_TD = y_TD + self._zero_computation(x32_TD, gate_TK.float(), expert_ids_TK)
        return self.add_shared(x_TD, y_TD), scores_TN

    def _zero_computation(
        self, x32_TD: torch.Tensor, gate_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        """Copy and constant experts' weighted output (zero experts add nothing), in x's
        dtype: sum_copy g x + sum_const g (a1 x + a2 v) = scale_T x + mix_TQ v_QD."""
        c = self.counts
        gate_TN = torch.zeros(
            gate_TK.shape[0], c.total, device=gate_TK.device, dtype=torch.float32
        ).scatter_add(1, expert_ids_TK, gate_TK)
        scale_T = gate_TN[:, c.copy_start : c.const_start].sum(dim=-1)
        out_TD = x32_TD.new_zeros(())
        if c.const:
            mix_TQ2 = torch.softmax(torch.einsum("td,qdc->tqc", x32_TD, self.const_gate_QD2), -1)
            const_gate_TQ = gate_TN[:, c.const_start :]
            scale_T = scale_T + (const_gate_TQ * mix_TQ2[..., 0]).sum(dim=-1)
            out_TD = (const_gate_TQ * mix_TQ2[..., 1]) @ self.const_value_QD
        return (scale_T[:, None] * x32_TD + out_TD).to(self.w_gate_EDF.dtype)

    def _slot_kinds(self) -> dict[str, torch.Tensor]:
        """Bool T x K masks of the last forward's slots per zero-computation kind."""
        expert_ids_TK = self._last_moepp[0]
        c = self.counts
        return {
            "zero": ((expert_ids_TK >= c.ffn) & (expert_ids_TK < c.copy_start)),
            "copy": ((expert_ids_TK >= c.copy_start) & (expert_ids_TK < c.const_start)),
            "const": expert_ids_TK >= c.const_start,
        }

    def stats(self) -> LayerStats | None:
        """Load of the FFN experts only (tokens_per_expert has E entries; slots that went
        to zero-computation experts are in `extra_metrics`, and count in dropped_frac's
        denominator); aux loss and router entropy over all N."""
        if self._last_moepp is None:
            return None
        expert_ids_TK, probs_TN = self._last_moepp
        return routing_stats(
            expert_ids_TK[expert_ids_TK < self.counts.ffn],
            expert_ids_TK.shape[0],
            self.num_experts,
            probs_TN,
            aux_loss=float(switch_aux_loss(probs_TN, expert_ids_TK, self.counts.total)),
            total_slots=expert_ids_TK.numel(),
        )

    def extra_metrics(self) -> dict[str, float]:
        """From the last forward: moepp_zc_slot_frac (fraction of (token, slot)
        assignments sent to zero-computation experts: zero, copy or constant), its split
        moepp_zero_slot_frac / moepp_copy_slot_frac / moepp_const_slot_frac,
        moepp_token_skip_frac (fraction of tokens with no FFN expert in any slot) and
        moepp_ffn_experts_per_token (mean FFN experts per token)."""
        if self._last_moepp is None:
            return {}
        expert_ids_TK = self._last_moepp[0]
        ffn_TK = expert_ids_TK < self.counts.ffn
        metrics = {
            f"moepp_{kind}_slot_frac": float(mask_TK.double().mean())
            for kind, mask_TK in self._slot_kinds().items()
        }
        metrics["moepp_zc_slot_frac"] = 1.0 - float(ffn_TK.double().mean())
        metrics["moepp_token_skip_frac"] = float((~ffn_TK.any(dim=-1)).double().mean())
        metrics["moepp_ffn_experts_per_token"] = mean_std(ffn_TK.sum(dim=-1))[0]
        return metrics

    def own_param_counts(self) -> ParamCounts:
        """MoE++'s parameters besides the FFN experts: its router (D x N; the gating
        residual W_g only when this layer got a previous layer's scores), and each
        constant expert's vector and gate (3D), used by the tokens sent to it."""
        router_DN = self.router.w_router_DN.numel()
        residual = self.router.w_residual_NN.numel()
        const = self.const_value_QD.numel() + self.const_gate_QD2.numel()
        used_residual = residual if self._carried else 0
        one_const = const // self.counts.const if self.counts.const else 0
        const_hit, const_per_token = 0, 0.0
        if self._last_moepp is not None and self.counts.const:
            expert_ids_TK = self._last_moepp[0]
            const_A = expert_ids_TK[expert_ids_TK >= self.counts.const_start]
            const_hit = torch.unique(const_A).numel()
            const_per_token = const_A.numel() / expert_ids_TK.shape[0]
        return ParamCounts(
            total=router_DN + residual + const,
            active=router_DN + used_residual + round(const_per_token * one_const),
            touched=router_DN + used_residual + const_hit * one_const,
            router=router_DN + used_residual,
        )


@torch.no_grad()
def moepp_reference(
    weights_list: list[ExpertWeights], x_TD: torch.Tensor, case: Case
) -> torch.Tensor:
    """Design reference, float32: scores with the gating residual, softmax top-k over all
    N experts, then a plain loop over every expert of every kind; the shared experts."""
    c = ExpertCounts.from_case(case)
    params = moepp_params(case, c, x_TD.device)

    def layer(
        weights: ExpertWeights, x32_TD: torch.Tensor, carry_TN: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w_router_DN = torch.cat([weights.w_router_DE.float(), params.w_router_DX], dim=1)
        scores_TN = x32_TD @ w_router_DN
        if carry_TN is not None:
            scores_TN = scores_TN + carry_TN @ params.w_residual_NN
        bias_N = torch.cat([weights.router_bias_E.float(), scores_TN.new_zeros(c.total - c.ffn)])
        gate_TK, expert_ids_TK, _ = route_all(scores_TN, bias_N, case.shape.top_k)
        gate_TK = gate_TK.to(x_TD.dtype).float()  # rounded as the layer rounds it
        y_TD = torch.zeros_like(x32_TD)
        for expert in range(c.total):
            token_idx, slot_idx = torch.where(expert_ids_TK == expert)
            if token_idx.numel() == 0 or c.ffn <= expert < c.copy_start:
                continue  # unused, or a zero expert
            x_ND = x32_TD[token_idx]
            if expert < c.ffn:
                out_ND = expert_output32(weights, expert, x_ND)
            elif expert < c.const_start:
                out_ND = x_ND
            else:
                j = expert - c.const_start
                a_N2 = torch.softmax(x_ND @ params.const_gate_QD2[j], dim=-1)
                out_ND = a_N2[:, :1] * x_ND + a_N2[:, 1:] * params.const_value_QD[j]
            y_TD.index_add_(0, token_idx, out_ND * gate_TK[token_idx, slot_idx, None])
        y_TD = add_shared32(weights, x32_TD, y_TD)
        return y_TD, scores_TN

    return reference_stack(weights_list, x_TD, layer)


@register(
    "moepp",
    family="zero-computation",
    description="MoE++: FFN + zero/copy/constant experts, gating residuals across layers",
    exact=False,
    options=("zero_experts", "copy_experts", "const_experts"),
    reference=moepp_reference,
)
def build(weights: ExpertWeights, case: Case) -> nn.Module:
    require_base_router(case, "its softmax top-k over FFN, zero, copy and constant experts")
    return MoEPPLayer(weights, case)
