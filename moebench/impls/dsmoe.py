"""`dsmoe`: DS-MoE, dense training and sparse inference (Pan et al. 2024).

Training (case mode "train"): every expert computes for every token, weighted by the full
router distribution p = softmax(x W + b): y = sum_e p_e FFN_e(x) (+ shared experts). The
dense path is batched GEMMs: gate and up as one broadcast matmul over the E experts, and
the weighted down projection as one (T x E*F) @ (E*F x D) product.

Inference (mode "forward"): only some experts run, weighted by their dense-training
probabilities p_e (not renormalised: dropping an expert drops its contribution):
- `sparse` = "threshold" (default): experts with p_e > `threshold` (default 0), and
  always each token's most probable one; threshold 0 means every expert (the dense
  function, computed on the dense path);
- `sparse` = "topk": the shape's top_k most probable experts.
The sparse experts run as grouped GEMMs over flat (token, expert) assignments (one
device sync to find them).

Mutual-information loss (the paper's load-balancing term, from ModuleFormer, Shen et al.
2023, whose code DS-MoE builds on: `top_k_gating.get_aux_loss_and_clear` with
aux_loss = "mi"), column `mi_loss`: mean_x H(P(e | x)) - H(mean_x P(e | x)) (nats) over
the router's full softmax distribution of the last forward, in either mode. It is
minimised by confident per-token routing that uses every expert equally overall
(-log E); 0 when every token has the same distribution. `aux_loss` stays the Switch
loss over the experts that ran (always 1.0 where all of them run).

Metrics, from the last forward: `dsmoe_experts_per_token` (mean, and `_std` over tokens)
and `dsmoe_active_params_per_token` (mean, `_std`): the cost per token varies with the
router's confidence; `dsmoe_sparse_err`, the relative deviation ||y_sparse - y_dense|| /
||y_dense|| of sparse inference (the case's rule) from the dense forward on the same
input: the accuracy the sparsity costs. It is computed outside the timed path (in train
mode too, where the layer itself runs dense), so it is the same what-if in both modes.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
A (token, expert) assignments, X = E x F (all experts' hidden units side by side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from moebench.case import Case
from moebench.designs import (
    assignment_stats,
    mean_std,
    reference_experts,
    reference_stack,
    require_base_router,
    router_probs,
)
from moebench.impls.grouped import GroupedMoE
from moebench.layer import LayerStats
from moebench.registry import register
from moebench.weights import ExpertWeights

Sparse = Literal["threshold", "topk"]
SPARSE_RULES: tuple[str, ...] = ("threshold", "topk")


@dataclass(frozen=True)
class SparseRule:
    """Which experts run at inference; `dense` when every expert does."""

    sparse: Sparse
    threshold: float
    top_k: int
    train: bool

    @classmethod
    def from_case(cls, case: Case) -> SparseRule:
        rule = cls(
            sparse=case.option("sparse", "threshold"),
            threshold=float(case.option("threshold", 0.0)),
            top_k=case.shape.top_k,
            train=case.workload.mode == "train",
        )
        if rule.sparse not in SPARSE_RULES:
            rules = ", ".join(map(repr, SPARSE_RULES))
            raise ValueError(f"dsmoe option 'sparse' {rule.sparse!r} not one of {rules}")
        if not 0 <= rule.threshold < 1:
            raise ValueError(f"dsmoe option 'threshold' must be in [0, 1), got {rule.threshold}")
        return rule

    @property
    def sparse_is_dense(self) -> bool:
        """True when the inference rule keeps every expert (threshold 0)."""
        return self.sparse == "threshold" and self.threshold <= 0

    @property
    def runs_dense(self) -> bool:
        """True when the layer computes every expert: training, or a dense rule."""
        return self.train or self.sparse_is_dense

    def mask(self, probs_TE: torch.Tensor) -> torch.Tensor:
        """Bool T x E: the experts sparse inference runs for each token."""
        if self.sparse == "topk":
            top_TK = probs_TE.topk(self.top_k, dim=-1).indices
            return torch.zeros_like(probs_TE, dtype=torch.bool).scatter(1, top_TK, True)
        best_T1 = probs_TE.argmax(dim=-1, keepdim=True)
        return (probs_TE > self.threshold).scatter(1, best_T1, True)


def mi_loss(probs_TE: torch.Tensor) -> float:
    """Mutual-information loss mean_x H(P(e|x)) - H(mean_x P(e|x)), nats (module
    docstring); NaN without tokens."""
    if probs_TE.shape[0] == 0:
        return float("nan")
    probs64_TE = probs_TE.double()
    conditional = torch.special.entr(probs64_TE).sum(dim=-1).mean()
    marginal = torch.special.entr(probs64_TE.mean(dim=0)).sum()
    return float(conditional - marginal)


class DSMoELayer(GroupedMoE):
    """Dense all-experts computation in training, sparse experts at inference."""

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        self.rule = SparseRule.from_case(case)
        # (input, probs, experts per token or None when dense) of the last forward
        self._last_ds: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with self.timer.phase("router"):
            probs_TE = router_probs(self.router, x_TD)
        if self.rule.runs_dense:
            self._last_ds = (x_TD.detach(), probs_TE.detach(), None)
            return self.dense(x_TD, probs_TE)
        y_TD, mask_TE = self.sparse(x_TD, probs_TE)
        self._last_ds = (x_TD.detach(), probs_TE.detach(), mask_TE.sum(dim=-1))
        return y_TD

    def dense(self, x_TD: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
        """sum_e p_e FFN_e(x) + shared, every expert on every token."""
        T, D = x_TD.shape
        with self.timer.phase("expert"):
            h_ETF = F.silu(torch.matmul(x_TD, self.w_gate_EDF)) * torch.matmul(x_TD, self.w_up_EDF)
            h_ETF = h_ETF * probs_TE.t().to(x_TD.dtype)[..., None]
            h_TX = h_ETF.transpose(0, 1).reshape(T, -1)  # expert-major, like w_down's rows
            y_TD = h_TX @ self.w_down_EFD.reshape(-1, D)
        return self.add_shared(x_TD, y_TD)

    def sparse(
        self, x_TD: torch.Tensor, probs_TE: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_TD, mask_TE): the rule's experts only, weighted by p_e."""
        with self.timer.phase("router"):
            mask_TE = self.rule.mask(probs_TE)
        with self.timer.phase("permute"):
            expert_A, token_A = torch.nonzero(mask_TE.t(), as_tuple=True)
            weight_A = probs_TE[token_A, expert_A]
        y_TD = self.routed_assignments(x_TD, token_A, expert_A, weight_A)
        return self.add_shared(x_TD, y_TD), mask_TE

    def _experts_per_token(self) -> torch.Tensor:
        x_TD, _, counts_T = self._last_ds
        if counts_T is None:
            return torch.full((x_TD.shape[0],), self.num_experts, device=x_TD.device)
        return counts_T

    def stats(self) -> LayerStats | None:
        """Load of the last forward: every (token, expert) assignment that ran."""
        if self._last_ds is None:
            return None
        x_TD, probs_TE, counts_T = self._last_ds
        if counts_T is None:
            T = x_TD.shape[0]
            expert_A = torch.arange(self.num_experts, device=x_TD.device).repeat_interleave(T)
        else:
            expert_A = torch.nonzero(self.rule.mask(probs_TE).t(), as_tuple=True)[0]
        return assignment_stats(expert_A, probs_TE, self.num_experts)

    @torch.no_grad()
    def extra_metrics(self) -> dict[str, float]:
        """dsmoe_experts_per_token(_std), dsmoe_active_params_per_token(_std),
        dsmoe_sparse_err and mi_loss of the last forward (see the module docstring)."""
        if self._last_ds is None:
            return {}
        x_TD, probs_TE, _ = self._last_ds
        experts_mean, experts_std = mean_std(self._experts_per_token())
        expert_params = 3 * self.w_gate_EDF[0].numel()
        _, active = self.active_param_counts(experts_mean)
        sparse_err = 0.0
        if not self.rule.sparse_is_dense:
            y_dense = self.dense(x_TD, probs_TE).double()
            y_sparse = self.sparse(x_TD, probs_TE)[0].double()
            sparse_err = float(
                torch.linalg.vector_norm(y_sparse - y_dense) / torch.linalg.vector_norm(y_dense)
            )
        return {
            "dsmoe_experts_per_token": experts_mean,
            "dsmoe_experts_per_token_std": experts_std,
            "dsmoe_active_params_per_token": float(active),
            "dsmoe_active_params_per_token_std": experts_std * expert_params,
            "dsmoe_sparse_err": sparse_err,
            "mi_loss": mi_loss(probs_TE),
        }


