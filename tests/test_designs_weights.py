"""Weight sources (redundant, checkpoint) and the merging and offload designs.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k.
HF tensors in the tiny checkpoints are (out, in), as nn.Linear stores them.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from moebench.case import LayerShape, Workload
from moebench.impls import merging, offload
from moebench.impls.grouped import GroupedMoE
from moebench.impls.reference import reference_output, reference_stack_output
from moebench.measure.case_run import TOLERANCE, relative_error
from moebench.measure.memory import weight_bytes
from moebench.routing import routing_bias
from moebench.weight_sources import (
    CheckpointError,
    WeightSpecError,
    load_weights,
    parse_weights_spec,
    redundant_cluster_of,
    redundant_clusters,
    validate_weights_spec,
)
from moebench.weights import make_inputs, make_weights
from tests.conftest import FAST_PLAN, tiny_case

# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "spec",
    [
        "random",
        "redundant:0",
        "redundant:0.8",
        "redundant:1",
        "checkpoint:/m:0",
        "checkpoint:C:/odd:path:12",
    ],
)
def test_good_specs_parse(spec):
    assert validate_weights_spec(spec) is None


@pytest.mark.parametrize(
    "spec",
    [
        "redundant:1.5",
        "redundant:-0.1",
        "redundant:x",
        "redundant:nan",
        "redundant",
        "checkpoint:/m",
        "checkpoint:/m:-1",
        "checkpoint:/m:x",
        "checkpoint::3",
        "random:1",
        "normal",
        "",
    ],
)
def test_bad_specs_name_the_spec_and_the_allowed_forms(spec):
    message = validate_weights_spec(spec)
    assert message is not None and repr(spec) in message and "allowed" in message
    assert "redundant:R" in message and "checkpoint:PATH:LAYER" in message
    with pytest.raises(WeightSpecError):
        parse_weights_spec(spec)
    with pytest.raises(WeightSpecError, match="allowed"):
        make_weights(tiny_case(weights=spec))


def test_checkpoint_path_may_contain_colons():
    spec = parse_weights_spec("checkpoint:C:/odd:path:12")
    assert (spec.path, spec.layer) == ("C:/odd:path", 12)


# ----------------------------------------------------------------------- redundant


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_redundant_clusters_rule():
    assert [redundant_clusters(8, r) for r in (0.0, 0.5, 0.8, 0.9, 1.0)] == [8, 4, 2, 1, 1]
    assert redundant_clusters(10, 0.75) == 3  # 2.5 rounds up


def test_redundant_weights_are_clustered_and_deterministic():
    case = tiny_case(num_experts=8, hidden=64, ffn=96, weights="redundant:0.8", shared_experts=1)
    weights, again = make_weights(case), make_weights(case)
    assert torch.equal(weights.w_gate_EDF, again.w_gate_EDF)
    assert not torch.equal(weights.w_gate_EDF, make_weights(case, layer=1).w_gate_EDF)
    clusters = redundant_cluster_of(case)
    assert sorted(set(clusters)) == [0, 1] and sorted(clusters.count(c) for c in (0, 1)) == [4, 4]
    for w in (weights.w_gate_EDF, weights.w_up_EDF, weights.w_down_EFD):
        pairs = [(a, b) for a in range(8) for b in range(a)]
        same = [_cosine(w[a], w[b]) for a, b in pairs if clusters[a] == clusters[b]]
        other = [_cosine(w[a], w[b]) for a, b in pairs if clusters[a] != clusters[b]]
        assert min(same) > 0.7 and max(abs(c) for c in other) < 0.1
        assert float(w.float().std()) == pytest.approx(0.02, rel=0.1)  # scale of "random"
    # router, routing bias and shared experts are those of "random"
    plain = make_weights(case.with_(weights="random"))
    for name in ("w_router_DE", "router_bias_E", "w_shared_gate_DS", "w_shared_down_SD"):
        assert torch.equal(getattr(weights, name), getattr(plain, name))
    assert not torch.equal(weights.w_gate_EDF, plain.w_gate_EDF)


def test_redundancy_one_gives_identical_copies_and_zero_independent_experts():
    ones = make_weights(tiny_case(num_experts=6, weights="redundant:1"))
    assert all(torch.equal(ones.w_down_EFD[0], ones.w_down_EFD[e]) for e in range(6))
    zero = make_weights(tiny_case(num_experts=6, hidden=64, ffn=96, weights="redundant:0"))
    sims = [_cosine(zero.w_up_EDF[a], zero.w_up_EDF[b]) for a in range(6) for b in range(a)]
    assert max(abs(s) for s in sims) < 0.1


# ----------------------------------------------------------------------- checkpoints

D, FF, E = 16, 24, 4


def _linear(out: int, inp: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(out, inp, generator=generator) * 0.1


def _moe_tensors(
    layout: str, layer: int, generator: torch.Generator, shared: int = 0
) -> dict[str, torch.Tensor]:
    """One MoE layer's HF tensors for `layout`."""
    block = "block_sparse_moe" if layout == "mixtral" else "mlp"
    base = f"model.layers.{layer}.{block}"
    t = {f"{base}.gate.weight": _linear(E, D, generator)}
    names = ("w1", "w3", "w2") if layout == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    if layout == "stacked":
        t[f"{base}.experts.gate_up_proj"] = torch.randn(E, 2 * FF, D, generator=generator) * 0.1
        t[f"{base}.experts.down_proj"] = torch.randn(E, D, FF, generator=generator) * 0.1
    else:
        for e in range(E):
            t[f"{base}.experts.{e}.{names[0]}.weight"] = _linear(FF, D, generator)
            t[f"{base}.experts.{e}.{names[1]}.weight"] = _linear(FF, D, generator)
            t[f"{base}.experts.{e}.{names[2]}.weight"] = _linear(D, FF, generator)
    if shared:
        block = "shared_experts" if layout == "deepseek" else "shared_expert"
        t[f"{base}.{block}.gate_proj.weight"] = _linear(shared * FF, D, generator)
        t[f"{base}.{block}.up_proj.weight"] = _linear(shared * FF, D, generator)
        t[f"{base}.{block}.down_proj.weight"] = _linear(D, shared * FF, generator)
        if layout == "qwen2":
            t[f"{base}.shared_expert_gate.weight"] = _linear(1, D, generator)
    if layout == "deepseek":
        t[f"{base}.gate.e_score_correction_bias"] = torch.randn(E, generator=generator)
    return t


