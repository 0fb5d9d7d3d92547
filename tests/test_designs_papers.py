"""Each design against a golden function written here from its paper or official code,
on fixed small weights, and each design loss on a hand-made routing (issue 10).

- MoE++ (SkyworkAI/MoE-plus-plus `moe_plus_plus_layer.py`): two-layer tanh router, zero
  expert's gate zeroed before renormalising, expert inputs x * top_k; hetero_balance_loss.
- Top-p (ZhenweiAn/Dynamic_MoE `modeling_moe.py`): sorted cumulative mass > p, gates the
  raw probabilities; dynamic_loss.
- DS-MoE: sparse inference by raw probabilities; mi_loss (ModuleFormer's MI loss).
- Merging (HC-SMoE): members' slots share the merged expert (gates add), or the merged
  G-way router.

The golden functions are plain loops in float64, written apart from the code under test.
Shape legend: T tokens, D hidden, E routed experts, N all MoE++ experts, K top_k,
G merged groups.
"""

from __future__ import annotations

import math

import pytest
import torch

from moebench import registry
from moebench.impls import dsmoe, merging, moepp, topp
from moebench.layer import swiglu
from moebench.measure.case_run import relative_error
from moebench.weight_sources import make_weights
from moebench.weights import ExpertWeights, make_inputs
from tests.conftest import tiny_case


def _build(case):
    weights = make_weights(case)
    return registry.get(case.impl).build(weights, case), weights, make_inputs(case, 1)[0]


def _expert64(weights: ExpertWeights, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    return swiglu(
        x_ND,
        weights.w_gate_EDF[e].double(),
        weights.w_up_EDF[e].double(),
        weights.w_down_EFD[e].double(),
    )


# ------------------------------------------------------------------ MoE++


@torch.no_grad()
def _official_moepp(layer: moepp.MoEPPLayer, weights: ExpertWeights, x_TD: torch.Tensor):
    """MoE++'s official forward (non-Mixtral gating, two-layer router, inputs x top_k),
    its experts in the official order FFN, constant, copy, zero mapped onto moebench's
    indices. Float64 loops."""
    c, K = layer.counts, layer.top_k
    x = x_TD.double()
    logits = torch.tanh(x @ layer.router.w_hidden_DH.double()) @ layer.router.w_out_HN.double()
    gates = torch.softmax(logits + layer.router.bias_N.double(), dim=1)
    gates, indices = torch.topk(gates, K, dim=1)
    is_zero = (indices >= c.ffn) & (indices < c.copy_start)
    gates = torch.where(is_zero, torch.zeros_like(gates), gates)
    gates = gates / gates.sum(dim=1, keepdim=True)
    inputs = x * K
    out = torch.zeros_like(x)
    for expert in range(c.total):
        for t, k in zip(*torch.nonzero(indices == expert, as_tuple=True), strict=True):
            h = inputs[t : t + 1]
            if expert < c.ffn:
                y = _expert64(weights, expert, h)
            elif expert < c.copy_start:
                y = torch.zeros_like(h)
            elif expert < c.const_start:
                y = h
            else:
                j = expert - c.const_start
                w = torch.softmax(h @ layer.const_gate_QD2[j].double(), dim=-1)
                y = w[:, :1] * h + w[:, 1:] * layer.const_value_QD[j].double()
            out[t] += gates[t, k] * y[0]
    return out


def test_moepp_matches_the_official_forward_on_fixed_weights():
    case = tiny_case("moepp", batch=4)
    layer, weights, x_TD = _build(case)
    # skew routing so every kind of expert gets slots: zero expert, copy, one constant
    E = case.shape.num_experts
    layer.router.bias_N[E : E + 3] = torch.tensor([1.0, 0.5, 0.5])
    with torch.no_grad():
        y_TD = layer(x_TD)
    kinds = layer.extra_metrics()
    assert kinds["moepp_zero_slot_frac"] > 0 and kinds["moepp_copy_slot_frac"] > 0
    assert relative_error(y_TD, _official_moepp(layer, weights, x_TD)) < 1e-5


def test_moepp_gating_zeroes_the_zero_expert_then_renormalises():
    counts = moepp.ExpertCounts(ffn=2, zero=1, copy=1, const=0)  # ids: FFN 0-1, zero 2, copy 3
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.2, 0.4, 0.1, 0.3]])
    gate_TK, ids_TK, _ = moepp.route_all(probs.log(), torch.zeros(4), 2, counts)
    assert ids_TK.tolist() == [[0, 2], [1, 3]]
    # token 0: FFN 0 (0.5) and the zero expert (0.3, zeroed) -> [1, 0], not [0.625, 0.375]
    torch.testing.assert_close(gate_TK, torch.tensor([[1.0, 0.0], [4 / 7, 3 / 7]]))


