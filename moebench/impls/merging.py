"""`merging`: task-agnostic expert merging (a variant: fewer, averaged experts), after
HC-SMoE ("Retraining-Free Merging of Sparse MoE via Hierarchical Clustering", Chen et al.
2024; official code github.com/wazenmai/HC-SMoE, `hcsmoe/merging/grouping_mixtral.py`).

The E routed experts are grouped into G = max(1, round(E x keep_ratio)) groups (half
rounded up) and each group is replaced by one merged expert, so the layer holds G experts:

1. Calibration: a seeded batch of `calib_tokens` N(0, 1) tokens (seed + CALIB_SEED_OFFSET,
   distinct from the timed inputs, which make_inputs draws from seed + 1_000_003) goes
   through the original router; usage_e = tokens assigned to expert e + 1 (smoothing).
2. Similarity (option `merge_by`): "weights" (model-centric) is the cosine similarity of
   the experts' flattened weights (gate, up and down side by side); "outputs"
   (data-centric) is the cosine similarity of the experts' outputs on the calibration
   batch (every expert sees every calibration token). Neurons are not aligned first, so
   two experts equal up to a permutation of their hidden units look unrelated.
3. Grouping: agglomerative clustering with average linkage on that similarity, merging
   the most similar pair of groups until G remain (ties: the lowest expert ids first);
   deterministic. Groups are numbered by their smallest member.
4. Merging: a group's expert is the usage-weighted average of its members' weights
   (float32 sums, then the case dtype); a group of one keeps its expert bit for bit.
5. Routing (option `router`):
   - "members" (default; HC-SMoE's official code, which binds every member's slot to the
     one merged module and keeps the router): the original router (all E logits, top-k,
     renormalised) picks experts as before; each chosen expert id is mapped to its
     group, and a token that chose two members of one group sends its token once to the
     group's expert, with the sum of the members' gates (the official forward computes
     the shared module once per member slot: the same sum). keep_ratio = 1 is the
     original layer exactly, and a merged layer adds nothing a token did not choose.
   - "merged" (a variant moebench defines, the router merged along with the experts):
     a G-way router whose column (and routing bias) for group g is the same
     usage-weighted average of its members' router columns as its expert; softmax over
     the G groups, top-min(k, G), renormalised. It holds D x G router weights.

Combining a token's duplicate groups needs the number of kept (token, group) pairs, a
device sync per forward when some group has several members. The expert computation is
`grouped`'s (one grouped GEMM per weight, or its per-expert fallback).

Columns (extra_metrics): merge_experts_kept (G), merge_saved_weight_bytes ((E - G) x
expert bytes), merge_calib_fidelity_err (||y_merged - y|| / ||y|| on the calibration batch,
float32 math), merge_calib_tokens, merge_group_sizes, merge_groups_per_token (distinct
groups per token in the last forward). The harness's `fidelity_err` is the same error on
held-out inputs; `rel_err` is the check against `merged_reference`, a plain loop over the
merged experts.

Shape legend: T tokens, N calibration tokens (c of them in a chunk), D hidden, F expert
width, E routed experts, G merged experts (groups), K top_k, A kept (token, group)
assignments, M flattened features, P x Q one expert matrix (D x F or F x D), R the
router's routes (E members, or G merged groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moebench.case import Case
from moebench.designs import add_shared32, require_base_router
from moebench.impls.grouped import GroupedMoE
from moebench.impls.reference import reference_output
from moebench.layer import LayerStats, routing_stats, swiglu
from moebench.measure.counters import ParamCounts
from moebench.registry import register
from moebench.routing import switch_aux_loss
from moebench.weights import ExpertWeights

MERGE_BY = ("weights", "outputs")
MERGE_ROUTERS = ("members", "merged")
DEFAULT_ROUTER = "members"
DEFAULT_KEEP_RATIO = 0.5
DEFAULT_MERGE_BY = "weights"
DEFAULT_CALIB_TOKENS = 1024
CALIB_SEED_OFFSET = 2_000_029
# Elements of one float32 chunk when computing similarities (bounds their memory).
CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class MergeOptions:
    """The case's merging options, validated."""

    keep_ratio: float
    merge_by: str
    calib_tokens: int
    router: str = DEFAULT_ROUTER

    @classmethod
    def of(cls, case: Case) -> MergeOptions:
        keep_ratio = case.option("keep_ratio", DEFAULT_KEEP_RATIO)
        merge_by = case.option("merge_by", DEFAULT_MERGE_BY)
        calib_tokens = case.option("calib_tokens", DEFAULT_CALIB_TOKENS)
        router = case.option("router", DEFAULT_ROUTER)
        if router not in MERGE_ROUTERS:
            raise ValueError(
                f"merging: option router={router!r}; allowed: {', '.join(map(repr, MERGE_ROUTERS))}"
            )
        if (
            isinstance(keep_ratio, bool)
            or not isinstance(keep_ratio, int | float)
            or not 0 < keep_ratio <= 1
        ):
            raise ValueError(
                f"merging: option keep_ratio={keep_ratio!r}; allowed: a number with "
                "0 < keep_ratio <= 1"
            )
        if merge_by not in MERGE_BY:
            raise ValueError(
                f"merging: option merge_by={merge_by!r}; allowed: {', '.join(map(repr, MERGE_BY))}"
            )
        if isinstance(calib_tokens, bool) or not isinstance(calib_tokens, int) or calib_tokens < 1:
            raise ValueError(f"merging: option calib_tokens={calib_tokens!r}; allowed: an int >= 1")
        return cls(float(keep_ratio), merge_by, calib_tokens, router)


