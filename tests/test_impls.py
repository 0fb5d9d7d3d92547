"""Every built-in computes what it claims, on several shapes and dtypes."""

from __future__ import annotations

import pytest
import torch

from moebench import registry
from moebench.impls.capacity import expert_capacity, slot_positions
from moebench.impls.reference import reference_output
from moebench.measure import counters
from moebench.measure.case_run import TOLERANCE, relative_error
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs
from tests.conftest import tiny_case

EXACT = ["reference", "grouped"]
SHAPES = [
    dict(num_experts=4, top_k=2),
    dict(num_experts=8, top_k=1, hidden=48, ffn=32),
    dict(num_experts=4, top_k=4),  # top_k == num_experts
    dict(num_experts=16, top_k=2, batch=1, seq_len=3),  # most experts get no token
    dict(num_experts=6, top_k=3, shared_experts=2),
]


def _run(impl: str, case) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    weights = make_weights(case)
    layer = registry.get(impl).build(weights, case)
    x = make_inputs(case, 1)[0]
    with torch.no_grad():
        return layer(x), reference_output(weights, x), layer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", [*EXACT, "capacity"])
def test_exact_impls_match_reference(impl, shape, dtype):
    # capacity with a factor large enough to drop nothing is the reference function too
    case = tiny_case(impl, dtype=dtype, capacity_factor=100.0, **shape)
    y, y_ref, _layer = _run(impl, case)
    assert y.dtype == getattr(torch, dtype) and y.shape == y_ref.shape
    assert relative_error(y, y_ref) <= TOLERANCE[dtype]


def test_some_experts_receive_no_token():
    case = tiny_case("grouped", num_experts=16, top_k=1, batch=1, seq_len=2)
    y, y_ref, layer = _run("grouped", case)
    stats = layer.stats()
    assert stats.experts_used <= 2 and stats.tokens_per_expert.count(0) >= 14
    assert relative_error(y, y_ref) <= TOLERANCE["float32"]


def test_train_mode_gradients_match_reference():
    case = tiny_case("grouped", mode="train", shared_experts=1)
    weights = make_weights(case)
    grads = {}
    for impl in [*EXACT, "capacity"]:
        layer = registry.get(impl).build(weights, case.with_(impl=impl, shape=case.shape))
        x = make_inputs(case, 1)[0].requires_grad_(True)
        layer(x).square().sum().backward()
        grads[impl] = x.grad
    for impl in ("grouped",):
        assert relative_error(grads[impl], grads["reference"]) < 1e-4


def test_capacity_drops_exactly_what_it_reports():
    case = tiny_case("capacity", num_experts=4, top_k=2, capacity_factor=0.5, batch=4)
    weights = make_weights(case.with_(routing="hot:1:0.9"))
    case = case.with_(routing="hot:1:0.9")
    layer = registry.get("capacity").build(weights, case)
    x = make_inputs(case, 1)[0]
    with torch.no_grad():
        y = layer(x)
    stats = layer.stats()
    dropped_TK = layer._last_dropped_TK
    capacity = expert_capacity(case.tokens, 2, 4, 0.5)
    assert stats.dropped_slots == int(dropped_TK.sum()) > 0
    assert max(stats.tokens_per_expert) <= capacity
    assert sum(stats.tokens_per_expert) + stats.dropped_slots == case.tokens * 2
    # the output is the reference with exactly the reported assignments removed
    expected = reference_output(weights, x, keep_TK=~dropped_TK)
    assert relative_error(y, expected) < 1e-5
    assert relative_error(y, reference_output(weights, x)) > 1e-3


def test_slot_positions_give_first_choices_priority():
    ids_TK = torch.tensor([[0, 1], [1, 0], [0, 1]])
    pos_TK = slot_positions(ids_TK, 2)
    # first choices: token0->e0 pos0, token1->e1 pos0, token2->e0 pos1; second choices after
    assert pos_TK.tolist() == [[0, 1], [0, 2], [1, 2]]


def test_dense_has_the_active_parameters_of_the_moe():
    case = tiny_case("dense", num_experts=8, top_k=2, shared_experts=1)
    layer = registry.get("dense").build(make_weights(case), case)
    counts = counters.param_counts(case, layer, None)
    assert counts.total == counts.active == counts.touched == (2 + 1) * case.shape.expert_params
    assert counts.router == 0


@pytest.mark.parametrize("routing", ["zipf:1.5", "hot:1:0.8"])
def test_skewed_routing_is_real_and_reproducible(routing):
    case = tiny_case("grouped", num_experts=8, top_k=1, batch=32, seq_len=16, routing=routing)
    _, _, layer = _run("grouped", case)
    skewed = layer.stats()
    _, _, uniform_layer = _run("grouped", case.with_(routing="uniform"))
    assert skewed.imbalance > uniform_layer.stats().imbalance
    _, _, again = _run("grouped", case)
    assert again.stats().tokens_per_expert == skewed.tokens_per_expert