CONFIGS = {
    "mixtral": {"model_type": "mixtral", "intermediate_size": FF, "num_local_experts": E},
    "qwen3": {
        "model_type": "qwen3_moe",
        "intermediate_size": 999,
        "moe_intermediate_size": FF,
        "num_experts": E,
        "norm_topk_prob": True,
    },
    "olmoe": {"model_type": "olmoe", "intermediate_size": FF, "num_experts": E},
    "qwen2": {
        "model_type": "qwen2_moe",
        "moe_intermediate_size": FF,
        "num_experts": E,
        "shared_expert_intermediate_size": 2 * FF,
    },
    "deepseek": {
        "model_type": "deepseek_v3",
        "intermediate_size": 999,
        "moe_intermediate_size": FF,
        "n_routed_experts": E,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
    },
    "stacked": {"model_type": "qwen3_moe", "moe_intermediate_size": FF, "num_experts": E},
}


def write_checkpoint(
    folder: Path, layout: str, layers: int = 3, shards: int = 1, shared: int = 0
) -> dict[str, torch.Tensor]:
    """A tiny checkpoint of `layout` (config.json + safetensors); returns its tensors."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(7)
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _linear(32, D, generator)}
    for layer in range(layers):
        tensors[f"model.layers.{layer}.self_attn.q_proj.weight"] = _linear(D, D, generator)
        if layout == "deepseek" and layer == 0:  # first_k_dense_replace: a dense MLP
            for name, shape in (
                ("gate_proj", (999, D)),
                ("up_proj", (999, D)),
                ("down_proj", (D, 999)),
            ):
                tensors[f"model.layers.0.mlp.{name}.weight"] = _linear(*shape, generator)
            continue
        tensors.update(_moe_tensors(layout, layer, generator, shared))
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "hidden_size": D,
        "num_experts_per_tok": 2,
        "num_hidden_layers": layers,
        **CONFIGS[layout],
    }
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for shard in range(shards):
            file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            part = names[shard::shards]
            save_file({n: tensors[n].contiguous() for n in part}, str(folder / file))
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def hand_forward(
    t: dict[str, torch.Tensor],
    layout: str,
    layer: int,
    x_TD: torch.Tensor,
    top_k: int = 2,
    shared: bool = False,
) -> torch.Tensor:
    """The MoE layer written out from the HF tensors, token by token, in float64, with
    moebench's routing: softmax over (x W_r^T + bias), top-k, gates renormalised."""
    block = "block_sparse_moe" if layout == "mixtral" else "mlp"
    base = f"model.layers.{layer}.{block}"
    x = x_TD.double()
    logits = x @ t[f"{base}.gate.weight"].double().T  # DeepSeek's correction bias: not here
    probs = torch.softmax(logits, dim=-1)
    top, ids = torch.topk(probs, top_k, dim=-1)
    gates = top / top.sum(-1, keepdim=True)

    def expert(e: int, v: torch.Tensor) -> torch.Tensor:
        if layout == "stacked":
            gate_up = t[f"{base}.experts.gate_up_proj"][e].double()  # (2F, D)
            w_gate, w_up = gate_up[:FF], gate_up[FF:]
            w_down = t[f"{base}.experts.down_proj"][e].double()  # (D, F)
        else:
            names = (
                ("w1", "w3", "w2") if layout == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            )
            w_gate, w_up, w_down = (t[f"{base}.experts.{e}.{n}.weight"].double() for n in names)
        return (F.silu(v @ w_gate.T) * (v @ w_up.T)) @ w_down.T

    y = torch.zeros_like(x)
    for token in range(x.shape[0]):
        for k in range(top_k):
            y[token] += gates[token, k] * expert(int(ids[token, k]), x[token])
    if shared:
        block = "shared_experts" if layout == "deepseek" else "shared_expert"
        g, u, d = (
            t[f"{base}.{block}.{n}.weight"].double() for n in ("gate_proj", "up_proj", "down_proj")
        )
        y += (F.silu(x @ g.T) * (x @ u.T)) @ d.T  # Qwen2's shared_expert_gate: ignored
    return y


