"""Named MoE layers of real models (one layer each, router convention included), for
suites' `preset` key.

Dimensions and router conventions are those of the models' published configs
(config.json) as transformers' modeling code reads them (checked on tiny blocks in
tests/test_presets_hf.py); a suite's explicit keys override any of them (a deliberate
departure, e.g. `norm_topk_prob = true` on olmoe-1b-7b). Every expert is modelled as a
SwiGLU expert (gate, up, down); Switch Transformers' experts are a two-matrix ReLU FFN in
the original, so its parameter count here is 1.5x the original's.
"""

from __future__ import annotations

from moebench.case import LayerShape
from moebench.routing import describe_router

PRESETS: dict[str, LayerShape] = {
    # Mixtral-8x7B: hidden_size 4096, intermediate_size 14336, 8 experts, top-2; softmax,
    # top-k always renormalised (MixtralTopKRouter).
    "mixtral-8x7b": LayerShape(hidden=4096, ffn=14336, num_experts=8, top_k=2),
    # Qwen3-30B-A3B: hidden_size 2048, moe_intermediate_size 768, 128 experts, top-8;
    # softmax, norm_topk_prob true.
    "qwen3-30b-a3b": LayerShape(hidden=2048, ffn=768, num_experts=128, top_k=8),
    # DeepSeek-V3: hidden_size 7168, moe_intermediate_size 2048, 256 routed, top-8, 1 shared
    # (ungated); scoring_func sigmoid, topk_method noaux_tc (e_score_correction_bias in the
    # selection only), n_group 8, topk_group 4, norm_topk_prob true, routed_scaling_factor
    # 2.5.
    "deepseek-v3": LayerShape(
        hidden=7168,
        ffn=2048,
        num_experts=256,
        top_k=8,
        shared_experts=1,
        scoring="sigmoid",
        n_groups=8,
        topk_groups=4,
        correction_bias=True,
        routed_scaling=2.5,
    ),
    # OLMoE-1B-7B: hidden_size 2048, intermediate_size 1024, 64 experts, top-8; softmax,
    # norm_topk_prob false (gates are the raw top-k probabilities).
    "olmoe-1b-7b": LayerShape(hidden=2048, ffn=1024, num_experts=64, top_k=8, norm_topk_prob=False),
    # Switch-Base-8: d_model 768, d_ff 3072, 8 experts, top-1, capacity factor 1.25; the
    # gate is the chosen expert's softmax probability p (SwitchTransformersTop1Router),
    # not renormalised to 1.
    "switch-base-8": LayerShape(
        hidden=768, ffn=3072, num_experts=8, top_k=1, capacity_factor=1.25, norm_topk_prob=False
    ),
    # Qwen1.5-MoE-A2.7B (Qwen2-MoE architecture): hidden 2048, moe_intermediate 1408,
    # 60 experts, top-4, norm_topk_prob false; one shared expert of width 5632 = 4 experts
    # of width 1408, scaled per token by sigmoid(shared_expert_gate(x)).
    "qwen2-moe": LayerShape(
        hidden=2048,
        ffn=1408,
        num_experts=60,
        top_k=4,
        shared_experts=4,
        norm_topk_prob=False,
        shared_expert_gate="sigmoid",
    ),
}


def preset_rows() -> list[tuple[str, str, str]]:
    """(name, shape, router convention) of every preset, for `moebench list`."""
    rows = []
    for name, shape in PRESETS.items():
        dims = f"D{shape.hidden} F{shape.ffn} E{shape.num_experts} k{shape.top_k}"
        if shape.shared_experts:
            dims += f" +{shape.shared_experts} shared"
        rows.append((name, dims, describe_router(shape)))
    return rows
