"""The `hierarchical` design: two-level routing against its reference, the flat layer it
reduces to, counts and balance on a hand-made routing, and bad options."""

from __future__ import annotations

import pytest
import torch

from moebench import registry
from moebench.impls.hierarchical import HierarchicalMoE, Hierarchy, route_two_levels
from moebench.layer import Stack
from moebench.measure.case_run import WeightCache, measure_case, relative_error
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs
from tests.conftest import FAST_PLAN, tiny_case


def hier_case(**changes):
    options = changes.pop("options", {"groups": 4, "group_top_k": 2, "sub_top_k": 2})
    defaults = {"num_experts": 16, "top_k": 4, "seq_len": 16}
    return tiny_case("hierarchical", **{**defaults, **changes}, options=options)


def _build(case):
    weights = [make_weights(case, i) for i in range(case.workload.layers)]
    build = registry.get("hierarchical").build
    layer = (
        build(weights[0], case) if len(weights) == 1 else Stack([build(w, case) for w in weights])
    )
    return layer, weights, make_inputs(case, 1)[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layers", [1, 2])
def test_layer_equals_its_reference(dtype, layers):
    case = hier_case(dtype=dtype, layers=layers, shared_experts=1)
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        y_TD = layer(x_TD)
    error = relative_error(y_TD, registry.get("hierarchical").reference(weights, x_TD, case))
    assert error < (1e-5 if dtype == "float32" else 1e-2)


def test_one_group_top_one_is_the_flat_grouped_layer():
    options = {"groups": 1, "group_top_k": 1, "sub_top_k": 2}
    case = tiny_case("hierarchical", num_experts=8, top_k=2, options=options)
    hier_row = measure_case(case, FAST_PLAN, WeightCache())
    flat_row = measure_case(case.with_(impl="grouped", options={}), FAST_PLAN, WeightCache())
    assert hier_row["status"] == "ok"
    # The same function as the flat layer: the base check (fidelity) is exact.
    assert hier_row["fidelity_err"] < 1e-6
    assert hier_row["tokens_per_expert"] == flat_row["tokens_per_expert"]


def test_two_groups_differ_from_the_flat_layer_and_fidelity_says_so():
    row = measure_case(hier_case(), FAST_PLAN, WeightCache())
    assert row["status"] == "ok"
    assert row["rel_err"] < 1e-5
    assert row["fidelity_err"] > 0.05  # another function than the flat top-4 layer


def test_every_token_takes_one_sub_expert_set_inside_its_chosen_groups():
    case = hier_case()
    layer, _, x_TD = _build(case)
    hierarchy = layer.hierarchy
    routing = route_two_levels(
        x_TD.float(), layer.w_primary_DG, layer.router.w_router_DE, layer.router.bias_E, hierarchy
    )
    groups_of_TK = routing.expert_ids_TK // hierarchy.per_group
    for t in range(x_TD.shape[0]):
        chosen = set(routing.group_ids_TA[t].tolist())
        assert set(groups_of_TK[t].tolist()) == chosen
        assert (
            len(set(routing.expert_ids_TK[t].tolist()))
            == hierarchy.group_top_k * hierarchy.sub_top_k
        )
    torch.testing.assert_close(routing.gate_TK.sum(-1), torch.ones(x_TD.shape[0]))
    torch.testing.assert_close(routing.probs_TE.sum(-1), torch.ones(x_TD.shape[0]))


def test_counts_and_balance_on_a_hand_made_routing():
    """All tokens forced to group 3 by the primary router, and inside it to sub-experts
    12 and 13 by the routing bias: the columns follow exactly."""
    options = {"groups": 4, "group_top_k": 1, "sub_top_k": 2}
    case = hier_case(top_k=2, options=options)
    layer, _, x_TD = _build(case)
    x_TD = x_TD.abs()  # positive inputs: a positive primary column wins for every token
    with torch.no_grad():
        layer.w_primary_DG.zero_()
        layer.w_primary_DG[:, 3] = 10.0
        layer.router.bias_E.zero_()
        layer.router.bias_E[12:14] = 50.0
        layer(x_TD)
    stats = layer.stats()
    T = x_TD.shape[0]
    assert stats.tokens_per_expert == [0] * 12 + [T, T] + [0, 0]
    assert stats.imbalance == pytest.approx(8.0)  # max T / mean 2T / 16
    metrics = layer.extra_metrics()
    assert metrics["group_imbalance"] == pytest.approx(4.0)  # T in one of 4 groups
    # Switch loss of a collapsed router: G x f_g x P_g with f = P = 1 on one group.
    assert metrics["group_aux_loss"] == pytest.approx(4.0, rel=1e-3)


def test_primary_router_is_seeded_and_differs_per_layer():
    case = hier_case(layers=2)
    first, _, _ = _build(case)
    again, _, _ = _build(case)
    other_seed, _, _ = _build(case.with_(seed=case.seed + 1))
    w0, w1 = (m.w_primary_DG for m in first.layers)
    assert torch.equal(w0, again.layers[0].w_primary_DG)
    assert not torch.equal(w0, w1)
    assert not torch.equal(w0, other_seed.layers[0].w_primary_DG)


def test_train_step_reaches_both_routers_and_the_experts():
    case = hier_case(mode="train")
    layer, _, x_TD = _build(case)
    layer(x_TD.requires_grad_(True)).square().sum().backward()
    assert isinstance(layer, HierarchicalMoE)
    for name in ("w_primary_DG", "w_gate_EDF", "w_down_EFD"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert layer.router.w_router_DE.grad.abs().sum() > 0


def test_measured_row_has_both_levels_balance():
    row = measure_case(hier_case(), FAST_PLAN, WeightCache())
    assert row["status"] == "ok"
    assert row["group_imbalance"] >= 1.0
    assert row["group_aux_loss"] > 0
    assert sum(row["tokens_per_expert"]) == 32 * 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"groups": 3}, "'groups' must divide num_experts=16"),
        ({"groups": 4, "group_top_k": 5}, "'group_top_k' must be in [1, groups=4]"),
        ({"groups": 4, "group_top_k": 2, "sub_top_k": 5}, "'sub_top_k' must be in [1, 4]"),
        ({"groups": 4, "group_top_k": 2, "sub_top_k": 1}, "must equal top_k=4"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Hierarchy.from_case(hier_case(options=options))