def _ckpt_case(path: Path, layer: int, shared: int = 0, **changes):
    shape = {"hidden": D, "ffn": FF, "num_experts": E, "top_k": 2, **changes}
    return tiny_case(
        "grouped", shared_experts=shared, weights=f"checkpoint:{path}:{layer}", **shape
    )


@pytest.mark.parametrize(
    ("layout", "shards", "shared", "layer"),
    [
        ("mixtral", 1, 0, 1),
        ("qwen3", 2, 0, 2),
        ("olmoe", 3, 0, 0),
        ("qwen2", 2, 2, 1),
        ("deepseek", 2, 1, 1),
        ("stacked", 1, 0, 2),
    ],
)
def test_checkpoint_layer_computes_the_hand_written_forward(
    tmp_path, layout, shards, shared, layer
):
    pytest.importorskip("safetensors")
    tensors = write_checkpoint(tmp_path / layout, layout, shards=shards, shared=shared)
    case = _ckpt_case(tmp_path / layout, layer, shared)
    if layout == "qwen2":
        with pytest.warns(UserWarning, match="shared_expert_gate"):
            weights = make_weights(case)
    else:
        weights = make_weights(case)
    assert weights.w_gate_EDF.shape == (E, D, FF) and weights.w_down_EFD.shape == (E, FF, D)
    assert weights.w_router_DE.dtype == torch.float32
    assert (weights.w_shared_gate_DS is not None) == bool(shared)
    correction = tensors.get(f"model.layers.{layer}.mlp.gate.e_score_correction_bias")
    if correction is None:
        assert weights.correction_bias_E is None
    else:  # kept for a DeepSeek-style router, apart from the logit bias
        assert torch.equal(weights.correction_bias_E, correction)
    assert torch.equal(weights.router_bias_E, torch.zeros(E))
    x_TD = make_inputs(case, 1)[0]
    expected = hand_forward(tensors, layout, layer, x_TD, shared=bool(shared))
    assert relative_error(reference_output(weights, x_TD), expected) < 1e-5


