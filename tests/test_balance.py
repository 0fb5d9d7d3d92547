"""Balance and router realism: imbalance as the router's demand (before drops) and as
served (after), a stack's mean and worst layer, experts per token, routing entropy, the
router_scale case field, and routers that do not share memory with the weight set."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moebench import registry
from moebench.case import Case
from moebench.compare.runs import impl_key
from moebench.impls.capacity import expert_capacity
from moebench.impls.reference import reference_output
from moebench.layer import balance_columns, routing_stats
from moebench.measure.case_run import WeightCache, measure_case
from moebench.runner import run_cases
from moebench.store import read_run
from moebench.suite import SuiteError, parse_suite
from moebench.weight_sources import make_weights
from moebench.weights import ExpertWeights, make_inputs
from tests.conftest import FAST_PLAN, tiny_case, tiny_suite_toml


def _probs(weights: ExpertWeights, x_TD: torch.Tensor) -> torch.Tensor:
    """The base router's distribution, float32, written out."""
    logits_TE = x_TD.float() @ weights.w_router_DE.float() + weights.router_bias_E.float()
    return torch.softmax(logits_TE, dim=-1)


def _max_over_mean(counts_E: torch.Tensor) -> float:
    return float(counts_E.max() / counts_E.double().mean())


def _entropy(probs_TE: torch.Tensor) -> float:
    p = probs_TE.double()
    return float(-(p * p.log()).sum(dim=-1).mean())


# ----------------------------------------------------------------- demand and served


def test_capacity_imbalance_is_the_routers_demand_and_served_is_after_drops():
    case = tiny_case("capacity", num_experts=4, top_k=2, capacity_factor=0.5, batch=4,
                     routing="hot:1:0.9")  # fmt: skip
    weights = make_weights(case)
    x_TD = make_inputs(case, 1)[0]
    ids_TK = _probs(weights, x_TD).topk(2, dim=-1).indices
    demand_E = torch.bincount(ids_TK.flatten(), minlength=4)
    capacity = expert_capacity(case.tokens, 2, 4, 0.5)
    served_E = demand_E.clamp(max=capacity)  # each expert keeps its first C assignments
    assert (served_E < demand_E).any()  # the case drops

    cache = WeightCache()
    row = measure_case(case, FAST_PLAN, cache)
    grouped = measure_case(case.with_(impl="grouped"), FAST_PLAN, cache)
    assert row["imbalance"] == pytest.approx(_max_over_mean(demand_E))
    assert row["imbalance"] == grouped["imbalance"]  # the same routing, asked the same
    assert row["served_imbalance"] == pytest.approx(_max_over_mean(served_E))
    assert row["served_imbalance"] < row["imbalance"]
    assert grouped["served_imbalance"] == grouped["imbalance"]  # dropless
    assert row["tokens_per_expert"] == served_E.tolist()
    assert row["dropped_frac"] == pytest.approx(float((demand_E - served_E).sum()) / (4 * 8 * 2))
    assert row["experts_per_token"] == grouped["experts_per_token"] == 2  # before drops
    # touched: the experts that computed a kept token
    used = int((served_E > 0).sum())
    assert row["touched_params"] == used * case.shape.expert_params + case.shape.router_params


def test_routing_stats_keeps_demand_and_served_apart():
    expert_A = torch.tensor([0, 0, 0, 1, 2, 0])
    kept_A = torch.tensor([True, True, False, True, True, False])
    probs_TE = torch.full((3, 4), 0.25)
    stats = routing_stats(expert_A, 3, 4, probs_TE, aux_loss=1.0, kept_A=kept_A)
    assert stats.demand_per_expert == [4, 1, 1, 0] and stats.tokens_per_expert == [2, 1, 1, 0]
    assert stats.imbalance == 4 / 1.5 and stats.served_imbalance == 2 / 1.0
    assert stats.dropped_slots == 2 and stats.dropped_frac == 2 / 6
    assert stats.experts_per_token == 2 and stats.experts_used == 3
    assert stats.router_entropy == pytest.approx(math.log(4))


# -------------------------------------------------------------------------- stacks


