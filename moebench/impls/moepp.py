"""`moepp`: MoE++ (Jin et al. 2024): zero-computation experts and gating residuals.

Besides the E FFN experts of the shape, the router can send a (token, slot) to
- Z zero experts: output 0 (the token skips that slot's computation),
- C copy experts: output = the expert input,
- Q constant experts: output = a1 x + a2 v_j, a learned vector v_j mixed with the input
  by a learned gate [a1, a2] = softmax(x W_c,j),
with Z, C, Q the options `zero_experts`, `copy_experts`, `const_experts` (defaults 1, 1,
2 as in the paper). Expert index order: FFN [0, E), zero [E, E+Z), copy [E+Z, E+Z+C),
constant [E+Z+C, N), N = E + Z + C + Q. The official code orders them FFN, constant,
copy, zero; the order does not change the function.

Defaults follow the official code (SkyworkAI/MoE-plus-plus, `moe_plus_plus_layer.py`,
non-Mixtral gating); each departure is a named option:
- Router (option `router`): "two_layer" (default, official `moe_2layer_gate=True`):
  logits = tanh(x W1) W2, W1: D x 8N, W2: 8N x N, float32, no bias; "linear": one D x N
  layer whose first E columns are the base router's (so the FFN experts route as in
  `grouped`) and whose other columns are MoE++'s own.
- Gating: softmax over all N logits, top-k, the zero experts' gates set to 0, then the
  k gates renormalised to sum to 1 (a token whose every slot went to a zero expert
  gets routed output 0).
- Expert inputs (option `scale_inputs`, default true, official unless
  `moe_feature_no_mul_topk`): the FFN, copy and constant experts all see x * top_k (the
  router sees x). Shared experts (which MoE++ does not have) see x.
- Gating residuals: the logits G_j = f_j(x_j) + G_{j-1} W_g,j of layer j add a learned
  projection (W_g: N x N) of the previous layer's logits; the first layer has none. The
  carry between layers goes through `forward_with_carry` (see `moebench.layer.Stack`);
  the case's routing bias is added to the logits for routing only (it is not carried).
- Heterogeneous load-balance loss (paper sec. 3.3), column `hetero_balance_loss`:
  N sum_i eta_i f_i P_i over all N experts, eta_i = 1 for FFN experts and `tau` for the
  zero-computation ones, f_i the fraction of (token, slot) assignments sent to expert i
  and P_i its mean router probability (the Switch form: 1.0 for uniform routing at
  tau = 1). Default tau = 1.0, the plain Switch loss over all N experts: the official
  code does not ship the loss or a value of tau, so moebench assumes none; set `tau` to
  reproduce a training run.

Parameters MoE++ adds (its router, W_g, v and W_c) are drawn per layer from a CPU
generator seeded from case.seed and the layer index, so every device draws the same
numbers and a stack's layers differ: the router's first layer (or the linear router's
extra columns) at the case's `router_scale`, the two-layer router's second layer at
1/sqrt(8N) (in tanh's linear range the two-layer router is then as sharp as a linear
one at `router_scale`), the rest at 0.02. The routing bias of the FFN experts is padded
with zeros for the new experts; a test can force routing by editing `layer.router.bias_N`.

Fast path: FFN assignments (one device sync to find them) on `GroupedMoE`'s grouped
GEMMs; the zero-computation experts in closed form over all tokens (a copy is a
per-token scale of x, a constant expert a scale of x plus a rank-Q term). Metrics:
`moepp_zc_slot_frac` (fraction of (token, slot) assignments sent to zero-computation
experts), `moepp_token_skip_frac` (tokens that used no FFN expert at all),
`moepp_ffn_experts_per_token`, the split `moepp_{zero,copy,const}_slot_frac`, and
`hetero_balance_loss`.

Shape legend: T tokens, D hidden, F expert width, E FFN experts, K top_k, N all experts
(E + Z + C + Q), X the extra experts (Z + C + Q), Q constant experts, H the two-layer
router's width (8N), A FFN assignments.
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

# Seed offset of MoE++'s own parameters (apart from the weight and input seeds), and the
# stride between successive layers' seeds.
EXTRAS_SEED_OFFSET = 2_000_029
LAYER_SEED_STRIDE = 7919
ROUTERS = ("two_layer", "linear")
ROUTER_WIDTH_PER_EXPERT = 8  # the official two-layer router: Linear(D, 8N) -> tanh -> N
DEFAULT_TAU = 1.0


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


@dataclass(frozen=True)
class MoEPPOptions:
    """The case's MoE++ options, validated (module docstring)."""

    counts: ExpertCounts
    router: str
    scale_inputs: bool
    tau: float

    @classmethod
    def from_case(cls, case: Case) -> MoEPPOptions:
        router = case.option("router", "two_layer")
        scale_inputs = case.option("scale_inputs", True)
        tau = case.option("tau", DEFAULT_TAU)
        if router not in ROUTERS:
            raise ValueError(
                f"moepp option 'router' {router!r} not one of {', '.join(map(repr, ROUTERS))}"
            )
        if not isinstance(scale_inputs, bool):
            raise ValueError(
                f"moepp option 'scale_inputs' must be true or false, got {scale_inputs!r}"
            )
        if isinstance(tau, bool) or not isinstance(tau, int | float) or tau < 0:
            raise ValueError(f"moepp option 'tau' must be a number >= 0, got {tau!r}")
        return cls(ExpertCounts.from_case(case), router, scale_inputs, float(tau))