def test_checkpoint_stacked_case_takes_successive_layers(tmp_path):
    pytest.importorskip("safetensors")
    tensors = write_checkpoint(tmp_path / "m", "mixtral", layers=3)
    case = _ckpt_case(tmp_path / "m", 1).with_(workload=Workload(2, 8, "forward", layers=2))
    weights = [make_weights(case, i) for i in range(2)]
    x_TD = make_inputs(case, 1)[0]
    h = x_TD.double()
    for layer in (1, 2):
        h = h + hand_forward(tensors, "mixtral", layer, h.float())
    assert relative_error(reference_stack_output(weights, x_TD), h) < 1e-5
    with pytest.raises(CheckpointError, match=r"layer 3 has no MoE router.*0-2"):
        make_weights(case, 2)


def test_checkpoint_in_bfloat16_with_skewed_routing(tmp_path):
    pytest.importorskip("safetensors")
    tensors = write_checkpoint(tmp_path / "q", "qwen3", layers=1)
    case = _ckpt_case(tmp_path / "q", 0, dtype="bfloat16", routing="zipf:1.2")
    weights = make_weights(case)
    assert weights.w_gate_EDF.dtype == torch.bfloat16
    base = "model.layers.0.mlp"
    assert torch.equal(
        weights.w_up_EDF[3], tensors[f"{base}.experts.3.up_proj.weight"].T.to(torch.bfloat16)
    )
    assert torch.equal(weights.router_bias_E, routing_bias("zipf:1.2", E, case.seed))


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
def test_checkpoint_fp8_block_scales_are_dequantised(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ds"
    tensors = write_checkpoint(folder, "deepseek", layers=2, shared=1)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [8, 8]}
    (folder / "config.json").write_text(json.dumps(config))
    stored = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.experts.2.down_proj.weight"  # (D, F) = 16 x 24: 2 x 3 blocks
    w = tensors[name]
    scale = w.abs().reshape(2, 8, 3, 8).amax(dim=(1, 3)) / 448.0
    expanded = scale.repeat_interleave(8, 0).repeat_interleave(8, 1)
    stored[name] = (w / expanded).to(torch.float8_e4m3fn)
    stored[name + "_scale_inv"] = scale
    save_file(stored, str(folder / "model.safetensors"))
    weights = make_weights(_ckpt_case(folder, 1, shared=1))
    dequantised = stored[name].float() * expanded
    assert torch.equal(weights.w_down_EFD[2], dequantised.T)
    assert relative_error(weights.w_down_EFD[2], w.T) < 0.1  # fp8 is coarse, not wrong


