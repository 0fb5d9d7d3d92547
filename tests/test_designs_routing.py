"""The routing designs from the literature (issue 6): deepseek, moepp, dsmoe, topp.

Each layer is checked against its plain design reference, the edge cases that define the
design are forced on tiny CPU cases, the design metrics are read through the layer API
(`extra_metrics`), one case per design runs end to end through the runner, and the
shipped suites parse.

Shape legend: T tokens, D hidden, E routed experts, K top_k, N all MoE++ experts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moebench import registry
from moebench.case import Case, Workload

# Importing the design modules registers them (whether or not BUILTIN_MODULES has them).
from moebench.impls import deepseek, dsmoe, moepp, topp  # noqa: F401
from moebench.impls.reference import reference_output, reference_stack_output
from moebench.layer import Stack, swiglu
from moebench.measure import counters
from moebench.measure.case_run import relative_error
from moebench.weight_sources import make_weights
from moebench.weights import ExpertWeights, make_inputs
from tests.conftest import FAST_PLAN, tiny_case

REPO = Path(__file__).resolve().parents[1]
DESIGNS = ("moepp", "dsmoe", "topp")  # variants with a design reference of their own


def _router(case: Case, **fields) -> Case:
    """`case` with router-convention fields of its LayerShape changed."""
    return case.with_(shape=replace(case.shape, **fields))


def _stacked(case: Case, layers: int) -> Case:
    w = case.workload
    return case.with_(workload=Workload(w.batch, w.seq_len, w.mode, layers=layers))


def _build(case: Case) -> tuple[torch.nn.Module, list[ExpertWeights], torch.Tensor]:
    """(layer or Stack, weights per layer, input) as measure_case builds them."""
    weights = [make_weights(case, i) for i in range(case.workload.layers)]
    build = registry.get(case.impl).build
    layer = (
        build(weights[0], case) if len(weights) == 1 else Stack([build(w, case) for w in weights])
    )
    return layer, weights, make_inputs(case, 1)[0]


def _design_error(case: Case) -> float:
    """Relative error of the layer against its own design reference."""
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        y_TD = layer(x_TD)
    return relative_error(y_TD, registry.get(case.impl).reference(weights, x_TD, case))


def _dense_moe(weights: ExpertWeights, x_TD: torch.Tensor, gate_TE: torch.Tensor) -> torch.Tensor:
    """sum_e gate_TE[:, e] * expert_e(x) + shared, float64, written out in full."""
    x64_TD = x_TD.double()
    y_TD = torch.zeros_like(x64_TD)
    for e in range(weights.shape.num_experts):
        out = swiglu(
            x64_TD,
            weights.w_gate_EDF[e].double(),
            weights.w_up_EDF[e].double(),
            weights.w_down_EFD[e].double(),
        )
        y_TD += gate_TE[:, e, None].double() * out
    if weights.w_shared_gate_DS is not None:
        y_TD += swiglu(
            x64_TD,
            weights.w_shared_gate_DS.double(),
            weights.w_shared_up_DS.double(),
            weights.w_shared_down_SD.double(),
        )
    return y_TD


def test_designs_are_registered_as_variants_with_references():
    # deepseek computes the case's router convention, which the reference computes too
    assert registry.get("deepseek").exact and registry.get("deepseek").reference is None
    for name, options in [
        (
            "moepp",
            {"zero_experts", "copy_experts", "const_experts", "router", "scale_inputs", "tau"},
        ),
        ("dsmoe", {"sparse", "threshold"}),
        ("topp", {"p"}),
    ]:
        info = registry.get(name)
        assert not info.exact and info.reference is not None
        assert set(info.options) == options


# ------------------------------------------------------------------ every design


DESIGN_CASES = [
    ("moepp", ()),
    ("moepp", (("const_experts", 0), ("copy_experts", 0), ("zero_experts", 3))),
    ("dsmoe", ()),
    ("dsmoe", (("threshold", 0.26),)),
    ("dsmoe", (("sparse", "topk"),)),
    ("topp", ()),
    ("topp", (("p", 0.8),)),
]


@pytest.mark.parametrize(("impl", "options"), DESIGN_CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_each_design_matches_its_reference(impl, options, dtype, mode):
    case = tiny_case(impl, options=options, dtype=dtype, mode=mode, shared_experts=1)
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    assert _design_error(case) < tolerance


@pytest.mark.parametrize("impl", DESIGNS)
def test_stacked_designs_match_their_reference(impl):
    case = _stacked(tiny_case(impl, shared_experts=1), 3)
    assert _design_error(case) < 1e-5


@pytest.mark.parametrize("impl", (*DESIGNS, "deepseek"))
def test_train_mode_backward_reaches_every_parameter_in_use(impl):
    case = tiny_case(impl, mode="train", batch=8)
    layer, _, x_TD = _build(case)
    layer(x_TD.requires_grad_(True)).backward(torch.randn_like(x_TD))
    assert x_TD.grad is not None and torch.isfinite(x_TD.grad).all()
    assert layer.w_gate_EDF.grad is not None and layer.w_gate_EDF.grad.abs().sum() > 0


# ------------------------------------------------------------------ deepseek


@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deepseek_softmax_without_groups_is_the_base_function(shared, dtype):
    case = tiny_case("deepseek", num_experts=8, top_k=3, shared_experts=shared, dtype=dtype)
    layer, weights, x_TD = _build(case)
    grouped = registry.get("grouped").build(weights[0], case.with_(impl="grouped"))
    with torch.no_grad():
        y_TD = layer(x_TD)
        assert torch.equal(y_TD, grouped(x_TD))  # the same router bit for bit
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    assert relative_error(y_TD, reference_output(weights[0], x_TD)) < tolerance


V3_STYLE = {"scoring": "sigmoid", "n_groups": 2, "topk_groups": 1, "routed_scaling": 2.5}


@pytest.mark.parametrize("impl", ["deepseek", "grouped", "capacity", "offload"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_a_deepseek_style_router_is_computed_by_every_exact_layer(impl, dtype, mode):
    if impl == "offload" and mode == "train":
        pytest.skip("offload is forward-only")
    case = _router(tiny_case(impl, dtype=dtype, mode=mode, shared_experts=1), **V3_STYLE)
    case = case.with_(shape=replace(case.shape, capacity_factor=8.0))  # nothing dropped
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        y_TD = layer(x_TD)
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    assert relative_error(y_TD, reference_output(weights[0], x_TD)) < tolerance
    base = replace(weights[0], shape=tiny_case(shared_experts=1).shape)
    assert relative_error(y_TD, reference_output(base, x_TD)) > 0.1


def test_a_stacked_deepseek_style_router_matches_the_reference():
    case = _stacked(_router(tiny_case("deepseek", shared_experts=1), **V3_STYLE), 3)
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        assert relative_error(layer(x_TD), reference_stack_output(weights, x_TD)) < 1e-5


def test_deepseek_group_limited_routing_picks_only_inside_the_best_groups():
    case = tiny_case("deepseek", num_experts=16, top_k=4, batch=8)
    case = _router(case, scoring="sigmoid", n_groups=4, topk_groups=2)
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        layer(x_TD)
    expert_ids_TK = layer._last[0]
    scores_TE = torch.sigmoid(x_TD.float() @ weights[0].w_router_DE + weights[0].router_bias_E)
    for t in range(x_TD.shape[0]):
        group_scores = [
            sorted(scores_TE[t, 4 * g : 4 * g + 4].tolist(), reverse=True)[:2] for g in range(4)
        ]
        best = sorted(range(4), key=lambda g: -sum(group_scores[g]))[:2]
        allowed = {e for g in best for e in range(4 * g, 4 * g + 4)}
        chosen = set(expert_ids_TK[t].tolist())
        assert chosen <= allowed
        # ... and they are the top-4 scores among the allowed experts
        top_allowed = sorted(allowed, key=lambda e: -scores_TE[t, e])[:4]
        assert chosen == set(top_allowed)
    metrics = layer.extra_metrics()
    assert 1.0 <= metrics["deepseek_groups_per_token"] <= 2.0


def test_deepseek_sigmoid_gates_are_normalised_scores_times_the_scaling():
    case = _router(tiny_case("deepseek", num_experts=8, top_k=2), **V3_STYLE)
    case = _router(case, n_groups=1, topk_groups=0)
    layer, weights, x_TD = _build(case)
    gate_TK, expert_ids_TK, probs_TE = layer.router(x_TD)
    assert torch.allclose(gate_TK.sum(dim=-1), torch.full((x_TD.shape[0],), 2.5))
    scores_TE = torch.sigmoid(x_TD @ weights[0].w_router_DE + weights[0].router_bias_E)
    chosen_TK = scores_TE.gather(1, expert_ids_TK)
    assert torch.allclose(gate_TK, 2.5 * chosen_TK / chosen_TK.sum(-1, keepdim=True))
    assert torch.allclose(probs_TE.sum(dim=-1), torch.ones(x_TD.shape[0]))


def test_deepseek_correction_bias_steers_selection_not_gate_weights():
    case = tiny_case("deepseek", num_experts=8, top_k=2)
    case = _router(case, scoring="sigmoid", correction_bias=True)
    layer, weights, x_TD = _build(case)
    assert torch.equal(weights[0].correction_bias_E, torch.zeros(8))  # random: untrained
    layer.router.correction_bias_E[5] = 10.0  # expert 5 always chosen ...
    gate_TK, expert_ids_TK, _ = layer.router(x_TD)
    assert (expert_ids_TK[:, 0] == 5).all()
    scores_TE = torch.sigmoid(x_TD @ weights[0].w_router_DE + weights[0].router_bias_E)
    chosen_TK = scores_TE.gather(1, expert_ids_TK)  # ... but weighted by its own score
    assert torch.allclose(gate_TK, chosen_TK / chosen_TK.sum(-1, keepdim=True))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_groups": 3}, "n_groups: 3 must be >= 1 and divide num_experts=4"),
        ({"n_groups": 2, "topk_groups": 3}, "topk_groups: 3 must be in 0..n_groups=2"),
        ({"n_groups": 4, "topk_groups": 1}, "topk_groups: 1 groups x 1 experts per group <"),
        ({"scoring": "tanh"}, "scoring: 'tanh' not one of 'softmax', 'sigmoid'"),
        ({"routed_scaling": 0}, "routed_scaling: must be > 0"),
    ],
)
def test_bad_router_conventions_name_the_key(fields, message):
    case = _router(tiny_case("deepseek"), **fields)
    assert message.split(":")[0] in {key for key, _ in case.shape.problems()}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _build(case)


# ------------------------------------------------------------------ moepp


def _force(layer: moepp.MoEPPLayer, first: int, count: int) -> None:
    """Route every token's slots to experts [first, first + count) of all N."""
    layer.router.bias_N[first : first + count] = 1e4