@torch.no_grad()
def dsmoe_reference(
    weights_list: list[ExpertWeights], x_TD: torch.Tensor, case: Case
) -> torch.Tensor:
    """Design reference, float32 plain per-expert loop: every expert weighted by p_e in
    training (or with a dense rule), the rule's experts weighted by p_e at inference."""
    rule = SparseRule.from_case(case)

    def layer(weights: ExpertWeights, x32_TD: torch.Tensor, carry: Any) -> tuple[Any, Any]:
        logits_TE = x32_TD @ weights.w_router_DE.float() + weights.router_bias_E.float()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if rule.runs_dense:
            mask_TE = torch.ones_like(probs_TE, dtype=torch.bool)
        else:
            mask_TE = rule.mask(probs_TE)
        gate_TE = probs_TE.to(x_TD.dtype).float()  # rounded as the layer rounds it
        return reference_experts(weights, x32_TD, gate_TE, mask_TE), None

    return reference_stack(weights_list, x_TD, layer)


@register(
    "dsmoe",
    family="dense-train-sparse-infer",
    description="DS-MoE: all experts weighted by the router in training; sparse inference "
    "(sparse = threshold | topk) by raw probabilities; mi_loss",
    exact=False,
    options=("sparse", "threshold"),
    reference=dsmoe_reference,
)
def build(weights: ExpertWeights, case: Case) -> nn.Module:
    require_base_router(
        case, "weighting every expert (or a sparse subset) by its softmax probability"
    )
    return DSMoELayer(weights, case)