def test_checkpoint_errors_name_what_is_wrong(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    folder = tmp_path / "ds"
    write_checkpoint(folder, "deepseek", layers=2, shared=1)
    with pytest.raises(CheckpointError, match=r"layer 0 is a dense MLP.*MoE layers of 2.*: 1"):
        make_weights(_ckpt_case(folder, 0, shared=1))
    with pytest.raises(CheckpointError, match=r"hidden: checkpoint 16, case 32.*hidden=16"):
        make_weights(_ckpt_case(folder, 1, shared=1, hidden=32))
    with pytest.raises(CheckpointError, match=r"shared_experts: checkpoint 1, case 0"):
        make_weights(_ckpt_case(folder, 1, shared=0))
    with pytest.raises(CheckpointError, match="not a folder"):
        make_weights(_ckpt_case(tmp_path / "nowhere", 0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        make_weights(_ckpt_case(tmp_path / "empty", 0))
    config = {"hidden_size": D, "intermediate_size": FF}  # but no number of experts
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_local_experts, num_experts, n_routed"):
        make_weights(_ckpt_case(tmp_path / "empty", 0))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install safetensors"):
        make_weights(_ckpt_case(folder, 1, shared=1))


def test_checkpoint_tensor_of_the_wrong_shape_is_named(tmp_path):
    pytest.importorskip("safetensors")
    folder = tmp_path / "m"
    write_checkpoint(folder, "mixtral", layers=1)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = FF + 1  # config and tensors disagree
    (folder / "config.json").write_text(json.dumps(config))
    case = _ckpt_case(folder, 0).with_(shape=LayerShape(D, FF + 1, E, 2))
    with pytest.raises(CheckpointError, match=r"experts.0.w1.weight' has shape 24 x 16"):
        load_weights(case)


# --------------------------------------------------------------------------- merging


def _merging_case(**changes):
    options = changes.pop("options", {})
    changes.setdefault("num_experts", 8)
    return tiny_case("merging", options=tuple(sorted(options.items())), **changes)


def _forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("merge_by", ["weights", "outputs"])
def test_merging_keep_ratio_one_is_the_original_exactly(merge_by):
    case = _merging_case(options={"keep_ratio": 1.0, "merge_by": merge_by}, shared_experts=1)
    weights = make_weights(case)
    layer = merging.build(weights, case)
    assert (
        layer.groups == [[e] for e in range(8)]
        and layer.extra_metrics()["merge_saved_weight_bytes"] == 0
    )
    assert torch.equal(layer.w_gate_EDF, weights.w_gate_EDF)
    assert torch.equal(layer.w_down_EFD, weights.w_down_EFD)
    for x in make_inputs(case, 2):
        assert torch.equal(_forward(layer, x), _forward(GroupedMoE(weights, case), x))
    assert layer.calib_fidelity_err < 1e-6


def test_merging_redundant_experts_costs_far_less_fidelity_than_random():
    errors = {}
    for source in ("random", "redundant:0.9"):
        case = _merging_case(options={"keep_ratio": 0.5}, weights=source, batch=8)
        weights = make_weights(case)
        layer = merging.build(weights, case)
        x = make_inputs(case, 1)[0]
        errors[source] = relative_error(_forward(layer, x), reference_output(weights, x))
        assert layer.extra_metrics()["merge_calib_fidelity_err"] == pytest.approx(
            errors[source], rel=0.5
        )
    assert errors["redundant:0.9"] < 0.4 * errors["random"]


def test_merging_recovers_the_clusters_of_redundant_weights():
    case = _merging_case(options={"keep_ratio": 0.25}, weights="redundant:0.8", hidden=64, ffn=96)
    clusters = redundant_cluster_of(case)
    expected = sorted(sorted(e for e in range(8) if clusters[e] == c) for c in (0, 1))
    for merge_by in ("weights", "outputs"):
        layer = merging.build(
            make_weights(case), case.with_(options=(("keep_ratio", 0.25), ("merge_by", merge_by)))
        )
        assert layer.groups == expected


def test_merging_weight_bytes_saved_by_hand():
    case = _merging_case(options={"keep_ratio": 0.5}, num_experts=8, hidden=32, ffn=48)
    weights = make_weights(case)
    layer = merging.build(weights, case)
    saved = (8 - 4) * 3 * 32 * 48 * 4  # experts removed x (gate + up + down) x float32 bytes
    metrics = layer.extra_metrics()
    assert metrics["merge_experts_kept"] == 4 and metrics["merge_saved_weight_bytes"] == saved
    group_map = 8 * 8  # the layer's expert -> group table (int64)
    assert weight_bytes(GroupedMoE(weights, case)) - weight_bytes(layer) == saved - group_map
    assert sum(metrics["merge_group_sizes"]) == 8 and "merge_groups_per_token" not in metrics
    total, active = layer.param_counts()
    assert total == 4 * 3 * 32 * 48 + 32 * 8 and active == 2 * 3 * 32 * 48 + 32 * 8


def test_merged_expert_is_the_usage_weighted_average():
    case = _merging_case(options={"keep_ratio": 0.5})
    weights = make_weights(case)
    plan = merging.merge_plan(weights, case)
    group = next(g for g in plan.groups if len(g) > 1)
    index = plan.groups.index(group)
    usage = plan.usage_E[group]
    expected = sum(u * weights.w_up_EDF[e].double() for u, e in zip(usage, group)) / usage.sum()
    assert torch.allclose(plan.w_up_GDF[index].double(), expected, atol=1e-7)
    assert plan.usage_E.sum() == plan.calib_x_ND.shape[0] * 2 + 8  # assignments + smoothing


def test_merging_combines_a_tokens_duplicate_groups():
    case = _merging_case(options={"keep_ratio": 0.25}, batch=8)
    weights = make_weights(case)
    layer = merging.build(weights, case)
    x = make_inputs(case, 1)[0]
    y = _forward(layer, x)
    stats = layer.stats()
    assert len(stats.tokens_per_expert) == 2 and stats.dropped_slots == 0
    # every token picked 2 experts; some picked two of one group and count once
    assert case.tokens <= sum(stats.tokens_per_expert) < case.tokens * 2
    assert (
        layer.extra_metrics()["merge_groups_per_token"]
        == sum(stats.tokens_per_expert) / case.tokens
    )
    assert relative_error(y, merging.merged_reference([weights], x, case)) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merging_matches_its_design_reference(dtype):
    case = _merging_case(
        options={"keep_ratio": 0.5, "merge_by": "outputs"}, dtype=dtype, shared_experts=1, top_k=3
    )
    weights = make_weights(case)
    x = make_inputs(case, 1)[0]
    y = _forward(merging.build(weights, case), x)
    assert relative_error(y, merging.merged_reference([weights], x, case)) <= TOLERANCE[dtype]


def test_merge_rules():
    assert [merging.kept_experts(8, r) for r in (0.25, 0.5, 0.75, 1.0, 0.01)] == [2, 4, 6, 8, 1]
    assert merging.kept_experts(5, 0.5) == 3  # 2.5 rounds up
    similarity = torch.tensor(
        [
            [1.0, 0.9, 0.1, 0.0],
            [0.9, 1.0, 0.2, 0.1],
            [0.1, 0.2, 1.0, 0.5],
            [0.0, 0.1, 0.5, 1.0],
        ]
    )
    assert merging.agglomerate(similarity, 3) == [[0, 1], [2], [3]]
    assert merging.agglomerate(similarity, 2) == [[0, 1], [2, 3]]
    assert merging.agglomerate(similarity, 1) == [[0, 1, 2, 3]]
    assert merging.agglomerate(torch.zeros(3, 3), 2) == [[0, 1], [2]]  # ties: lowest ids


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"keep_ratio": 0}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"merge_by": "vibes"}, r"merge_by.*'weights', 'outputs'"),
        ({"calib_tokens": 0}, "calib_tokens"),
    ],
)
def test_merging_bad_options_are_named(options, match):
    case = _merging_case(options=options)
    with pytest.raises(ValueError, match=match):
        merging.build(make_weights(case), case)


