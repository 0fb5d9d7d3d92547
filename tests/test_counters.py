"""Parameter, FLOP and byte counts: hand-computed values for the presets, and for every
implementation the experts it really computed (found by poisoning one expert at a time)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moebench import registry
from moebench.case import Case, Workload
from moebench.distributed.group import EP_FAMILY
from moebench.layer import routing_stats
from moebench.measure import counters
from moebench.measure.case_run import WeightCache, measure_case
from moebench.presets import PRESETS
from moebench.weight_sources import make_weights
from moebench.weights import ExpertWeights, make_inputs
from tests.conftest import FAST_PLAN, tiny_case


def _case(preset: str, tokens: int = 1, mode: str = "forward") -> Case:
    return Case(PRESETS[preset], Workload(tokens, 1, mode), "grouped", preset=preset)


def test_mixtral_parameters():
    counts = counters.param_counts(_case("mixtral-8x7b"), torch.nn.Module(), None)
    assert counts.router == 32_768
    assert counts.total - counts.router == 1_409_286_144
    assert counts.active - counts.router == 352_321_536


@pytest.mark.parametrize(
    "preset, expert_total, active_experts",
    [
        # 128 x 3 x 2048 x 768, top-8
        ("qwen3-30b-a3b", 603_979_776, 8),
        # 256 routed + 1 shared, each 3 x 7168 x 2048; top-8 + the shared one
        ("deepseek-v3", 257 * 44_040_192, 9),
        ("olmoe-1b-7b", 64 * 3 * 2048 * 1024, 8),
        ("switch-base-8", 8 * 3 * 768 * 3072, 1),
    ],
)
def test_preset_parameters(preset, expert_total, active_experts):
    shape = PRESETS[preset]
    counts = counters.param_counts(_case(preset), torch.nn.Module(), None)
    assert counts.total - counts.router == expert_total
    assert counts.active - counts.router == active_experts * shape.expert_params
    assert counts.router == shape.hidden * shape.num_experts


def _stats(expert_A: list[int], tokens: int, num_experts: int):
    probs_TE = torch.full((tokens, num_experts), 1.0 / num_experts)
    return routing_stats(torch.tensor(expert_A), tokens, num_experts, probs_TE, aux_loss=1.0)


def test_touched_counts_only_used_experts():
    case = _case("mixtral-8x7b", tokens=1)
    counts = counters.param_counts(case, torch.nn.Module(), _stats([0, 3], 1, 8))
    assert counts.touched == 2 * case.shape.expert_params + counts.router
    assert counts.active == counts.touched  # one token: what it uses is what the call touched


def test_active_follows_the_experts_each_token_used():
    case = _case("mixtral-8x7b", tokens=2)
    # token 0 used 3 experts, token 1 one: 2 a token on average, 3 distinct touched
    counts = counters.param_counts(case, torch.nn.Module(), _stats([0, 3, 5, 3], 2, 8))
    assert counts.active == 2 * case.shape.expert_params + counts.router
    assert counts.touched == 3 * case.shape.expert_params + counts.router


def test_flops_and_bytes():
    case = _case("mixtral-8x7b", tokens=4)
    counts = counters.param_counts(case, torch.nn.Module(), None)
    # tokens x top_k x 3 matmuls x 2 x D x F, plus the router's 2 x D x E per token
    assert counters.flops(case, counts) == 4 * (2 * 3 * 2 * 4096 * 14336 + 2 * 4096 * 8)
    train = _case("mixtral-8x7b", tokens=4, mode="train")
    assert counters.flops(train, counts) == 3 * counters.flops(case, counts)
    bf16 = counters.min_bytes(case, counts, torch.bfloat16)
    assert bf16 == 8 * 3 * 4096 * 14336 * 2 + 32_768 * 4 + 2 * 4 * 4096 * 2


# ------------------------------------------------------- every implementation, one token

ONE_TOKEN = dict(hidden=32, ffn=48, num_experts=8, top_k=2, shared_experts=1, batch=1, seq_len=1)
# Options that pin each design's behaviour here (its defaults may move with its paper).
DESIGN_CASES = {
    "topp": dict(options=(("p", 0.5),)),
    "dsmoe": dict(options=(("sparse", "topk"),)),
    "moepp": dict(options=(("const_experts", 0), ("copy_experts", 1), ("zero_experts", 1))),
    "hierarchical": dict(options=(("group_top_k", 1), ("groups", 2))),
}
SINGLE_DEVICE = sorted(
    name
    for name in registry.available()
    if registry.get(name).source == "builtin"
    and registry.get(name).family != EP_FAMILY
    and "cpu" in registry.get(name).devices
)
ONE_TOKEN_CASES = [(impl, DESIGN_CASES.get(impl, {})) for impl in SINGLE_DEVICE]
ONE_TOKEN_CASES.append(("dsmoe", dict(mode="train")))  # dense: every expert computes


def _poisoned(weights: ExpertWeights, expert: int) -> ExpertWeights:
    """`weights` with routed expert `expert`'s down projection NaN: any output it
    computes (even at gate 0) is NaN."""
    w_down_EFD = weights.w_down_EFD.clone()
    w_down_EFD[expert] = float("nan")
    return replace(weights, w_down_EFD=w_down_EFD)


def _experts_computed(case: Case) -> int:
    """How many routed experts the layer computed for the case's first input: poison
    each in turn and see whether the output turns NaN. A merged layer's experts are its
    groups, poisoned after the merge (poisoning one member would change the grouping)."""
    weights = make_weights(case)
    x_TD = make_inputs(case, 1)[0]
    build = registry.get(case.impl).build
    if case.impl == "merging":
        layers = []
        for group in range(build(weights, case).num_groups):
            layer = build(weights, case)
            with torch.no_grad():
                layer.w_down_EFD[group] = float("nan")
            layers.append(layer)
    else:
        layers = [build(_poisoned(weights, e), case) for e in range(case.shape.num_experts)]
    hit = 0
    for layer in layers:
        with torch.no_grad():
            hit += int(torch.isnan(layer(x_TD)).any())
    return hit


@pytest.mark.parametrize("impl, changes", ONE_TOKEN_CASES, ids=str)
def test_one_token_touches_the_experts_it_computed(impl, changes):
    case = tiny_case(impl, **{**ONE_TOKEN, **changes})
    row = measure_case(case, FAST_PLAN, WeightCache())
    assert row["status"] == "ok", row.get("error")
    shape = case.shape
    expert, shared, router = shape.expert_params, shape.expert_params, shape.router_params
    if impl == "dense":  # no router: top_k experts' width and the shared one, all used
        expected, router = (shape.top_k + 1) * expert, 0
    else:
        hit = _experts_computed(case)
        assert 1 <= hit <= shape.num_experts and row["experts_per_token"] == hit
        if impl == "moepp":  # its two-layer router over FFN, zero and copy experts
            N = shape.num_experts + 2
            router = shape.hidden * 8 * N + 8 * N * N
        if impl == "hierarchical":  # and a primary router over the 2 groups
            router = shape.hidden * (shape.num_experts + 2)
        expected = hit * expert + shared + router
    assert row["touched_params"] == expected
    assert row["active_params"] == expected  # one token: it used what the call touched
    assert row["router_params"] == router
    element = 4  # float32
    activations = 2 * case.tokens * shape.hidden * element
    weights = (expected - router) * element + router * 4
    assert row["min_bytes"] == (2 * weights + 2 * activations if case.workload.mode == "train"
                                else weights + activations)  # fmt: skip


def test_every_built_in_single_device_impl_is_counted_here():
    # a new implementation joins the one-token check (with a design case if it needs one)
    assert {"reference", "grouped", "capacity", "dense", "offload", "deepseek"} <= set(
        SINGLE_DEVICE
    )
    assert {"topp", "dsmoe", "moepp", "merging"} <= set(SINGLE_DEVICE)


@pytest.mark.parametrize(
    "impl, options",
    [
        ("dsmoe", (("sparse", "topk"),)),
        (
            "moepp",  # no extra experts, the base router's columns, inputs not scaled
            (
                ("const_experts", 0),
                ("copy_experts", 0),
                ("router", "linear"),
                ("scale_inputs", False),
                ("zero_experts", 0),
            ),
        ),
    ],
)
@pytest.mark.parametrize("tokens", [1, 6])
def test_design_on_the_base_routing_counts_what_grouped_counts(impl, options, tokens):
    case = tiny_case("grouped", **{**ONE_TOKEN, "seq_len": tokens})
    cache = WeightCache()
    base = measure_case(case, FAST_PLAN, cache)
    design = measure_case(case.with_(impl=impl, options=options), FAST_PLAN, cache)
    for column in (
        "touched_params",
        "active_params",
        "router_params",
        "min_bytes",
        "flops",
        "tokens_per_expert",
        "experts_per_token",
    ):
        assert design[column] == base[column], column
    assert base["experts_per_token"] == case.shape.top_k
    # MoE++ holds its gating residual W_g (E x E) too; a single layer never uses it
    held = case.shape.num_experts**2 if impl == "moepp" else 0
    assert design["total_params"] == base["total_params"] + held


def test_moepp_counts_the_constant_experts_its_tokens_chose():
    options = (("const_experts", 2), ("copy_experts", 0), ("zero_experts", 0))
    case = tiny_case("moepp", **{**ONE_TOKEN, "seq_len": 3}, options=options)
    layer = registry.get("moepp").build(make_weights(case), case)
    E, D = case.shape.num_experts, case.shape.hidden
    layer.router.bias_N[E + 1] = 1e4  # every token: constant expert 1 and one FFN expert
    with torch.no_grad():
        layer(make_inputs(case, 1)[0])
    stats = layer.stats()
    counts = counters.param_counts(case, layer, stats)
    N, const = E + 2, 3 * D  # a constant expert: its vector v (D) and its gate W_c (D x 2)
    router = D * 8 * N + 8 * N * N  # the two-layer router: D x 8N, 8N x N
    assert stats.experts_per_token == 1 and stats.experts_used >= 1
    shared = case.shape.expert_params
    ffn_touched = stats.experts_used * case.shape.expert_params
    assert counts.touched == ffn_touched + shared + router + const
    assert counts.active == case.shape.expert_params + shared + router + const
    assert counts.total == E * case.shape.expert_params + shared + router + N * N + 2 * const


def test_stack_counts_each_layer_on_its_own_routing():
    case = tiny_case("grouped", hidden=32, ffn=48, num_experts=16, top_k=1, batch=1,
                     seq_len=3, layers=3)  # fmt: skip
    row = measure_case(case, FAST_PLAN, WeightCache())
    weights = [make_weights(case, i) for i in range(3)]
    x_TD = make_inputs(case, 1)[0]
    touched_experts = 0
    for w in weights:  # each layer routes the residual stream it receives
        probs_TE = torch.softmax(x_TD @ w.w_router_DE + w.router_bias_E, dim=-1)
        touched_experts += len(set(probs_TE.argmax(dim=-1).tolist()))
        layer = registry.get("reference").build(w, case)
        with torch.no_grad():
            x_TD = x_TD + layer(x_TD)
    router = case.shape.router_params
    assert row["touched_params"] == touched_experts * case.shape.expert_params + 3 * router
    assert row["total_params"] == 3 * (16 * case.shape.expert_params + router)
    assert row["active_params"] == 3 * (case.shape.expert_params + router)