def test_stack_imbalance_is_the_mean_over_layers_and_max_the_worst():
    case = tiny_case("grouped", num_experts=8, top_k=1, batch=1, seq_len=5, layers=3)
    row = measure_case(case, FAST_PLAN, WeightCache())
    x_TD = make_inputs(case, 1)[0]
    per_layer, entropies, summed_E = [], [], torch.zeros(8, dtype=torch.long)
    for i in range(3):  # each layer routes the residual stream it receives
        weights = make_weights(case, i)
        probs_TE = _probs(weights, x_TD)
        counts_E = torch.bincount(probs_TE.argmax(dim=-1), minlength=8)
        per_layer.append(_max_over_mean(counts_E))
        entropies.append(_entropy(probs_TE))
        summed_E += counts_E
        x_TD = x_TD + reference_output(weights, x_TD)
    assert len(set(per_layer)) > 1  # the layers differ, so mean and max say different things
    assert row["imbalance"] == pytest.approx(sum(per_layer) / 3)
    assert row["imbalance_max"] == pytest.approx(max(per_layer))
    assert row["imbalance"] != pytest.approx(_max_over_mean(summed_E))  # not experts summed
    assert row["tokens_per_expert"] == summed_E.tolist()
    assert row["router_entropy"] == pytest.approx(sum(entropies) / 3, rel=1e-5)
    assert row["experts_per_token"] == 1


def test_balance_columns_of_one_layer_are_its_own():
    stats = routing_stats(torch.tensor([0, 0, 1]), 3, 2, torch.full((3, 2), 0.5), aux_loss=1.0)
    columns = balance_columns([stats])
    assert columns["imbalance"] == columns["imbalance_max"] == columns["served_imbalance"] == 4 / 3
    assert columns == stats.columns()


def test_a_layer_without_routed_tokens_is_left_out_of_the_means():
    empty = routing_stats(torch.tensor([], dtype=torch.long), 2, 2, torch.full((2, 2), 0.5), 0.0)
    busy = routing_stats(torch.tensor([0, 0, 1]), 3, 2, torch.full((3, 2), 0.5), 1.0)
    assert math.isnan(empty.imbalance)
    columns = balance_columns([empty, busy])
    assert columns["imbalance"] == columns["imbalance_max"] == busy.imbalance


# ----------------------------------------------------------- experts per token, entropy


def test_experts_per_token_and_entropy_follow_the_routing_that_ran():
    case = tiny_case("topp", num_experts=8, batch=4, options=(("p", 0.6),))
    row = measure_case(case, FAST_PLAN, WeightCache())
    weights = make_weights(case)
    probs_TE = _probs(weights, make_inputs(case, 1)[0])
    sorted_TE = probs_TE.sort(dim=-1, descending=True).values
    chosen_T = ((sorted_TE.cumsum(dim=-1) - sorted_TE) < 0.6).sum(dim=-1)  # fewest to 0.6
    assert row["experts_per_token"] == pytest.approx(float(chosen_T.double().mean()))
    assert row["router_entropy"] == pytest.approx(_entropy(probs_TE), rel=1e-5)
    assert 0 < row["router_entropy"] <= math.log(8)


def test_router_scale_draws_the_router_sharper():
    case = tiny_case("grouped", num_experts=8, batch=4)
    sharp = case.with_(router_scale=1.0)
    base_w, sharp_w = make_weights(case), make_weights(sharp)
    # the same draw, scaled: the router only; the experts are untouched
    assert torch.allclose(sharp_w.w_router_DE, base_w.w_router_DE * 50, rtol=1e-5)
    assert torch.equal(sharp_w.w_up_EDF, base_w.w_up_EDF)
    cache = WeightCache()
    rows = [measure_case(c, FAST_PLAN, cache) for c in (case, sharp)]
    assert rows[1]["router_entropy"] < rows[0]["router_entropy"] - 1.0
    assert rows[0]["router_entropy"] > 0.99 * math.log(8)  # the default is near uniform


def test_router_scale_leaves_the_default_case_id_alone():
    case = tiny_case("grouped")
    assert case.case_id == case.with_(router_scale=0.02).case_id
    assert case.case_id != case.with_(router_scale=0.5).case_id
    assert case.fields()["router_scale"] == 0.02
    assert "rs0.5" in case.with_(router_scale=0.5).label() and "rs" not in case.label()


def test_a_run_from_before_router_scale_reads_as_the_default(tmp_path):
    row = {**tiny_case("grouped").fields(), "case_id": "x", "impl": "grouped", "status": "ok"}
    old = {k: v for k, v in row.items() if k != "router_scale"}
    pq.write_table(pa.Table.from_pylist([old]), tmp_path / "old.parquet")
    frame = read_run(tmp_path / "old.parquet")
    assert frame["router_scale"].tolist() == [0.02]
    # so the case pairs with the same case of a run written after (compare, reports)
    assert impl_key(frame.iloc[0].to_dict()) == impl_key(row)