# --------------------------------------------------------------------------- offload


def _offload(cache, **changes):
    changes.setdefault("num_experts", 8)
    options = () if cache is None else (("cache_experts", cache),)
    case = tiny_case("offload", options=options, **changes)
    weights = make_weights(case)
    return case, weights, offload.build(weights, case)


def test_cache_sizes():
    assert offload.cache_slots(8, None) == 4 and offload.cache_slots(1, None) == 1
    assert offload.cache_slots(8, 3) == 3 and offload.cache_slots(8, 0.25) == 2
    assert offload.cache_slots(8, 1.0) == 8 and offload.cache_slots(6, 0.25) == 2  # 1.5 up
    for bad in (0, 9, 0.0, 1.5, "4", True):
        with pytest.raises(ValueError, match="cache_experts"):
            offload.cache_slots(8, bad)


def test_lru_evicts_the_least_recently_used_unpinned_expert():
    lru = offload.ExpertLRU(3)
    for expert in (10, 11, 12):
        slot, evicted = lru.take()
        assert evicted is None
        lru.put(expert, slot)
    lru.use(10)  # order now 11, 12, 10
    assert lru.experts() == [11, 12, 10]
    slot, evicted = lru.take()
    assert (slot, evicted) == (0 + 1, 11)  # 11 sat in slot 1
    lru.put(13, slot)
    slot, evicted = lru.take(pinned={12})  # 12 is needed: the next oldest goes
    assert evicted == 10 and lru.experts() == [12, 13]
    lru.put(14, slot)
    with pytest.raises(offload.NoFreeSlotError):
        lru.take(pinned={12, 13, 14})