@dataclass
class MoEPPParams:
    """MoE++'s own parameters (float32) for one layer of a case. The router is either
    two-layer (w_hidden_DH, w_out_HN) or the linear router's extra columns (w_router_DX)."""

    w_router_DX: torch.Tensor | None
    w_hidden_DH: torch.Tensor | None
    w_out_HN: torch.Tensor | None
    w_residual_NN: torch.Tensor  # W_g: previous layer's logits -> this layer's
    const_value_QD: torch.Tensor  # v_j
    const_gate_QD2: torch.Tensor  # W_c,j: x -> logits of [a1, a2]


def moepp_params(
    case: Case, options: MoEPPOptions, device: torch.device, layer: int = 0
) -> MoEPPParams:
    """Draw layer `layer`'s MoE++ parameters from a CPU generator seeded from case.seed
    and the layer (identical on every device; module docstring for the scales)."""
    generator = torch.Generator().manual_seed(
        case.seed + EXTRAS_SEED_OFFSET + LAYER_SEED_STRIDE * layer
    )
    c = options.counts
    D, N, Q = case.shape.hidden, c.total, c.const
    H = ROUTER_WIDTH_PER_EXPERT * N

    def normal(*size: int, std: float = WEIGHT_STD) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * std).to(device)

    w_router_DX = w_hidden_DH = w_out_HN = None
    if options.router == "two_layer":
        w_hidden_DH = normal(D, H, std=case.router_scale)
        w_out_HN = normal(H, N, std=H**-0.5)
    else:
        w_router_DX = normal(D, N - c.ffn, std=case.router_scale)
    return MoEPPParams(
        w_router_DX, w_hidden_DH, w_out_HN, normal(N, N), normal(Q, D), normal(Q, D, 2)
    )