def test_aux_loss_is_one_for_perfect_balance():
    from moebench.routing import switch_aux_loss

    ids = torch.arange(8).view(8, 1) % 4
    probs = torch.full((8, 4), 0.25)
    assert float(switch_aux_loss(probs, ids, 4)) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", ["zipf", "zipf:-1", "hot:0:0.5", "hot:2:1.5", "trace", "zipf:x"])
def test_bad_routing_names_the_allowed_forms(bad):
    from moebench.routing import RoutingSpecError, routing_prior

    with pytest.raises(RoutingSpecError, match="allowed"):
        routing_prior(bad, 8)


@pytest.mark.parametrize("impl", ["reference", "grouped", "capacity", "dense"])
def test_stacked_layers_run_and_count(tmp_path, impl):
    from moebench.runner import run_cases
    from moebench.store import read_run
    from tests.conftest import FAST_PLAN

    one, three = (
        tiny_case(impl),
        tiny_case(impl).with_(
            workload=tiny_case(impl).workload.__class__(2, 8, "forward", layers=3)
        ),
    )
    assert "L3" in three.label() and one.case_id != three.case_id
    outcome = run_cases(
        [one, three], suite_name="t", plan=FAST_PLAN, timeout_s=60, out_root=tmp_path, isolate=False
    )
    frame = read_run(outcome.results_path).set_index("layers")
    assert set(frame["status"]) == {"ok"}, frame["error"].tolist()
    assert frame.loc[3, "total_params"] == 3 * frame.loc[1, "total_params"]
    assert frame.loc[3, "flops"] == 3 * frame.loc[1, "flops"]
    if impl != "dense":  # every (token, slot) of every layer is either computed or dropped
        for layers in (1, 3):
            row = frame.loc[layers]
            slots = row["tokens"] * row["top_k"] * layers
            kept = sum(row["tokens_per_expert"])
            assert kept + round(row["dropped_frac"] * slots) == slots


def test_stack_matches_its_reference_and_layers_differ():
    from moebench.impls.reference import reference_stack_output
    from moebench.layer import Stack
    from moebench.weight_sources import make_weights

    case = tiny_case("grouped")
    weights = [make_weights(case, i) for i in range(3)]
    assert not torch.equal(weights[0].w_gate_EDF, weights[1].w_gate_EDF)
    stack = Stack([registry.get("grouped").build(w, case) for w in weights])
    x = make_inputs(case, 1)[0]
    with torch.no_grad():
        assert relative_error(stack(x), reference_stack_output(weights, x)) < 1e-5


def test_case_id_is_unchanged_by_the_layers_field_at_its_default():
    # pinned: ids of runs made before `layers` existed must still match
    assert tiny_case("grouped").case_id == "ea4a1ce5a8710a97"


def test_stack_combines_design_metrics():
    from moebench.layer import Stack

    class Fake(torch.nn.Module):
        def __init__(self, frac, nbytes):
            super().__init__()
            self.metrics = {"x_hit_rate": frac, "x_h2d_bytes": nbytes, "x_per_expert": [1, 2]}

        def extra_metrics(self):
            return self.metrics

    combined = Stack([Fake(0.5, 10), Fake(1.0, 30)]).extra_metrics()
    assert combined == {"x_hit_rate": 0.75, "x_h2d_bytes": 40, "x_per_expert": [2, 4]}


def test_weights_are_drawn_once_for_a_top_k_and_capacity_sweep(monkeypatch):
    from moebench.measure import case_run

    drawn = []
    real = case_run.make_weights
    monkeypatch.setattr(case_run, "make_weights", lambda c, i=0: drawn.append(c) or real(c, i))
    cache = case_run.WeightCache()
    first = cache.get(tiny_case("grouped", top_k=1))
    second = cache.get(tiny_case("capacity", top_k=2, capacity_factor=0.5))
    assert len(drawn) == 1
    assert second[0].w_gate_EDF is first[0].w_gate_EDF
    assert (first[0].shape.top_k, second[0].shape.top_k) == (1, 2)
    cache.get(tiny_case("grouped", num_experts=8))
    assert len(drawn) == 2


@pytest.mark.parametrize("impl", ["reference", "grouped", "capacity", "moepp", "topp"])
def test_leading_dimensions_are_flattened_and_shaped_back(impl):
    """Batch x sequence x hidden gives what the flattened tokens give, shaped back."""
    case = tiny_case(impl, capacity_factor=100.0)
    weights = make_weights(case)
    layer = registry.get(impl).build(weights, case)
    x_TD = make_inputs(case, 1)[0]
    with torch.no_grad():
        y_TD = layer(x_TD)
        y_BSD = layer(x_TD.reshape(2, -1, x_TD.shape[1]))
    assert y_BSD.shape == (2, x_TD.shape[0] // 2, x_TD.shape[1])
    torch.testing.assert_close(y_BSD.reshape(y_TD.shape), y_TD)


@pytest.mark.parametrize("shape", [(8,), (8, 31), (2, 4, 33)], ids=str)
def test_input_of_another_width_names_its_shape(shape):
    case = tiny_case("grouped")
    layer = registry.get("grouped").build(make_weights(case), case)
    with pytest.raises(ValueError, match=rf"hidden = 32.*got shape \({shape[0]},"):
        layer(torch.randn(*shape))