def test_moepp_all_slots_to_zero_experts_output_zero_and_stack_passes_x_through():
    options = (("zero_experts", 2),)
    case = tiny_case("moepp", options=options)
    layer, _, x_TD = _build(case)
    _force(layer, case.shape.num_experts, 2)
    with torch.no_grad():
        assert torch.equal(layer(x_TD), torch.zeros_like(x_TD))
    metrics = layer.extra_metrics()
    assert metrics["moepp_zc_slot_frac"] == metrics["moepp_zero_slot_frac"] == 1.0
    assert metrics["moepp_token_skip_frac"] == 1.0
    assert metrics["moepp_ffn_experts_per_token"] == 0.0
    assert sum(layer.stats().tokens_per_expert) == 0
    counts = counters.param_counts(case, layer, layer.stats())
    # no FFN expert active or touched: the router only (no constant expert was chosen)
    D, N = case.shape.hidden, case.shape.num_experts + 2 + 1 + 2
    router = D * 8 * N + 8 * N * N  # two layers: D x 8N, 8N x N
    assert counts.active == counts.touched == counts.router == router
    assert counts.total == 4 * case.shape.expert_params + router + N * N + 2 * 3 * D

    stack, _, x_TD = _build(_stacked(case, 2))
    for each in stack.layers:
        _force(each, case.shape.num_experts, 2)
    with torch.no_grad():
        assert torch.equal(stack(x_TD), x_TD)  # residual: every token passes through


