"""Named layer shapes of real models (one MoE layer each), for suites' `preset` key.

Dimensions are those of the models' published configs. Every expert is modelled as a
SwiGLU expert (gate, up, down); Switch Transformers' experts are a two-matrix ReLU FFN in
the original, so its parameter count here is 1.5x the original's.
"""

from __future__ import annotations

from moebench.case import LayerShape

PRESETS: dict[str, LayerShape] = {
    # Mixtral-8x7B: hidden_size 4096, intermediate_size 14336, 8 experts, top-2.
    "mixtral-8x7b": LayerShape(hidden=4096, ffn=14336, num_experts=8, top_k=2),
    # Qwen3-30B-A3B: hidden_size 2048, moe_intermediate_size 768, 128 experts, top-8.
    "qwen3-30b-a3b": LayerShape(hidden=2048, ffn=768, num_experts=128, top_k=8),
    # DeepSeek-V3: hidden_size 7168, moe_intermediate_size 2048, 256 routed, top-8, 1 shared.
    "deepseek-v3": LayerShape(hidden=7168, ffn=2048, num_experts=256, top_k=8, shared_experts=1),
    # OLMoE-1B-7B: hidden_size 2048, intermediate_size 1024, 64 experts, top-8.
    "olmoe-1b-7b": LayerShape(hidden=2048, ffn=1024, num_experts=64, top_k=8),
    # Switch-Base-8: d_model 768, d_ff 3072, 8 experts, top-1, capacity factor 1.25.
    "switch-base-8": LayerShape(hidden=768, ffn=3072, num_experts=8, top_k=1, capacity_factor=1.25),
    # Qwen1.5-MoE-A2.7B (Qwen2-MoE architecture): hidden 2048, moe_intermediate 1408,
    # 60 experts, top-4, one shared expert of width 5632 = 4 experts of width 1408.
    "qwen2-moe": LayerShape(hidden=2048, ffn=1408, num_experts=60, top_k=4, shared_experts=4),
}