def kept_experts(num_experts: int, keep_ratio: float) -> int:
    """G = max(1, round(E x keep_ratio)), half rounded up."""
    return max(1, min(num_experts, math.floor(num_experts * keep_ratio + 0.5)))


@dataclass
class MergePlan:
    """Which group each expert joins, the merged experts (in the case dtype) and the
    router the merged layer routes with: R routes, each mapped to its group by
    group_of_R (R = E members with `router` "members", R = G groups with "merged")."""

    groups: list[list[int]]
    group_of_R: torch.Tensor
    usage_E: torch.Tensor
    w_gate_GDF: torch.Tensor
    w_up_GDF: torch.Tensor
    w_down_GFD: torch.Tensor
    calib_x_ND: torch.Tensor
    w_router_DR: torch.Tensor
    router_bias_R: torch.Tensor
    top_k: int

    @property
    def num_groups(self) -> int:
        return len(self.groups)


def calibration_batch(case: Case, tokens: int) -> torch.Tensor:
    """`tokens` seeded N(0, 1) tokens in the case dtype, distinct from the timed inputs."""
    device = torch.device(case.device)
    generator = torch.Generator(device=device).manual_seed(case.seed + CALIB_SEED_OFFSET)
    x_ND = torch.randn(tokens, case.shape.hidden, generator=generator, device=device)
    return x_ND.to(getattr(torch, case.dtype))