@pytest.mark.parametrize(("scale_inputs", "factor"), [(True, 2.0), (False, 1.0)])
def test_moepp_copy_experts_return_their_input_x_times_top_k(scale_inputs, factor):
    options = (("copy_experts", 2), ("scale_inputs", scale_inputs))
    case = tiny_case("moepp", options=options)  # top_k 2
    layer, _, x_TD = _build(case)
    E, Z = case.shape.num_experts, 1
    _force(layer, E + Z, 2)
    with torch.no_grad():
        torch.testing.assert_close(layer(x_TD), x_TD * factor)
    assert layer.extra_metrics()["moepp_copy_slot_frac"] == 1.0


def test_moepp_constant_expert_mixes_input_and_its_vector():
    case = tiny_case("moepp", top_k=1)
    layer, _, x_TD = _build(case)
    const = 4 + 1 + 1 + 1  # the second constant expert (E=4, Z=1, C=1)
    _force(layer, const, 1)
    with torch.no_grad():
        a_T2 = torch.softmax(x_TD @ layer.const_gate_QD2[1], dim=-1)
        expected_TD = a_T2[:, :1] * x_TD + a_T2[:, 1:] * layer.const_value_QD[1]
        torch.testing.assert_close(layer(x_TD), expected_TD)


def test_moepp_gating_residual_carries_scores_between_layers():
    case = _stacked(tiny_case("moepp", batch=8), 2)
    stack, _, x_TD = _build(case)
    first, second = stack.layers
    with torch.no_grad():
        y_TD, carry_TN = first.forward_with_carry(x_TD, None)
        assert carry_TN.shape == (x_TD.shape[0], 4 + 1 + 1 + 2)
        assert torch.equal(y_TD, first(x_TD))
        x2_TD = x_TD + y_TD
        with_residual = second.forward_with_carry(x2_TD, carry_TN)[0]
        assert not torch.equal(with_residual, second(x2_TD))  # the carry changes routing
        assert torch.equal(stack(x_TD), x2_TD + with_residual)
    # and the residual projection learns: the second layer's W_g gets a gradient
    train = _stacked(tiny_case("moepp", batch=8, mode="train"), 2)
    stack, _, x_TD = _build(train)
    stack(x_TD).pow(2).sum().backward()
    assert stack.layers[1].router.w_residual_NN.grad.abs().sum() > 0
    assert stack.layers[0].router.w_residual_NN.grad is None  # first layer: no residual


