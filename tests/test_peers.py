"""The peers plugin (plugins/moebench-peers): transformers' MoE blocks and moe-ops as
moebench implementations, loaded through their entry points, checked on tiny float32
shapes against `reference` (blocks that compute moebench's base function) or against a
reference of their own function (blocks that route otherwise), and refusing what they
cannot compute faithfully."""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import sys

import pandas as pd
import pytest
import torch

from moebench import register, registry
from moebench.case import LayerShape
from moebench.impls.reference import reference_output
from moebench.measure.case_run import relative_error
from moebench.measure.timing import TimingPlan
from moebench.runner import run_cases
from moebench.suite import load_suite
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs
from tests.conftest import FAST_PLAN, tiny_case

pytest.importorskip("moebench_peers", reason="pip install -e plugins/moebench-peers")
pytest.importorskip("transformers.integrations.moe", reason="transformers >= 5 (test extra)")
# Through the entry points first, as moebench loads plugins (a direct import of a plugin
# module before that would register it outside the plugin loader).
registry.load_all()

from moebench_peers import UnsupportedCaseError  # noqa: E402
from moebench_peers.conventions import (  # noqa: E402
    SHARED_GATE_WEIGHT,
    Convention,
    case_convention,
    convention_reference,
)
from moebench_peers.hf import DEEPSEEK_V3  # noqa: E402
from moebench_peers.moe_ops import MoeOpsLayer  # noqa: E402

CPU_BACKENDS = ("eager", "batched_mm", "grouped_mm")
EXACT_BLOCKS = ("mixtral", "qwen3-moe")
# DeepSeek-V3's router keeps 4 of 8 groups of experts: 16 experts make groups of 2.
V3_SHAPE_NO_SHARED = dict(num_experts=16, top_k=4)
V3_SHAPE = dict(V3_SHAPE_NO_SHARED, shared_experts=1)


def run_layer(name: str, case, mode: str = "forward"):
    """(y_TD, weights, x_TD) of implementation `name` on `case`."""
    weights = make_weights(case)
    x_TD = make_inputs(case, 1)[0]
    layer = registry.get(name).build(weights, case)
    return layer(x_TD), weights, x_TD


def test_entry_points_register_the_peers_as_plugins():
    targets = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
    }
    assert targets["hf"] == "moebench_peers.hf"
    assert targets["moe-ops"] == "moebench_peers.moe_ops"
    assert registry.get("hf-mixtral:grouped_mm").source.startswith("plugin hf ")
    assert registry.get("moe-ops").source.startswith("plugin moe-ops ")
    assert "hf" not in registry.broken() and "moe-ops" not in registry.broken()


