"""Tiny Hugging Face MoE blocks of the presets' models, holding a moebench weight set.

`hf_block(preset, weights)` builds transformers' own block (MixtralSparseMoeBlock,
Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock, OlmoeSparseMoeBlock, DeepseekV3MoE) from
the model's real config, with the dimensions scaled down to the weight set's, and loads
every parameter and buffer from the weight set (a block built from a config holds
uninitialised memory, so one left unloaded would be a silent error: `load_state_dict`
runs strict and the key sets are compared). The router keys below are copied from each
model's published config.json, independently of moebench's presets, which the tests
check against them.

Shape legend: D hidden, F expert width, E experts, S shared-expert width.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from moebench.weights import ExpertWeights

# The router keys of each model's config.json (and the block class of transformers).
REAL_ROUTER_CONFIG: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral-8x7b": (  # mistralai/Mixtral-8x7B-v0.1: always renormalises
        "mixtral",
        "MixtralSparseMoeBlock",
        {"router_jitter_noise": 0.0},
    ),
    "qwen3-30b-a3b": ("qwen3_moe", "Qwen3MoeSparseMoeBlock", {"norm_topk_prob": True}),
    "olmoe-1b-7b": ("olmoe", "OlmoeSparseMoeBlock", {"norm_topk_prob": False}),
    "qwen2-moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock", {"norm_topk_prob": False}),
    "deepseek-v3": (
        "deepseek_v3",
        "DeepseekV3MoE",
        {
            "n_group": 8,
            "topk_group": 4,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "n_shared_experts": 1,
        },
    ),
}


def _transformers() -> Any:
    return pytest.importorskip(
        "transformers",
        minversion="5.0",
        reason="comparing presets with Hugging Face blocks needs transformers >= 5 "
        "(pip install -e '.[test]')",
    )


def _config(preset: str, weights: ExpertWeights) -> Any:
    transformers = _transformers()
    module, _, router_keys = REAL_ROUTER_CONFIG[preset]
    shape = weights.shape
    D, F, E = shape.hidden, shape.ffn, shape.num_experts
    dims: dict[str, Any] = {"hidden_size": D, "num_experts_per_tok": shape.top_k}
    if module == "mixtral":
        dims.update(intermediate_size=F, num_local_experts=E)
    elif module == "olmoe":
        dims.update(intermediate_size=F, num_experts=E)
    elif module == "deepseek_v3":
        dims.update(moe_intermediate_size=F, n_routed_experts=E)
    else:
        dims.update(moe_intermediate_size=F, num_experts=E)
    if module == "qwen2_moe":
        dims["shared_expert_intermediate_size"] = shape.shared_experts * F
    config_class = getattr(
        __import__(f"transformers.models.{module}", fromlist=["x"]),
        {
            "mixtral": "MixtralConfig",
            "qwen3_moe": "Qwen3MoeConfig",
            "olmoe": "OlmoeConfig",
            "qwen2_moe": "Qwen2MoeConfig",
            "deepseek_v3": "DeepseekV3Config",
        }[module],
    )
    del transformers
    config = config_class(**dims, **router_keys)
    config._experts_implementation = "eager"  # the plain per-expert loop, on any build
    return config


def hf_state(preset: str, weights: ExpertWeights) -> dict[str, torch.Tensor]:
    """The weight set in the block's own names and layouts ((out, in) matrices; experts
    stacked, gate rows before up rows)."""
    gate_EFD = weights.w_gate_EDF.transpose(1, 2)
    up_EFD = weights.w_up_EDF.transpose(1, 2)
    state = {
        "gate.weight": weights.w_router_DE.t(),
        "experts.gate_up_proj": torch.cat([gate_EFD, up_EFD], dim=1),
        "experts.down_proj": weights.w_down_EFD.transpose(1, 2),
    }
    if weights.w_shared_gate_DS is not None:
        block = "shared_experts" if preset == "deepseek-v3" else "shared_expert"
        state[f"{block}.gate_proj.weight"] = weights.w_shared_gate_DS.t()
        state[f"{block}.up_proj.weight"] = weights.w_shared_up_DS.t()
        state[f"{block}.down_proj.weight"] = weights.w_shared_down_SD.t()
    if weights.w_shared_expert_gate_D is not None:
        state["shared_expert_gate.weight"] = weights.w_shared_expert_gate_D[None, :]
    if weights.correction_bias_E is not None:
        state["gate.e_score_correction_bias"] = weights.correction_bias_E
    return {name: t.detach().clone().contiguous() for name, t in state.items()}


def hf_block(preset: str, weights: ExpertWeights) -> nn.Module:
    """transformers' MoE block of `preset`'s model at the weight set's dimensions, with
    every parameter and buffer taken from `weights`; in eval mode, float32, on the
    weights' device."""
    config = _config(preset, weights)
    module, block_name, _ = REAL_ROUTER_CONFIG[preset]
    models = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=["x"])
    with torch.device(weights.device):
        block = getattr(models, block_name)(config).float().eval()
    state = hf_state(preset, weights)
    expected = set(block.state_dict())
    assert set(state) == expected, (
        f"{block_name}: not loaded {sorted(expected - set(state))}, "
        f"unknown {sorted(set(state) - expected)}"
    )
    # load_state_dict copies into the float32 parameters (converting): no float32 copy of
    # the state beside them (DeepSeek-V3's would be 45 GB more).
    block.load_state_dict(state, strict=True)
    return block


@torch.no_grad()
def hf_output(block: nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    """The block's output for tokens x_TD (a batch of one sequence), as T x D."""
    return block(x_TD.float()[None]).reshape(x_TD.shape)