def test_offload_cache_of_every_expert_never_misses_after_the_first_forward():
    case, weights, layer = _offload(8)
    expert_bytes = 3 * 32 * 48 * 4
    xs = make_inputs(case, 2)
    for x in [*xs, *xs]:
        assert relative_error(_forward(layer, x), reference_output(weights, x)) < 1e-6
    metrics = layer.extra_metrics()
    assert metrics["offload_cold_h2d_bytes"] == 8 * expert_bytes  # the first loads all
    assert metrics["offload_h2d_bytes"] == 0 and metrics["offload_hit_rate"] == 1.0
    assert metrics["offload_miss_count"] == 0 and metrics["offload_forwards"] == 4
    assert metrics["comm_bytes"] == 0 and metrics["offload_cache_experts"] == 8


def test_offload_cache_of_one_is_still_the_reference():
    case, weights, layer = _offload(1, shared_experts=1, top_k=3)
    for x in make_inputs(case, 3):
        assert relative_error(_forward(layer, x), reference_output(weights, x)) < 1e-6
    metrics = layer.extra_metrics()
    expert_bytes = 3 * 32 * 48 * 4
    # each forward misses every expert it needs but the one left cached
    assert metrics["offload_h2d_bytes"] == metrics["offload_miss_count"] * expert_bytes > 0
    assert metrics["offload_copy_ms"] == metrics["comm_ms"] > 0
    assert weight_bytes(layer) == 32 * 8 * 4 + 8 * 4 + expert_bytes + expert_bytes  # +shared


def test_offload_forward_follows_lru_order():
    case, weights, layer = _offload(2, num_experts=4, top_k=1)
    x = make_inputs(case, 1)[0]

    def route_to(expert: int) -> None:
        bias = torch.full((4,), -1e4)
        bias[expert] = 0.0
        layer.router.bias_E.copy_(bias)

    route_to(2)
    _forward(layer, x)
    assert layer.lru.experts() == [2, 0]  # needed 2; the free slot filled with expert 0
    # least recently used first; FIFO would evict 0 rather than 1 when 3 comes
    for expert, cached in ((1, [0, 1]), (0, [1, 0]), (3, [0, 3]), (0, [3, 0]), (2, [0, 2])):
        route_to(expert)
        y = _forward(layer, x)
        assert layer.lru.experts() == cached
        assert relative_error(y, reference_output(layer_weights(weights, layer), x)) < 1e-6
    metrics = layer.extra_metrics()
    assert metrics["offload_hit_rate"] == pytest.approx(2 / 5)  # the two routed to 0 hit


def layer_weights(weights, layer):
    """`weights` with the router bias the test set on the layer."""
    from dataclasses import replace

    return replace(weights, router_bias_E=layer.router.bias_E.clone())