def route_all(
    logits_TN: torch.Tensor, bias_N: torch.Tensor, top_k: int, counts: ExpertCounts
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_TK float32, expert_ids_TK, probs_TN): softmax over all N experts, top-k,
    the zero experts' gates set to 0, then the k gates renormalised to sum to 1 (all
    0 where every slot went to a zero expert)."""
    probs_TN = torch.softmax(logits_TN + bias_N, dim=-1)
    top_TK, expert_ids_TK = torch.topk(probs_TN, top_k, dim=-1)
    is_zero_TK = (expert_ids_TK >= counts.ffn) & (expert_ids_TK < counts.copy_start)
    top_TK = top_TK.masked_fill(is_zero_TK, 0.0)
    total_T1 = top_TK.sum(dim=-1, keepdim=True)
    return top_TK / torch.where(total_T1 > 0, total_T1, 1.0), expert_ids_TK, probs_TN


def hetero_balance_loss(
    probs_TN: torch.Tensor, expert_ids_TK: torch.Tensor, counts: ExpertCounts, tau: float
) -> float:
    """MoE++'s heterogeneous load-balance loss N sum_i eta_i f_i P_i (module docstring):
    eta_i = 1 for FFN experts, tau for zero-computation experts."""
    N = counts.total
    fraction_N = torch.bincount(expert_ids_TK.flatten(), minlength=N).double()
    fraction_N = fraction_N / expert_ids_TK.numel()
    eta_N = torch.full((N,), tau, dtype=torch.float64, device=probs_TN.device)
    eta_N[: counts.ffn] = 1.0
    return float(N * (eta_N * fraction_N * probs_TN.double().mean(dim=0)).sum())


def own_logits(
    x32_TD: torch.Tensor,
    w_router_DN: torch.Tensor | None,
    w_hidden_DH: torch.Tensor | None,
    w_out_HN: torch.Tensor | None,
) -> torch.Tensor:
    """A layer's own logits (before the gating residual), float32: x W (linear router)
    or tanh(x W1) W2 (two-layer router)."""
    if w_router_DN is not None:
        return x32_TD @ w_router_DN
    return torch.tanh(x32_TD @ w_hidden_DH) @ w_out_HN


class MoEPPRouter(nn.Module):
    """Logits over all N experts (two-layer or linear), plus the previous layer's logits
    projected by W_g; the MoE++ gating (`route_all`)."""

    def __init__(
        self,
        params: MoEPPParams,
        w_base_router_DE: torch.Tensor,
        bias_N: torch.Tensor,
        counts: ExpertCounts,
        top_k: int,
    ):
        super().__init__()
        self.w_router_DN = self.w_hidden_DH = self.w_out_HN = None
        if params.w_router_DX is not None:
            self.w_router_DN = nn.Parameter(
                torch.cat([w_base_router_DE.float(), params.w_router_DX], dim=1)
            )
        else:
            self.w_hidden_DH = nn.Parameter(params.w_hidden_DH)
            self.w_out_HN = nn.Parameter(params.w_out_HN)
        self.w_residual_NN = nn.Parameter(params.w_residual_NN)
        self.register_buffer("bias_N", bias_N.float())
        self.counts = counts
        self.top_k = top_k

    def forward(
        self, x32_TD: torch.Tensor, carry_TN: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate_TK float32, expert_ids_TK, probs_TN, logits_TN to carry on)."""
        logits_TN = own_logits(x32_TD, self.w_router_DN, self.w_hidden_DH, self.w_out_HN)
        if carry_TN is not None:
            logits_TN = logits_TN + carry_TN @ self.w_residual_NN
        return (*route_all(logits_TN, self.bias_N, self.top_k, self.counts), logits_TN)

    def param_count(self) -> int:
        """The router's own parameters (the gating residual apart)."""
        weights = (self.w_router_DN, self.w_hidden_DH, self.w_out_HN)
        return sum(w.numel() for w in weights if w is not None)