def test_moepp_metrics_add_up():
    case = tiny_case("moepp", batch=16, options=(("zero_experts", 3),))
    layer, _, x_TD = _build(case)
    with torch.no_grad():
        layer(x_TD)
    m = layer.extra_metrics()
    assert set(m) == {
        "moepp_zc_slot_frac",
        "moepp_zero_slot_frac",
        "moepp_copy_slot_frac",
        "moepp_const_slot_frac",
        "moepp_token_skip_frac",
        "moepp_ffn_experts_per_token",
        "hetero_balance_loss",
    }
    assert 0 < m["moepp_zc_slot_frac"] < 1
    assert m["moepp_zc_slot_frac"] == pytest.approx(
        m["moepp_zero_slot_frac"] + m["moepp_copy_slot_frac"] + m["moepp_const_slot_frac"]
    )
    stats = layer.stats()
    slots = case.tokens * case.shape.top_k
    assert sum(stats.tokens_per_expert) == round((1 - m["moepp_zc_slot_frac"]) * slots)
    assert m["moepp_ffn_experts_per_token"] == pytest.approx(
        sum(stats.tokens_per_expert) / case.tokens
    )
    assert m["moepp_token_skip_frac"] <= m["moepp_zc_slot_frac"]


def test_moepp_parameters_are_reproducible_seeded_and_drawn_per_layer():
    case = tiny_case("moepp")
    options = moepp.MoEPPOptions.from_case(case)
    cpu = torch.device("cpu")
    a, b = (moepp.moepp_params(case, options, cpu) for _ in range(2))
    assert torch.equal(a.w_residual_NN, b.w_residual_NN)
    assert torch.equal(a.w_hidden_DH, b.w_hidden_DH) and a.w_router_DX is None
    other = moepp.moepp_params(case.with_(seed=1), options, cpu)
    assert not torch.equal(a.w_hidden_DH, other.w_hidden_DH)
    layer1 = moepp.moepp_params(case, options, cpu, layer=1)
    for name in ("w_hidden_DH", "w_out_HN", "w_residual_NN", "const_value_QD"):
        assert not torch.equal(getattr(a, name), getattr(layer1, name)), name
    assert float(a.w_hidden_DH.std()) == pytest.approx(case.router_scale, rel=0.3)
    linear = moepp.MoEPPOptions.from_case(case.with_(options=(("router", "linear"),)))
    assert moepp.moepp_params(case, linear, cpu).w_hidden_DH is None
    # a stack's layers hold different MoE++ parameters
    stack, _, _ = _build(_stacked(case, 2))
    first, second = stack.layers
    assert not torch.equal(first.router.w_hidden_DH, second.router.w_hidden_DH)
    assert not torch.equal(first.const_value_QD, second.const_value_QD)