def test_moepp_every_slot_on_zero_experts_gives_zero_not_nan():
    counts = moepp.ExpertCounts(ffn=2, zero=2, copy=0, const=0)
    logits = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    gate_TK, _, _ = moepp.route_all(logits, torch.zeros(4), 2, counts)
    assert torch.equal(gate_TK, torch.zeros(1, 2))
    case = tiny_case("moepp", options=(("zero_experts", 2),))
    layer, _, x_TD = _build(case)
    layer.router.bias_N[case.shape.num_experts :] = torch.tensor([1e4, 1e4, 0, 0, 0])
    with torch.no_grad():
        assert torch.equal(layer(x_TD), torch.zeros_like(x_TD))


def test_moepp_ffn_experts_see_x_times_top_k():
    # one FFN expert forced: y = g * FFN(K x) with g = 1 (the other slot a zero expert)
    case = tiny_case("moepp", options=(("const_experts", 0), ("copy_experts", 0)))
    layer, weights, x_TD = _build(case)
    E = case.shape.num_experts
    layer.router.bias_N[1] = layer.router.bias_N[E] = 1e4  # FFN 1 and the zero expert
    with torch.no_grad():
        y_TD = layer(x_TD)
    golden = _expert64(weights, 1, 2 * x_TD.double())
    assert relative_error(y_TD, golden) < 1e-5
    unscaled = case.with_(options=(*case.options, ("scale_inputs", False)))
    layer, weights, _ = _build(unscaled)
    layer.router.bias_N[1] = layer.router.bias_N[E] = 1e4
    with torch.no_grad():
        assert relative_error(layer(x_TD), _expert64(weights, 1, x_TD.double())) < 1e-5


def test_moepp_linear_router_reuses_the_base_router_columns():
    case = tiny_case("moepp", options=(("router", "linear"),))
    layer, weights, _ = _build(case)
    E = case.shape.num_experts
    assert layer.router.w_hidden_DH is None
    assert torch.equal(layer.router.w_router_DN[:, :E], weights.w_router_DE.float())


def test_hetero_balance_loss_by_hand():
    counts = moepp.ExpertCounts(ffn=2, zero=1, copy=1, const=0)  # N = 4
    probs_TN = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.2, 0.2, 0.2, 0.4]])
    ids_TK = torch.tensor([[0, 2], [3, 0]])
    # f = [2, 0, 1, 1] / 4; P = [0.3, 0.15, 0.25, 0.3]
    # N (f0 P0 + f1 P1 + tau (f2 P2 + f3 P3)) = 4 (0.15 + tau 0.1375)
    for tau in (1.0, 0.25, 0.0):
        expected = 4 * (0.5 * 0.3 + tau * (0.25 * 0.25 + 0.25 * 0.3))
        got = moepp.hetero_balance_loss(probs_TN, ids_TK, counts, tau)
        assert got == pytest.approx(expected)
    case = tiny_case("moepp", batch=8, options=(("tau", 0.5),))
    layer, _, x_TD = _build(case)
    with torch.no_grad():
        layer(x_TD)
    ids, probs = layer._last_moepp
    assert layer.extra_metrics()["hetero_balance_loss"] == pytest.approx(
        moepp.hetero_balance_loss(probs, ids, layer.counts, 0.5)
    )


@pytest.mark.parametrize(
    "options",
    [(("router", "tree"),), (("scale_inputs", "yes"),), (("tau", -1),), (("tau", True),)],
)
def test_moepp_bad_options_are_named(options):
    name = options[0][0]
    with pytest.raises(ValueError, match=f"'{name}'"):
        _build(tiny_case("moepp", options=options))


# ------------------------------------------------------------------ top-p


def _official_top_p(probs_TE: torch.Tensor, p: float) -> torch.Tensor:
    """Dynamic_MoE's `top_p_sampling_batched_all_sequence` as a gate matrix: sort,
    cumulative mass, drop everything after the first position whose mass exceeds p."""
    sorted_probs, sorted_idx = torch.sort(probs_TE, descending=True)
    beyond = torch.cumsum(sorted_probs, dim=-1) > p
    threshold = torch.nn.functional.one_hot(beyond.long().argmax(-1), probs_TE.shape[-1])
    beyond = beyond & ~threshold.bool()
    kept = torch.where(beyond, 0.0, sorted_probs)
    return torch.zeros_like(probs_TE).scatter(1, sorted_idx, kept)


def test_topp_matches_the_official_routing_with_raw_gates():
    case = tiny_case("topp", num_experts=8, batch=8, router_scale=0.3)
    assert topp._p_option(case) == 0.4
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        y_TD = layer(x_TD)
    probs_TE = torch.softmax(
        x_TD.double() @ weights.w_router_DE.double() + weights.router_bias_E.double(), -1
    )
    gate_TE = _official_top_p(probs_TE, 0.4)
    assert layer.extra_metrics()["topp_experts_std"] > 0  # tokens take different counts
    golden = torch.zeros_like(x_TD, dtype=torch.float64)
    for e in range(8):
        golden += gate_TE[:, e, None] * _expert64(weights, e, x_TD.double())
    assert relative_error(y_TD, golden) < 1e-5
    assert (gate_TE.sum(-1) < 1).all()  # not renormalised