class MoEPPLayer(GroupedMoE):
    """FFN experts on grouped GEMMs plus zero, copy and constant experts."""

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        self.options = MoEPPOptions.from_case(case)
        self.counts = self.options.counts
        if self.top_k > self.counts.total:
            raise ValueError(f"top_k {self.top_k} > {self.counts.total} experts in all")
        params = moepp_params(case, self.options, weights.device, getattr(weights, "layer", 0))
        extra_bias_X = torch.zeros(self.counts.total - self.counts.ffn, device=weights.device)
        self.router = MoEPPRouter(
            params,
            weights.w_router_DE,
            torch.cat([weights.router_bias_E.float(), extra_bias_X]),
            self.counts,
            self.top_k,
        )
        self.const_value_QD = nn.Parameter(params.const_value_QD)
        self.const_gate_QD2 = nn.Parameter(params.const_gate_QD2)
        self._last_moepp: tuple[torch.Tensor, torch.Tensor] | None = None
        self._carried = False  # whether the last forward used a previous layer's logits

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.forward_with_carry(x_TD, None)[0]

    def forward_with_carry(
        self, x_TD: torch.Tensor, carry_TN: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_TD, this layer's router logits for the next layer's gating residual)."""
        c = self.counts
        timer = self.timer
        with timer.phase("router"):
            gate32_TK, expert_ids_TK, probs_TN, logits_TN = self.router(x_TD.float(), carry_TN)
            gate_TK = gate32_TK.to(x_TD.dtype)  # rounded as the base router rounds it
        self._last_moepp = (expert_ids_TK, probs_TN.detach())
        self._carried = carry_TN is not None
        xin_TD = x_TD * self.top_k if self.options.scale_inputs else x_TD

        with timer.phase("permute"):
            token_A, slot_A = torch.nonzero(expert_ids_TK < c.ffn, as_tuple=True)
            expert_A, weight_A = expert_ids_TK[token_A, slot_A], gate_TK[token_A, slot_A]
        y_TD = self.routed_assignments(xin_TD, token_A, expert_A, weight_A)
        if c.copy or c.const:
            with timer.phase("expert"):  # the zero-computation experts
                zc_TD = self._zero_computation(xin_TD.float(), gate_TK.float(), expert_ids_TK)
                y_TD = y_TD + zc_TD
        return self.add_shared(x_TD, y_TD), logits_TN

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
        denominator); aux loss (Switch over all N) and router entropy over all N."""
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
        moepp_token_skip_frac (fraction of tokens with no FFN expert in any slot),
        moepp_ffn_experts_per_token (mean FFN experts per token) and hetero_balance_loss
        (module docstring)."""
        if self._last_moepp is None:
            return {}
        expert_ids_TK, probs_TN = self._last_moepp
        ffn_TK = expert_ids_TK < self.counts.ffn
        metrics = {
            f"moepp_{kind}_slot_frac": float(mask_TK.double().mean())
            for kind, mask_TK in self._slot_kinds().items()
        }
        metrics["moepp_zc_slot_frac"] = 1.0 - float(ffn_TK.double().mean())
        metrics["moepp_token_skip_frac"] = float((~ffn_TK.any(dim=-1)).double().mean())
        metrics["moepp_ffn_experts_per_token"] = mean_std(ffn_TK.sum(dim=-1))[0]
        metrics["hetero_balance_loss"] = hetero_balance_loss(
            probs_TN, expert_ids_TK, self.counts, self.options.tau
        )
        return metrics

    def own_param_counts(self) -> ParamCounts:
        """MoE++'s parameters besides the FFN experts: its router (two-layer: D x 8N +
        8N x N; linear: D x N; the gating residual W_g only when this layer got a previous
        layer's logits), and each constant expert's vector and gate (3D), used by the
        tokens sent to it."""
        router_DN = self.router.param_count()
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
    """Design reference, float32: per layer its own parameters, logits with the gating
    residual, softmax top-k over all N experts with the zero experts' gates zeroed and
    the rest renormalised, then a plain loop over every expert of every kind on
    x * top_k (x with `scale_inputs` false); the shared experts on x."""
    options = MoEPPOptions.from_case(case)
    c, K = options.counts, case.shape.top_k

    def layer(
        weights: ExpertWeights, x32_TD: torch.Tensor, carry_TN: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        params = moepp_params(case, options, x_TD.device, getattr(weights, "layer", 0))
        w_router_DN = None
        if params.w_router_DX is not None:
            w_router_DN = torch.cat([weights.w_router_DE.float(), params.w_router_DX], dim=1)
        logits_TN = own_logits(x32_TD, w_router_DN, params.w_hidden_DH, params.w_out_HN)
        if carry_TN is not None:
            logits_TN = logits_TN + carry_TN @ params.w_residual_NN
        bias_N = torch.cat([weights.router_bias_E.float(), logits_TN.new_zeros(c.total - c.ffn)])
        gate_TK, expert_ids_TK, _ = route_all(logits_TN, bias_N, K, c)
        gate_TK = gate_TK.to(x_TD.dtype).float()  # rounded as the layer rounds it
        xin_TD = x32_TD
        if options.scale_inputs:  # rounded to x's dtype as the layer's x * top_k is
            xin_TD = (x32_TD.to(x_TD.dtype) * K).float()
        y_TD = torch.zeros_like(x32_TD)
        for expert in range(c.total):
            token_idx, slot_idx = torch.where(expert_ids_TK == expert)
            if token_idx.numel() == 0 or c.ffn <= expert < c.copy_start:
                continue  # unused, or a zero expert
            x_ND = xin_TD[token_idx]
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
        return y_TD, logits_TN

    return reference_stack(weights_list, x_TD, layer)


@register(
    "moepp",
    family="zero-computation",
    description="MoE++: FFN + zero/copy/constant experts, gating residuals across layers; "
    "official gating (zero experts' gates 0, then renormalised), inputs x top_k "
    "(scale_inputs), two-layer tanh router (router = two_layer | linear), "
    "hetero_balance_loss with tau (default 1.0)",
    exact=False,
    options=("zero_experts", "copy_experts", "const_experts", "router", "scale_inputs", "tau"),
    reference=moepp_reference,
)
def build(weights: ExpertWeights, case: Case) -> nn.Module:
    require_base_router(case, "its softmax top-k over FFN, zero, copy and constant experts")
    return MoEPPLayer(weights, case)