# ------------------------------------------------------------------ dsmoe


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_dsmoe_threshold_zero_is_the_dense_all_experts_function(mode):
    case = tiny_case("dsmoe", mode=mode, shared_experts=1, options=(("threshold", 0.0),))
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        y_TD = layer(x_TD)
    probs_TE = torch.softmax(x_TD @ weights[0].w_router_DE + weights[0].router_bias_E, -1)
    assert relative_error(y_TD, _dense_moe(weights[0], x_TD, probs_TE)) < 1e-5
    metrics = layer.extra_metrics()
    assert metrics["dsmoe_experts_per_token"] == case.shape.num_experts
    assert metrics["dsmoe_experts_per_token_std"] == 0.0
    assert metrics["dsmoe_sparse_err"] == 0.0
    assert layer.stats().tokens_per_expert == [case.tokens] * case.shape.num_experts


def test_dsmoe_training_is_dense_whatever_the_inference_rule():
    sparse = (("threshold", 0.3),)
    train = tiny_case("dsmoe", mode="train", options=sparse)
    dense = tiny_case("dsmoe", mode="forward", options=(("threshold", 0.0),))
    (layer_t, _, x_TD), (layer_d, _, _) = _build(train), _build(dense)
    with torch.no_grad():
        torch.testing.assert_close(layer_t(x_TD), layer_d(x_TD))
    # ... and its sparse_err still says what the rule would cost at inference
    inference, _, _ = _build(tiny_case("dsmoe", options=sparse))
    with torch.no_grad():
        inference(x_TD)
    assert layer_t.extra_metrics()["dsmoe_sparse_err"] == pytest.approx(
        inference.extra_metrics()["dsmoe_sparse_err"]
    )


def test_dsmoe_threshold_keeps_experts_above_it_and_at_least_the_best():
    case = tiny_case("dsmoe", batch=16, options=(("threshold", 0.26),))
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        y_TD = layer(x_TD)
    probs_TE = torch.softmax(x_TD @ weights[0].w_router_DE + weights[0].router_bias_E, -1)
    mask_TE = probs_TE > 0.26
    mask_TE[torch.arange(case.tokens), probs_TE.argmax(-1)] = True
    assert (~mask_TE).sum() > 0 and mask_TE.sum() > case.tokens  # the rule bites, varies
    gate_TE = probs_TE * mask_TE  # the dense weights, not renormalised
    assert relative_error(y_TD, _dense_moe(weights[0], x_TD, gate_TE)) < 1e-5
    m = layer.extra_metrics()
    counts_T = mask_TE.sum(-1).double()
    assert m["dsmoe_experts_per_token"] == pytest.approx(float(counts_T.mean()))
    assert m["dsmoe_experts_per_token_std"] == pytest.approx(float(counts_T.std(correction=0)))
    assert m["dsmoe_active_params_per_token_std"] == pytest.approx(
        m["dsmoe_experts_per_token_std"] * case.shape.expert_params
    )
    dense_TD = _dense_moe(weights[0], x_TD, probs_TE)
    assert m["dsmoe_sparse_err"] == pytest.approx(relative_error(y_TD, dense_TD), rel=1e-4)
    dense_case = tiny_case("dsmoe", mode="train")
    dense = registry.get("dsmoe").build(weights[0], dense_case)
    with torch.no_grad():
        dense(x_TD)
    sparse_active = counters.param_counts(case, layer, layer.stats()).active
    dense_active = counters.param_counts(dense_case, dense, dense.stats()).active
    assert (
        sparse_active
        < dense_active
        == case.shape.num_experts * case.shape.expert_params + (case.shape.router_params)
    )