@pytest.mark.parametrize("block", EXACT_BLOCKS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_base_function_blocks_equal_reference(block, backend):
    name = f"hf-{block}:{backend}"
    assert registry.get(name).exact
    case = tiny_case(name, num_experts=8, top_k=2, batch=3, seq_len=11)
    y_TD, weights, x_TD = run_layer(name, case)
    assert relative_error(y_TD, reference_output(weights, x_TD)) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_gradients_equal_reference_layer(backend):
    """Input and expert-weight gradients of a training step match moebench's reference."""
    name = f"hf-mixtral:{backend}"
    case = tiny_case(name, mode="train")
    weights = make_weights(case)
    x_TD = make_inputs(case, 1)[0]
    grad_TD = torch.randn_like(x_TD)
    grads = []
    for impl in (name, "reference"):
        x = x_TD.clone().requires_grad_(True)
        layer = registry.get(impl).build(weights, case)
        layer(x).backward(grad_TD)
        # Squared norms add up whatever the layout ([gate; up] in one tensor or two).
        expert_grads = sum(
            float(p.grad.double().square().sum()) for p in layer.parameters() if p.dim() == 3
        )
        grads.append((x.grad, expert_grads))
    assert relative_error(grads[0][0], grads[1][0]) < 1e-5
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_olmoe_is_checked_against_its_own_function(backend):
    """OLMoE does not renormalise its top-k gates: its own reference matches it, the base
    layer's does not; with top_k = E the softmax gates already sum to 1 and both agree."""
    name = f"hf-olmoe:{backend}"
    info = registry.get(name)
    assert not info.exact and info.reference is not None
    case = tiny_case(name, batch=3, seq_len=11)
    y_TD, weights, x_TD = run_layer(name, case)
    assert relative_error(y_TD, info.reference([weights], x_TD, case)) < 1e-5
    assert relative_error(y_TD, reference_output(weights, x_TD)) > 0.1
    all_experts = tiny_case(name, top_k=4, num_experts=4)
    y_TD, weights, x_TD = run_layer(name, all_experts)
    assert relative_error(y_TD, reference_output(weights, x_TD)) < 1e-5


def moebench_v3_output(weights, x_TD, case):
    """moebench's own computation of DeepSeek-V3's routing: its `deepseek` design's
    reference with V3's options where that design takes options, else the base reference
    of a shape that carries V3's router (where moebench's LayerShape has conventions)."""
    v3 = dict(scoring="sigmoid", n_groups=8, topk_groups=4, routed_scaling=2.5)
    builtin = registry.get("deepseek")
    if builtin.reference is not None:
        deepseek = case.with_(impl="deepseek", options=tuple(sorted(v3.items())))
        return builtin.reference([weights], x_TD, deepseek)
    return reference_output(with_router(weights, **v3), x_TD)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deepseek_v3_matches_its_reference_and_moebench_deepseek(backend):
    """The V3 block against the plugin's V3 reference, and that reference against
    moebench's own `deepseek` design with V3's options (two independent readings)."""
    name = f"hf-deepseek-v3:{backend}"
    info = registry.get(name)
    case = tiny_case(name, batch=3, seq_len=11, **V3_SHAPE)
    y_TD, weights, x_TD = run_layer(name, case)
    y_ref_TD = info.reference([weights], x_TD, case)
    assert relative_error(y_TD, y_ref_TD) < 1e-5
    assert relative_error(y_TD, reference_output(weights, x_TD)) > 0.1
    assert relative_error(y_ref_TD, moebench_v3_output(weights, x_TD, case)) < 1e-6


def test_qwen2_moe_refuses_without_its_shared_gate_and_runs_with_it():
    name = "hf-qwen2-moe:grouped_mm"
    case = tiny_case(name, shared_experts=2)
    weights = make_weights(case)
    with pytest.raises(UnsupportedCaseError, match="shared_expert_gate"):
        registry.get(name).build(weights, case)
    # A weight set that carries the gate (as a weight source modelling Qwen2-MoE would).
    setattr(weights, SHARED_GATE_WEIGHT, torch.randn(case.shape.hidden) * 0.5)
    x_TD = make_inputs(case, 1)[0]
    info = registry.get(name)
    y_TD = info.build(weights, case)(x_TD)
    assert relative_error(y_TD, info.reference([weights], x_TD, case)) < 1e-5
    ungated = info.reference([weights], x_TD, case) - reference_output(weights, x_TD)
    assert float(ungated.norm()) > 0  # the gate and raw top-k change the function


@pytest.mark.parametrize(
    ("name", "changes", "reason"),
    [
        ("hf-mixtral:eager", {"routing": "zipf:1.2"}, "router logit bias"),
        ("hf-qwen3-moe:grouped_mm", {"shared_experts": 1}, "no shared expert"),
        ("hf-deepseek-v3:eager", {"num_experts": 8}, "8 expert groups"),
        ("hf-olmoe:sonicmoe", {}, "does not run here"),
    ],
)
def test_cases_a_block_cannot_compute_are_refused(name, changes, reason):
    case = tiny_case(name, **changes)
    with pytest.raises(UnsupportedCaseError, match=reason):
        registry.get(name).build(make_weights(case), case)


@pytest.mark.parametrize(
    ("name", "module", "hint"),
    [
        ("hf-mixtral:eager", "transformers", "moebench-peers\\[hf\\]"),
        ("moe-ops", "moe_ops", "moebench-peers\\[moe-ops\\]"),
    ],
)
def test_missing_library_refuses_with_what_to_install(monkeypatch, name, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    case = tiny_case(name, dtype="float32")
    with pytest.raises(UnsupportedCaseError, match=hint):
        registry.get(name).build(make_weights(case), case)


class TorchMoeOps:
    """moe-ops' documented API (fused_topk_softmax, permute, grouped_gemm, unpermute) in
    plain torch, so the adapter's layouts and calls are checked on a CPU. The real
    kernels are checked on CUDA by test_moe_ops_on_cuda_equals_reference."""

    @staticmethod
    def supports_tma(dtype=None):
        return False

    @staticmethod
    def fused_topk_softmax(logits_TE, K):
        top_TK, ids_TK = logits_TE.topk(K, dim=-1)
        return torch.softmax(top_TK, dim=-1), ids_TK.int()

    @staticmethod
    def permute(x_TD, ids_TK, E):
        T, K = ids_TK.shape
        flat_A = ids_TK.reshape(-1).long()
        order_A = torch.argsort(flat_A, stable=True)
        dest_A = torch.empty_like(order_A)
        dest_A[order_A] = torch.arange(T * K)
        row_id_map = torch.empty(T * K, dtype=torch.int32)
        slot_A = torch.arange(T * K)
        row_id_map[(slot_A % K) * T + slot_A // K] = dest_A.int()  # entry k*T + t
        offsets = torch.cat([torch.zeros(1), torch.bincount(flat_A, minlength=E).cumsum(0)])
        return x_TD[order_A // K], row_id_map, offsets.int()

    @staticmethod
    def grouped_gemm(a, b_ENK, offsets, trans_b=True):
        assert trans_b
        rows = [a[offsets[e] : offsets[e + 1]] @ b_ENK[e].t() for e in range(b_ENK.shape[0])]
        return torch.cat(rows)

    @staticmethod
    def unpermute(y_AD, row_id_map, prob_TK, num_tokens, num_topK):
        y_KTD = y_AD[row_id_map.long()].view(num_topK, num_tokens, -1)
        return (y_KTD * prob_TK.t()[..., None]).sum(0).to(y_AD.dtype)


def with_router(weights, **convention):
    """A copy of `weights` whose shape carries router-convention fields, as moebench's
    LayerShape does where it models real models' routers."""
    fields = [(name, type(value), value) for name, value in convention.items()]
    shape_class = dataclasses.make_dataclass(
        "ConventionShape", fields, bases=(LayerShape,), frozen=True
    )
    view = copy.copy(weights)
    view.shape = shape_class(**{**dataclasses.asdict(weights.shape), **convention})
    return view


def test_case_convention_reads_the_shape_and_base_blocks_refuse_another():
    case = tiny_case("hf-mixtral:eager")
    weights = make_weights(case)
    assert case_convention(weights.shape) == Convention()
    raw = with_router(weights, norm_topk_prob=False)
    assert case_convention(raw.shape) == Convention(norm_topk_prob=False)
    with pytest.raises(UnsupportedCaseError, match="renormalised top-k"):
        registry.get("hf-mixtral:eager").build(raw, case)
    olmoe = registry.get("hf-olmoe:eager")
    x_TD = make_inputs(case, 1)[0]
    y_TD = olmoe.build(raw, case)(x_TD)
    assert relative_error(y_TD, olmoe.reference([raw], x_TD, case)) < 1e-5


@pytest.mark.parametrize(
    "convention",
    [Convention(norm_topk_prob=False), DEEPSEEK_V3],
    ids=["raw-top-k", "deepseek-v3"],
)
def test_moe_ops_adapter_computes_other_conventions_with_a_torch_router(convention):
    case = tiny_case("moe-ops", shared_experts=1, **V3_SHAPE_NO_SHARED)
    weights = make_weights(case)
    x_TD = make_inputs(case, 1)[0]
    layer = MoeOpsLayer(TorchMoeOps(), weights, convention)
    assert "torch router" in layer.impl_detail
    y_ref_TD = convention_reference(convention)([weights], x_TD, case)
    assert relative_error(layer(x_TD), y_ref_TD) < 1e-5
    assert relative_error(y_ref_TD, reference_output(weights, x_TD)) > 0.1


@pytest.mark.parametrize("shared_experts", [0, 1])
def test_moe_ops_adapter_calls_equal_reference_on_torch_stand_in(shared_experts):
    case = tiny_case(
        "moe-ops", num_experts=8, top_k=2, shared_experts=shared_experts, routing="zipf:1.2"
    )
    weights = make_weights(case)
    x_TD = make_inputs(case, 1)[0]
    layer = MoeOpsLayer(TorchMoeOps(), weights)
    assert relative_error(layer(x_TD), reference_output(weights, x_TD)) < 1e-5
    stats = layer.stats()
    assert sum(stats.tokens_per_expert) == case.tokens * case.shape.top_k


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_moe_ops_on_cuda_equals_reference(mode):
    pytest.importorskip("moe_ops", reason="pip install 'moebench-peers[moe-ops]'")
    case = tiny_case(
        "moe-ops",
        hidden=256,
        ffn=512,
        num_experts=8,
        top_k=2,
        seq_len=64,
        device="cuda",
        dtype="bfloat16",
        mode=mode,
    )
    y_TD, weights, x_TD = run_layer("moe-ops", case)
    assert relative_error(y_TD, reference_output(weights, x_TD)) < 2e-2


@pytest.fixture
def peers_suite():
    """suites/peers.toml on the CPU; its CUDA section names `triton`, registered by its
    own branch of moebench: a stand-in takes the name where that is not merged yet."""
    added = "triton" not in registry.available()
    if added:
        register("triton", family="triton", description="stand-in", devices=("cuda",))(
            lambda w, c: None
        )
    yield load_suite("suites/peers.toml", device="cpu")
    if added:
        registry.unregister("triton")


def test_peers_suite_runs_on_cpu_and_every_peer_passes_its_check(peers_suite, tmp_path):
    impls = set(peers_suite.impls)
    for block in ("mixtral", "qwen3-moe", "olmoe", "deepseek-v3"):
        assert {f"hf-{block}:{b}" for b in CPU_BACKENDS} <= impls
    cases = [
        c
        for c in peers_suite.cases
        if c.tokens == 64 and c.impl.split(":")[-1] in ("reference", "grouped_mm")
    ]
    outcome = run_cases(
        cases, suite_name="peers", plan=FAST_PLAN, timeout_s=60, out_root=tmp_path, isolate=False
    )
    df = pd.read_parquet(outcome.results_path)
    assert len(df) == len(cases) >= 10
    assert (df.status == "ok").all(), df[df.status != "ok"][["impl", "error"]].to_string()
    assert (df.rel_err < 1e-4).all()
    peers = df[df.family == "hf-transformers"]
    assert set(peers.exact) == {True, False}
    assert peers[~peers.exact.astype(bool)].fidelity_err.gt(0.1).all()
    assert peers.tokens_per_expert.map(sum).eq(peers.tokens * peers.top_k).all()


def test_a_refused_case_is_a_row_that_says_why(tmp_path):
    case = tiny_case("hf-mixtral:eager", routing="hot:1:0.5")
    plan = TimingPlan(budget_ms=5, warmup=0, min_repeats=1, max_repeats=2)
    outcome = run_cases(
        [case], suite_name="t", plan=plan, timeout_s=60, out_root=tmp_path, isolate=False
    )
    row = pd.read_parquet(outcome.results_path).iloc[0]
    # a `skipped` row where moebench has registry.Unsupported, an `error` row before it
    assert row.status == ("skipped" if hasattr(registry, "Unsupported") else "error")
    assert "hf-mixtral:eager refuses this case" in row.error and "router logit bias" in row.error