def test_dynamic_loss_by_hand():
    probs_TE = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert topp.dynamic_loss(probs_TE) == pytest.approx(math.log(4) / 2)
    case = tiny_case("topp", batch=4)
    layer, _, x_TD = _build(case)
    layer.router.bias_E[2] = 1e4  # every token certain of expert 2: entropy 0
    with torch.no_grad():
        layer(x_TD)
    assert layer.extra_metrics()["dynamic_loss"] == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------ DS-MoE


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        ((("sparse", "topk"),), "topk"),
        ((("threshold", 0.26),), "threshold"),
    ],
)
def test_dsmoe_sparse_modes_match_the_golden_rule(options, rule):
    case = tiny_case("dsmoe", batch=4, options=options)
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        y_TD = layer(x_TD)
    probs_TE = torch.softmax(
        x_TD.double() @ weights.w_router_DE.double() + weights.router_bias_E.double(), -1
    )
    golden = torch.zeros_like(x_TD, dtype=torch.float64)
    for t in range(case.tokens):
        ranked = sorted(range(4), key=lambda e: -float(probs_TE[t, e]))
        chosen = (
            ranked[:2]
            if rule == "topk"
            else [ranked[0]] + [e for e in ranked[1:] if probs_TE[t, e] > 0.26]
        )
        for e in chosen:  # raw probability, not renormalised
            golden[t] += probs_TE[t, e] * _expert64(weights, e, x_TD[t : t + 1].double())[0]
    assert relative_error(y_TD, golden) < 1e-5


def test_mi_loss_by_hand():
    two_sure = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # sure and balanced: -log 2
    assert dsmoe.mi_loss(two_sure) == pytest.approx(-math.log(2))
    same = torch.tensor([[0.7, 0.3], [0.7, 0.3]])  # no information: 0
    assert dsmoe.mi_loss(same) == pytest.approx(0.0, abs=1e-12)
    mixed = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # (log 2 + 0)/2 - H(0.75, 0.25)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert dsmoe.mi_loss(mixed) == pytest.approx(math.log(2) / 2 - h)
    for mode in ("forward", "train"):
        case = tiny_case("dsmoe", batch=4, mode=mode)
        layer, weights, x_TD = _build(case)
        with torch.no_grad():
            layer(x_TD)
        probs_TE = torch.softmax(x_TD @ weights.w_router_DE + weights.router_bias_E, -1)
        assert layer.extra_metrics()["mi_loss"] == pytest.approx(dsmoe.mi_loss(probs_TE))
        assert layer.stats().aux_loss == pytest.approx(1.0)  # the Switch loss, dense


# ------------------------------------------------------------------ merging


def _merged_golden(layer, plan, weights, x_TD, router: str) -> torch.Tensor:
    """HC-SMoE's forward: "members" routes with the original router and every chosen
    member's slot runs its group's merged expert with the member's gate; "merged" routes
    over G columns, each the usage-weighted mean of its members' columns."""
    x = x_TD.double()
    usage = plan.usage_E.double()
    if router == "members":
        w_DR, b_R, k = weights.w_router_DE.double(), weights.router_bias_E.double(), 2
        group_of = {e: g for g, members in enumerate(plan.groups) for e in members}
    else:
        cols, bias = [], []
        for members in plan.groups:
            share = usage[members] / usage[members].sum()
            cols.append(sum(s * weights.w_router_DE[:, e].double() for s, e in zip(share, members)))
            bias.append(sum(s * float(weights.router_bias_E[e]) for s, e in zip(share, members)))
        w_DR, b_R = torch.stack(cols, dim=1), torch.tensor(bias, dtype=torch.float64)
        k, group_of = min(2, len(plan.groups)), {g: g for g in range(len(plan.groups))}
    top, ids = torch.topk(torch.softmax(x @ w_DR + b_R, -1), k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(k):
            g = group_of[int(ids[t, slot])]
            merged = swiglu(
                x[t : t + 1],
                plan.w_gate_GDF[g].double(),
                plan.w_up_GDF[g].double(),
                plan.w_down_GFD[g].double(),
            )
            out[t] += top[t, slot] * merged[0]
    return out


@pytest.mark.parametrize("router", ["members", "merged"])
def test_merging_router_matches_hc_smoe(router):
    case = tiny_case("merging", num_experts=6, batch=4, options=(("router", router),))
    layer, weights, x_TD = _build(case)
    plan = merging.merge_plan(weights, case)
    assert len(plan.groups) == 3
    with torch.no_grad():
        y_TD = layer(x_TD)
    assert relative_error(y_TD, _merged_golden(layer, plan, weights, x_TD, router)) < 1e-5
    # active params count the distinct groups a token reached
    stats = layer.stats()
    if router == "merged":
        assert layer.router.w_router_DE.shape == (case.shape.hidden, 3)
        assert stats.experts_per_token == 2.0  # top-2 of 3 distinct groups
    else:
        groups_T = [len({int(plan.group_of_R[e]) for e in row}) for row in layer._last[0]]
        assert stats.experts_per_token == pytest.approx(sum(groups_T) / len(groups_T))


def test_merging_bad_router_is_named():
    with pytest.raises(ValueError, match="router='shared'"):
        _build(tiny_case("merging", options=(("router", "shared"),)))