@torch.no_grad()
def _route(
    w_router_DR: torch.Tensor, bias_R: torch.Tensor, top_k: int, x_TD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k in float32: (gate_TK renormalised, route_ids_TK)."""
    probs_TR = torch.softmax(x_TD.float() @ w_router_DR.float() + bias_R.float(), dim=-1)
    top_TK, ids_TK = torch.topk(probs_TR, top_k, dim=-1)
    return top_TK / top_TK.sum(dim=-1, keepdim=True), ids_TK


def _gram(rows: list[torch.Tensor]) -> torch.Tensor:
    """Sum over `rows` (each E x M, any dtype) of X X^T in float32, in column chunks."""
    E = rows[0].shape[0]
    gram_EE = torch.zeros(E, E, device=rows[0].device, dtype=torch.float32)
    width = max(1, CHUNK_ELEMENTS // E)
    for x_EM in rows:
        for chunk in x_EM.split(width, dim=1):
            chunk32 = chunk.float()
            gram_EE += chunk32 @ chunk32.t()
    return gram_EE


def _cosine(gram_EE: torch.Tensor) -> torch.Tensor:
    gram64_EE = gram_EE.double().cpu()
    norms_E = gram64_EE.diagonal().clamp_min(1e-300).sqrt()
    return gram64_EE / norms_E[:, None] / norms_E[None, :]


@torch.no_grad()
def weight_similarity(weights: ExpertWeights) -> torch.Tensor:
    """Cosine similarity (E x E, float64, CPU) of the experts' flattened weights."""
    E = weights.shape.num_experts
    rows = [w.reshape(E, -1) for w in (weights.w_gate_EDF, weights.w_up_EDF, weights.w_down_EFD)]
    return _cosine(_gram(rows))


@torch.no_grad()
def output_similarity(weights: ExpertWeights, x_ND: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (E x E, float64, CPU) of the experts' outputs on x_ND."""
    E, D, F = weights.shape.num_experts, weights.shape.hidden, weights.shape.ffn
    gram_EE = torch.zeros(E, E, device=x_ND.device, dtype=torch.float32)
    chunk = max(1, CHUNK_ELEMENTS // (E * max(D, F)))
    for x_cD in x_ND.to(weights.dtype).split(chunk):
        h_EcF = torch.nn.functional.silu(torch.matmul(x_cD, weights.w_gate_EDF)) * torch.matmul(
            x_cD, weights.w_up_EDF
        )
        out_EM = torch.matmul(h_EcF, weights.w_down_EFD).reshape(E, -1).float()
        gram_EE += out_EM @ out_EM.t()
    return _cosine(gram_EE)


def agglomerate(similarity_EE: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering into `num_groups` groups: merge the most
    similar pair of groups (lowest ids on ties) until that many remain. Groups are
    returned sorted, each by member, ordered by their smallest member."""
    E = similarity_EE.shape[0]
    sim_EE = similarity_EE.double().clone()
    members: list[list[int]] = [[e] for e in range(E)]
    upper_EE = torch.ones(E, E, dtype=torch.bool).triu(1)
    minus_inf = torch.tensor(-math.inf, dtype=torch.float64)
    for _ in range(E - num_groups):
        pair = int(torch.where(upper_EE, sim_EE, minus_inf).argmax())
        i, j = divmod(pair, E)  # i < j: the upper triangle
        n_i, n_j = len(members[i]), len(members[j])
        row_E = (n_i * sim_EE[i] + n_j * sim_EE[j]) / (n_i + n_j)
        sim_EE[i], sim_EE[:, i] = row_E, row_E
        upper_EE[j, :], upper_EE[:, j] = False, False  # group j is gone
        members[i] += members[j]
        members[j] = []
    return sorted(sorted(m) for m in members if m)


@torch.no_grad()
def merge_plan(weights: ExpertWeights, case: Case) -> MergePlan:
    """Group and merge `weights`' experts as `case`'s options say (module docstring)."""
    options = MergeOptions.of(case)
    E = weights.shape.num_experts
    G = kept_experts(E, options.keep_ratio)
    calib_x_ND = calibration_batch(case, options.calib_tokens)
    _, ids_NK = _route(weights.w_router_DE, weights.router_bias_E, weights.shape.top_k, calib_x_ND)
    usage_E = torch.bincount(ids_NK.flatten(), minlength=E).double().cpu() + 1.0
    if G == E:
        groups = [[e] for e in range(E)]
    else:
        similarity_EE = (
            weight_similarity(weights)
            if options.merge_by == "weights"
            else output_similarity(weights, calib_x_ND)
        )
        groups = agglomerate(similarity_EE, G)
    group_of = [0] * E
    for g, members in enumerate(groups):
        for e in members:
            group_of[e] = g
    merged = [
        _average(w, groups, usage_E)
        for w in (weights.w_gate_EDF, weights.w_up_EDF, weights.w_down_EFD)
    ]
    w_router_DR, bias_R = weights.w_router_DE.float(), weights.router_bias_E.float()
    group_of_R, top_k = torch.tensor(group_of, device=weights.device), weights.shape.top_k
    if options.router == "merged":
        w_router_DR = _average(w_router_DR.t()[:, None, :], groups, usage_E)[:, 0, :].t()
        bias_R = _average(bias_R[:, None, None], groups, usage_E)[:, 0, 0]
        group_of_R, top_k = torch.arange(G, device=weights.device), min(top_k, G)
    return MergePlan(
        groups=groups,
        group_of_R=group_of_R,
        usage_E=usage_E,
        w_gate_GDF=merged[0],
        w_up_GDF=merged[1],
        w_down_GFD=merged[2],
        calib_x_ND=calib_x_ND,
        w_router_DR=w_router_DR.contiguous(),
        router_bias_R=bias_R.contiguous(),
        top_k=top_k,
    )


def _average(w_EPQ: torch.Tensor, groups: list[list[int]], usage_E: torch.Tensor) -> torch.Tensor:
    """Per group, the usage-weighted mean of its members' matrices (float32 sums); a group
    of one is its member's matrix, unchanged. All groups of one: the tensor itself."""
    if all(len(members) == 1 for members in groups) and len(groups) == w_EPQ.shape[0]:
        return w_EPQ
    out_GPQ = torch.empty(len(groups), *w_EPQ.shape[1:], device=w_EPQ.device, dtype=w_EPQ.dtype)
    for g, members in enumerate(groups):
        if len(members) == 1:
            out_GPQ[g].copy_(w_EPQ[members[0]])
            continue
        total = float(sum(usage_E[e] for e in members))
        acc_PQ = torch.zeros(w_EPQ.shape[1:], device=w_EPQ.device, dtype=torch.float32)
        for e in members:
            acc_PQ.add_(w_EPQ[e].float(), alpha=float(usage_E[e]) / total)
        out_GPQ[g].copy_(acc_PQ)
    return out_GPQ


@torch.no_grad()
def merged_output(weights: ExpertWeights, plan: MergePlan, x_TD: torch.Tensor) -> torch.Tensor:
    """The merged layer's output in float32: a plain loop over the merged experts."""
    x32_TD = x_TD.float()
    gate_TK, ids_TK = _route(plan.w_router_DR, plan.router_bias_R, plan.top_k, x_TD)
    gate_TK = gate_TK.to(x_TD.dtype).float()  # rounded as the layer rounds them
    group_TK = plan.group_of_R[ids_TK]
    y_TD = torch.zeros_like(x32_TD)
    for g in range(plan.num_groups):
        token_idx, slot_idx = torch.where(group_TK == g)
        if token_idx.numel() == 0:
            continue
        # a token that chose several members of g: once, with their gates summed
        gate_T = torch.zeros(x_TD.shape[0], device=x_TD.device).index_add_(
            0, token_idx, gate_TK[token_idx, slot_idx]
        )
        tokens = torch.unique(token_idx)
        out_ND = swiglu(
            x32_TD[tokens],
            plan.w_gate_GDF[g].float(),
            plan.w_up_GDF[g].float(),
            plan.w_down_GFD[g].float(),
        )
        y_TD.index_add_(0, tokens, out_ND * gate_T[tokens, None])
    return add_shared32(weights, x32_TD, y_TD)


def merged_reference(
    weights_list: list[ExpertWeights], x_TD: torch.Tensor, case: Case
) -> torch.Tensor:
    """The design's plain reference (float32): one merged layer, or a residual stack."""
    if len(weights_list) == 1:
        return merged_output(weights_list[0], merge_plan(weights_list[0], case), x_TD)
    x32_TD = x_TD.float()
    for weights in weights_list:
        x32_TD = x32_TD + merged_output(weights, merge_plan(weights, case), x32_TD.to(x_TD.dtype))
    return x32_TD


def _relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    ref = torch.linalg.vector_norm(y_ref.double())
    return float(torch.linalg.vector_norm(y.double() - y_ref.double()) / ref)


class MergedRouter(nn.Module):
    """The merged G-way router: softmax top-k over the groups in float32, renormalised;
    called as the base router is ((gate_TK in x's dtype, group_ids_TK, probs_TG))."""

    def __init__(self, w_router_DG: torch.Tensor, bias_G: torch.Tensor, top_k: int):
        super().__init__()
        self.w_router_DE = nn.Parameter(w_router_DG.float().clone())  # E: the G groups
        self.register_buffer("bias_E", bias_G.float().clone())
        self.top_k = top_k

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs_TG = torch.softmax(x_TD.float() @ self.w_router_DE + self.bias_E, dim=-1)
        top_TK, group_ids_TK = torch.topk(probs_TG, self.top_k, dim=-1)
        gate_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
        return gate_TK.to(x_TD.dtype), group_ids_TK, probs_TG


class MergedMoE(GroupedMoE):
    """`grouped`'s layer over the G merged experts, behind the original E-way router (or
    the merged G-way one).

    GroupedMoE's expert tensors (w_gate_EDF, ...) hold the G merged experts here."""

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        plan = merge_plan(weights, case)
        self.w_gate_EDF = nn.Parameter(plan.w_gate_GDF)
        self.w_up_EDF = nn.Parameter(plan.w_up_GDF)
        self.w_down_EFD = nn.Parameter(plan.w_down_GFD)
        if MergeOptions.of(case).router == "merged":
            self.router = MergedRouter(plan.w_router_DR, plan.router_bias_R, plan.top_k)
        self.register_buffer("group_of_R", plan.group_of_R)
        self.groups = plan.groups
        self.num_groups = plan.num_groups
        self.has_merged = self.num_groups < self.num_experts
        self.calib_tokens = plan.calib_x_ND.shape[0]
        self.expert_bytes = weights.shape.expert_params * weights.w_gate_EDF.element_size()
        self.calib_fidelity_err = _relative_error(
            merged_output(weights, plan, plan.calib_x_ND),
            reference_output(weights, plan.calib_x_ND),
        )
        self._last_group_A: torch.Tensor | None = None

    def routed(
        self, x_TD: torch.Tensor, gate_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        T, K = expert_ids_TK.shape
        timer = self.timer
        with timer.phase("permute"):
            group_TK = self.group_of_R[expert_ids_TK]
            token_A = torch.arange(T * K, device=x_TD.device) // K
            group_A, weight_A = group_TK.flatten(), gate_weights_TK.flatten()
            if self.has_merged:
                # Slot k repeats an earlier slot j < k's group: fold its gate into slot j.
                same_TKK = group_TK[:, :, None] == group_TK[:, None, :]
                earlier_KK = torch.ones(K, K, dtype=torch.bool, device=x_TD.device).tril(-1)
                keep_A = ~(same_TKK & earlier_KK).any(dim=-1).flatten()
                combined_TK = (same_TKK * gate_weights_TK[:, None, :]).sum(dim=-1)
                group_A, token_A = group_A[keep_A], token_A[keep_A]
                weight_A = combined_TK.flatten()[keep_A]
            self._last_group_A = group_A
        # The merged experts through grouped's one assignment path (sort, GEMMs, scatter).
        return self.routed_assignments(x_TD, token_A, group_A, weight_A)

    def stats(self) -> LayerStats | None:
        """Load per merged expert (group) of the last forward, a token's duplicate groups
        once; aux loss (Switch) of the router over its routes (E or G)."""
        if self._last is None or self._last_group_A is None:
            return None
        expert_ids_TK, probs_TE = self._last
        return routing_stats(
            self._last_group_A,
            expert_ids_TK.shape[0],
            self.num_groups,
            probs_TE,
            aux_loss=float(switch_aux_loss(probs_TE, expert_ids_TK, probs_TE.shape[-1])),
        )

    def own_param_counts(self) -> ParamCounts:
        """The router the layer routes with (D x E, or D x G merged), every token uses all
        of it; the merged experts are counted from `stats()` like any routed expert."""
        router = self.router.w_router_DE.numel()
        return ParamCounts(total=router, active=router, touched=router, router=router)

    def extra_metrics(self) -> dict[str, float | int | list]:
        """Merging's columns (module docstring); call outside timed regions."""
        metrics: dict[str, float | int | list] = {
            "merge_experts_kept": self.num_groups,
            "merge_saved_weight_bytes": (self.num_experts - self.num_groups) * self.expert_bytes,
            "merge_calib_fidelity_err": self.calib_fidelity_err,
            "merge_calib_tokens": self.calib_tokens,
            "merge_group_sizes": [len(members) for members in self.groups],
        }
        if self._last is not None and self._last_group_A is not None:
            tokens = self._last[0].shape[0]
            metrics["merge_groups_per_token"] = self._last_group_A.numel() / tokens
        return metrics


@register(
    "merging",
    family="merging",
    description="task-agnostic expert merging (HC-SMoE): E experts grouped by similarity "
    "into round(E x keep_ratio) usage-weighted averages behind the original router "
    "(router = members, official) or a merged G-way router (router = merged)",
    exact=False,
    options=("keep_ratio", "merge_by", "calib_tokens", "router"),
    reference=merged_reference,
)
def build(weights: ExpertWeights, case: Case) -> MergedMoE:
    require_base_router(case, "the original E-way softmax top-k onto merged experts")
    return MergedMoE(weights, case)