def test_dsmoe_topk_runs_top_k_experts_weighted_by_their_probabilities():
    case = tiny_case("dsmoe", options=(("sparse", "topk"),))
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        y_TD = layer(x_TD)
    probs_TE = torch.softmax(x_TD @ weights[0].w_router_DE + weights[0].router_bias_E, -1)
    top_TK = probs_TE.topk(2, dim=-1).indices
    gate_TE = torch.zeros_like(probs_TE).scatter(1, top_TK, probs_TE.gather(1, top_TK))
    assert relative_error(y_TD, _dense_moe(weights[0], x_TD, gate_TE)) < 1e-5
    assert layer.extra_metrics()["dsmoe_experts_per_token"] == 2.0


@pytest.mark.parametrize(
    "options", [(("sparse", "all"),), (("threshold", -0.1),), (("threshold", 1.0),)]
)
def test_dsmoe_bad_options(options):
    with pytest.raises(ValueError, match="dsmoe option"):
        _build(tiny_case("dsmoe", options=options))


# ------------------------------------------------------------------ topp


def test_top_p_mask_takes_the_fewest_experts_reaching_p():
    probs_TE = torch.tensor(
        [[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.97, 0.01, 0.01, 0.01]]
    )
    assert topp.top_p_mask(probs_TE, 0.5).tolist() == [
        [True, True, False, False],  # mass 0.5 is not more than p: one more expert
        [False, False, True, True],
        [True, False, False, False],
    ]
    assert topp.top_p_mask(probs_TE, 0.81).sum(-1).tolist() == [3, 3, 1]
    assert topp.top_p_mask(probs_TE, 1.0).all()
    assert topp.top_p_mask(probs_TE, 1e-6).sum(-1).tolist() == [1, 1, 1]


@pytest.mark.parametrize(("p", "experts"), [(1.0, 8), (1e-6, 1)])
def test_topp_extremes_use_all_experts_or_one(p, experts):
    case = tiny_case("topp", num_experts=8, options=(("p", p),))
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        y_TD = layer(x_TD)
    metrics = layer.extra_metrics()
    assert metrics["topp_experts_mean"] == experts and metrics["topp_experts_std"] == 0.0
    assert sum(layer.stats().tokens_per_expert) == experts * case.tokens
    probs_TE = torch.softmax(x_TD @ weights[0].w_router_DE + weights[0].router_bias_E, -1)
    if experts == 1:  # top-1: the best expert at its raw probability (not renormalised)
        best_T1 = probs_TE.argmax(-1, keepdim=True)
        gate_TE = torch.zeros_like(probs_TE).scatter(1, best_T1, probs_TE.gather(1, best_T1))
    else:  # every expert, the full softmax
        gate_TE = probs_TE
    assert relative_error(y_TD, _dense_moe(weights[0], x_TD, gate_TE)) < 1e-5


def test_topp_varies_experts_per_token_and_is_minimal():
    case = tiny_case("topp", hidden=256, num_experts=8, batch=16, options=(("p", 0.6),))
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        layer(x_TD)
    probs_TE = torch.softmax(x_TD @ weights[0].w_router_DE + weights[0].router_bias_E, -1)
    mask_TE = topp.top_p_mask(probs_TE, 0.6)
    for t in range(case.tokens):
        kept = sorted(probs_TE[t][mask_TE[t]].tolist(), reverse=True)
        assert sum(kept) > 0.6 - 1e-6 and sum(kept[:-1]) <= 0.6 + 1e-6
    m = layer.extra_metrics()
    counts_T = mask_TE.sum(-1).double()
    assert m["topp_experts_std"] > 0  # the router is sure of some tokens, not of others
    assert m["topp_experts_mean"] == pytest.approx(float(counts_T.mean()))
    active = counters.param_counts(case, layer, layer.stats()).active
    router = case.shape.router_params
    assert active == round(m["topp_experts_mean"] * case.shape.expert_params) + router