def test_suite_sweeps_router_scale():
    suite = parse_suite(tiny_suite_toml(router_scale="[0.02, 1, 0.5]"))
    assert [c.router_scale for c in suite.cases] == [0.02, 1.0, 0.5]
    assert isinstance(suite.cases[1].router_scale, float)


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "must be a finite number > 0, got 0.0"),
        ("-0.1", "must be a finite number > 0"),
        ("nan", "must be a finite number > 0"),
        ('"sharp"', "expected number"),
        ("true", "expected number"),
    ],
)
def test_suite_refuses_a_bad_router_scale(value, message):
    with pytest.raises(SuiteError) as caught:
        parse_suite(tiny_suite_toml(router_scale=value), "s.toml")
    assert "router_scale" in str(caught.value) and message in str(caught.value)


def test_router_scale_with_a_checkpoint_is_refused():
    text = tiny_suite_toml(router_scale="0.5", weights='"checkpoint:/nowhere:0"')
    with pytest.raises(SuiteError, match=r"router_scale.*has no effect"):
        parse_suite(text, "s.toml")


# ----------------------------------------------------------------- router aliasing

ROUTED = [
    "reference", "grouped", "capacity", "offload", "deepseek", "topp", "dsmoe", "merging",
    "hierarchical",
]  # fmt: skip


@pytest.mark.parametrize("impl", ROUTED)
def test_editing_a_layers_router_leaves_the_weight_set_alone(impl):
    case = tiny_case(impl)
    weights = make_weights(case)
    before = (weights.w_router_DE.clone(), weights.router_bias_E.clone())
    x_TD = make_inputs(case, 1)[0]
    y_ref = reference_output(weights, x_TD)
    layer = registry.get(impl).build(weights, case)
    with torch.no_grad():
        layer.router.bias_E[0] += 5.0
        layer.router.w_router_DE.mul_(3.0)
    assert torch.equal(weights.w_router_DE, before[0])
    assert torch.equal(weights.router_bias_E, before[1])
    assert torch.equal(reference_output(weights, x_TD), y_ref)
    other = registry.get("grouped").build(weights, case.with_(impl="grouped"))
    assert torch.equal(other.router.bias_E, before[1])


# -------------------------------------------------------------------------- end to end


def test_balance_and_realism_columns_reach_the_parquet(tmp_path):
    capacity = tiny_case("capacity", num_experts=4, capacity_factor=0.5, batch=4,
                         routing="hot:1:0.9")  # fmt: skip
    cases: list[Case] = [
        capacity,
        capacity.with_(impl="grouped"),
        tiny_case("grouped", num_experts=8, top_k=1, batch=1, seq_len=6, layers=2),
        tiny_case("dsmoe", num_experts=8, batch=1, seq_len=1, options=(("sparse", "topk"),)),
        tiny_case("grouped", num_experts=8, batch=1, seq_len=1),
        tiny_case("grouped", num_experts=8, batch=4, router_scale=1.0),
    ]
    outcome = run_cases(
        cases, suite_name="t", plan=FAST_PLAN, timeout_s=60, out_root=tmp_path, isolate=False
    )
    frame = read_run(outcome.results_path)
    assert list(frame["status"]) == ["ok"] * len(cases), frame["error"].tolist()
    rows = frame.to_dict("records")
    drops, dropless, stack, dsmoe_topk, grouped_one, sharp = rows
    assert drops["served_imbalance"] < drops["imbalance"] == dropless["imbalance"]
    assert dropless["served_imbalance"] == dropless["imbalance"] == dropless["imbalance_max"]
    assert stack["imbalance_max"] >= stack["imbalance"] >= 1.0
    for column in ("touched_params", "active_params", "min_bytes", "experts_per_token"):
        assert dsmoe_topk[column] == grouped_one[column], column
    expert, router = 3 * 32 * 48, 32 * 8
    assert grouped_one["touched_params"] == 2 * expert + router
    assert sharp["router_scale"] == 1.0 and grouped_one["router_scale"] == 0.02
    assert sharp["router_entropy"] < grouped_one["router_entropy"]
    assert all(0 < r["router_entropy"] <= math.log(8) for r in rows)
    assert all(r["experts_per_token"] in (1, 2) for r in rows)