def test_offload_host_store_is_a_copy():
    _, weights, layer = _offload(2)
    assert layer.host_gate_EDF.data_ptr() != weights.w_gate_EDF.data_ptr()
    assert torch.equal(layer.host_gate_EDF, weights.w_gate_EDF.cpu())
    assert layer.extra_metrics()["offload_host_bytes"] == 8 * 3 * 32 * 48 * 4
    assert math.isnan(layer.extra_metrics()["offload_hit_rate"])  # no forward yet


# ----------------------------------------------------------------------- end to end


def _run(tmp_path, cases):
    from moebench.runner import run_cases
    from moebench.store import read_run

    outcome = run_cases(
        cases, suite_name="t", plan=FAST_PLAN, timeout_s=60, out_root=tmp_path, isolate=False
    )
    frame = read_run(outcome.results_path)
    assert set(frame["status"]) == {"ok"}, frame["error"].tolist()
    return frame


def test_end_to_end_merging(tmp_path):
    stacked = Workload(2, 8, "forward", layers=2)
    cases = [
        _merging_case(options={"keep_ratio": 0.5}, weights="redundant:0.8"),
        _merging_case(options={"keep_ratio": 0.5, "merge_by": "outputs"}),
        _merging_case(options={"keep_ratio": 0.25}).with_(workload=stacked),
    ]
    frame = _run(tmp_path, cases)
    assert (frame["rel_err"] <= frame["tolerance"]).all()
    # a stack's output carries the residual x, so its relative deviation is smaller
    assert (frame["fidelity_err"] > [0.01, 0.01, 1e-4]).all() and not frame["exact"].any()
    assert list(frame["weights"]) == ["redundant:0.8", "random", "random"]
    assert list(frame["merge_experts_kept"]) == [4, 4, 2]  # the stack: the mean of 2 layers
    assert list(frame["merge_saved_weight_bytes"]) == [4 * 3 * 32 * 48 * 4] * 2 + [
        2 * 6 * 3 * 32 * 48 * 4
    ]  # summed over the stack's layers
    assert (frame["merge_calib_fidelity_err"] > 0).all()


def test_end_to_end_offload(tmp_path):
    cases = [tiny_case("offload", num_experts=8, options=(("cache_experts", c),)) for c in (2, 8)]
    frame = _run(tmp_path, cases)
    assert (frame["rel_err"] <= frame["tolerance"]).all() and frame["exact"].all()
    by_cache = frame.set_index("offload_cache_experts")
    assert by_cache.loc[8, "offload_hit_rate"] == 1.0 and by_cache.loc[8, "comm_ms"] == 0
    assert by_cache.loc[2, "offload_h2d_bytes"] > 0 and by_cache.loc[2, "comm_ms"] > 0
    assert by_cache.loc[2, "comm_bytes"] == round(by_cache.loc[2, "offload_h2d_bytes"])


def test_end_to_end_checkpoint_weights(tmp_path):
    pytest.importorskip("safetensors")
    write_checkpoint(tmp_path / "ckpt", "olmoe", layers=2)
    cases = [
        _ckpt_case(tmp_path / "ckpt", 0).with_(impl=impl)
        for impl in ("grouped", "offload", "merging")
    ]
    frame = _run(tmp_path / "out", cases)
    assert set(frame["weights"]) == {f"checkpoint:{tmp_path / 'ckpt'}:0"}


@pytest.mark.parametrize(("name", "count"), [("merging", 16), ("offload", 16), ("seeds", 20)])
def test_design_suites_load(name, count):
    import importlib

    from moebench.suite import load_suite

    needed = ["deepseek", "moepp", "dsmoe", "topp"] if name == "seeds" else []
    for module in needed:  # written beside these; registered once they are built-ins
        pytest.importorskip(f"moebench.impls.{module}")
    importlib.import_module("moebench.impls.merging")
    importlib.import_module("moebench.impls.offload")
    suite = load_suite(Path(__file__).parents[1] / "suites" / f"{name}.toml", device="cpu")
    assert len(suite.cases) == count and suite.cases[0].impl == "grouped"