def test_topp_with_top_k_experts_per_token_is_the_base_selection_unrenormalised():
    # a near-uniform router over 4 experts: p = 0.4 takes exactly two per token
    case = tiny_case("topp", num_experts=4, top_k=2, options=(("p", 0.4),))
    layer, weights, x_TD = _build(case)
    with torch.no_grad():
        y_TD = layer(x_TD)
    m = layer.extra_metrics()
    assert m["topp_experts_mean"] == 2.0 and m["topp_experts_std"] == 0.0
    probs_TE = torch.softmax(x_TD @ weights[0].w_router_DE + weights[0].router_bias_E, -1)
    top_TK, ids_TK = probs_TE.topk(2, dim=-1)
    gate_TE = torch.zeros_like(probs_TE).scatter(1, ids_TK, top_TK)  # raw, sums to < 1
    assert relative_error(y_TD, _dense_moe(weights[0], x_TD, gate_TE)) < 1e-5
    assert relative_error(y_TD, reference_output(weights[0], x_TD)) > 0.1  # renormalised


def test_topp_bad_p():
    with pytest.raises(ValueError, match="'p' must be in"):
        _build(tiny_case("topp", options=(("p", 0.0),)))


# ------------------------------------------------------------------ end to end, suites


def test_each_design_runs_end_to_end(tmp_path):
    from moebench.runner import run_cases
    from moebench.store import read_run

    cases = [
        _stacked(tiny_case("moepp"), 2),
        tiny_case("dsmoe", options=(("threshold", 0.26),)),
        tiny_case("dsmoe", mode="train"),
        tiny_case("topp", options=(("p", 0.7),)),
    ]
    outcome = run_cases(
        cases, suite_name="t", plan=FAST_PLAN, timeout_s=60, out_root=tmp_path, isolate=False
    )
    frame = read_run(outcome.results_path)
    assert len(frame) == len(cases)
    assert set(frame["status"]) == {"ok"}, frame["error"].tolist()
    assert (frame["rel_err"] <= frame["tolerance"]).all()
    assert (frame["fidelity_err"] > 0).all()  # every one of these changes the function
    assert (frame["active_params"] > 0).all() and (frame["latency_ms"] > 0).all()
    # each design's loss is a column, filled for its own rows only
    for column, impl in [
        ("hetero_balance_loss", "moepp"),
        ("mi_loss", "dsmoe"),
        ("dynamic_loss", "topp"),
    ]:
        mine = frame["impl"] == impl
        assert frame.loc[mine, column].notna().all() and frame.loc[~mine, column].isna().all()
    assert (frame.loc[frame["impl"] == "dsmoe", "mi_loss"] < 0).all()  # -H(e) dominates


SUITES = ["deepseek", "moepp", "dsmoe", "topp", "switch"]


@pytest.mark.parametrize("name", SUITES)
def test_suites_parse_on_cpu(name):
    from moebench.suite import load_suite

    suite = load_suite(REPO / "suites" / f"{name}.toml", device="cpu")
    assert suite.name == name
    impls = set(suite.impls)
    assert "grouped" in impls and len(impls) == 2
    assert all(c.dtype == "float32" and c.tokens <= 256 for c in suite.cases)


@pytest.mark.parametrize("first", ["moebench.impls.topp", "moebench.impls.moepp"])
def test_designs_import_in_any_order_once_they_are_builtins(first):
    # importing grouped for the first time runs load_all, which imports the other designs
    # while `first` is half-imported: the shared pieces must already be defined in topp
    import subprocess
    import sys

    script = (
        "import importlib, moebench.registry as r\n"
        "r.BUILTIN_MODULES += tuple('moebench.impls.' + m for m in "
        "('deepseek', 'moepp', 'dsmoe', 'topp'))\n"
        f"importlib.import_module({first!r})\n"
        "assert {'deepseek', 'moepp', 'dsmoe', 'topp'} <= set(r.available()), r.broken()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
