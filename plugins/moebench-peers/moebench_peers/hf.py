"""Hugging Face transformers' MoE blocks as moebench implementations, on moebench's weights.

One implementation per block and experts backend: `hf-<block>:<backend>`, e.g.
`hf-mixtral:grouped_mm`. transformers 5 routes every block's experts through one switch,
`config._experts_implementation` (set here with the config's `experts_implementation`
argument): "eager" is the block's own per-expert loop; "batched_mm" and "grouped_mm"
replace it with batched or grouped GEMMs; "deepgemm" and "sonicmoe" call kernels that
transformers loads from the Hugging Face Hub (`kernels` package): registered too, and
refused at build where they do not run (no download here, no such GPU).

Each block is built from a config at the case's shape on the meta device (no download, no
memory), then EVERY parameter and persistent buffer is assigned from the case's weight
set: a block from a config holds uninitialised weights, and timing those is meaningless
(a degenerate router sends every token to the same experts). A parameter the weight set
has no value for refuses the case (`UnsupportedCaseError`) instead of staying uninitialised.

Layout: moebench keeps w_gate_EDF, w_up_EDF, w_down_EFD and w_router_DE; transformers
keeps experts.gate_up_proj [E, 2F, D] (gate rows first), experts.down_proj [E, D, F],
gate.weight [E, D]. The conversion copies the weights once, in `build` (not timed).

The router's logits and choices are float32 in every adapter, as moebench's router and
DeepSeek-V3's own are: in bfloat16 the near-tied top-k choices of a real-size router flip
against the float32 reference, and the check would measure rounding, not the block. Its
gates reach the experts in the dtype the block's own router gives them (the tokens' dtype
for Qwen2/3-MoE and OLMoE, float32 for Mixtral and DeepSeek-V3), so the experts' work is
the block's. The router's cost is small next to the experts'; `impl_detail` says so.

Refused cases (the message says which): transformers missing or older than 5; a backend
this transformers lacks or that does not run here; a routing bias (moebench's "zipf"/"hot"
routing: HF routers have no logit bias); shared experts in a block without any; Qwen2-MoE's
sigmoid shared-expert gate, which moebench's weight set does not hold (yet: it is read from
the weight set's `w_shared_expert_gate_D` where present); DeepSeek-V3's 8 groups on an
expert count they do not divide into groups of at least 2; for Mixtral and Qwen3-MoE, a
case whose own router convention (where moebench's LayerShape carries one) is not theirs.
Refusals subclass moebench's `registry.Unsupported` where it exists (a `skipped` row).

Shape legend: T tokens, D hidden, F expert width, E routed experts, S shared width.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from moebench import register
from moebench.case import Case, LayerShape
from moebench.weights import ExpertWeights
from moebench_peers.conventions import (
    MOEBENCH_BASE,
    SHARED_GATE_WEIGHT,
    Convention,
    case_convention,
    convention_reference,
    correction_bias,
)
from moebench_peers.recorder import RoutingRecorder
from moebench_peers.refusal import UnsupportedCaseError

# Backends every transformers 5 has, and those that need a kernel from outside (the Hub's
# `kernels` package, CUDA, a Hopper GPU): registered by name without importing transformers
# (plugins load on every moebench command), refused at build where they do not run.
CORE_BACKENDS: tuple[str, ...] = ("eager", "batched_mm", "grouped_mm")
KERNEL_BACKENDS: tuple[str, ...] = ("deepgemm", "sonicmoe")
INSTALL_HINT = "pip install 'moebench-peers[hf]' (transformers >= 5)"


@dataclass(frozen=True)
class BlockSpec:
    """One transformers MoE block: where it lives, how to configure it, what it computes.

    shared: "none" (no shared expert), "plain" (added ungated), "gated" (Qwen2-MoE's
    sigmoid gate). shared_prefix: the shared expert's module name in the block.
    gates_in_input_dtype: the router hands the experts its gates rounded to the tokens'
    dtype (Qwen2/3-MoE, OLMoE), not in float32 (Mixtral, DeepSeek-V3).
    """

    name: str
    module: str
    block_class: str
    config_class: str
    convention: Convention
    shared: Literal["none", "plain", "gated"]
    config_kwargs: Callable[[LayerShape], dict[str, Any]]
    shared_prefix: str = ""
    gates_in_input_dtype: bool = False

    @property
    def exact(self) -> bool:
        """Computes moebench's base MoE function (checked against `reference`)."""
        return self.convention == MOEBENCH_BASE


DEEPSEEK_V3 = Convention(
    scoring="sigmoid", norm_topk_prob=True, n_groups=8, topk_groups=4, routed_scaling=2.5
)

BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(
        "mixtral",
        "transformers.models.mixtral.modeling_mixtral",
        "MixtralSparseMoeBlock",
        "MixtralConfig",
        MOEBENCH_BASE,
        "none",
        lambda s: dict(
            intermediate_size=s.ffn,
            num_local_experts=s.num_experts,
            router_jitter_noise=0.0,
        ),
    ),
    BlockSpec(
        "qwen3-moe",
        "transformers.models.qwen3_moe.modeling_qwen3_moe",
        "Qwen3MoeSparseMoeBlock",
        "Qwen3MoeConfig",
        MOEBENCH_BASE,
        "none",
        lambda s: dict(moe_intermediate_size=s.ffn, num_experts=s.num_experts, norm_topk_prob=True),
        gates_in_input_dtype=True,
    ),
    BlockSpec(
        "olmoe",
        "transformers.models.olmoe.modeling_olmoe",
        "OlmoeSparseMoeBlock",
        "OlmoeConfig",
        Convention(norm_topk_prob=False),
        "none",
        lambda s: dict(intermediate_size=s.ffn, num_experts=s.num_experts, norm_topk_prob=False),
        gates_in_input_dtype=True,
    ),
    BlockSpec(
        "qwen2-moe",
        "transformers.models.qwen2_moe.modeling_qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        "Qwen2MoeConfig",
        Convention(norm_topk_prob=False, shared_gate=True),
        "gated",
        lambda s: dict(
            moe_intermediate_size=s.ffn,
            num_experts=s.num_experts,
            norm_topk_prob=False,
            shared_expert_intermediate_size=s.shared_experts * s.ffn,
        ),
        shared_prefix="shared_expert",
        gates_in_input_dtype=True,
    ),
    BlockSpec(
        "deepseek-v3",
        "transformers.models.deepseek_v3.modeling_deepseek_v3",
        "DeepseekV3MoE",
        "DeepseekV3Config",
        DEEPSEEK_V3,
        "plain",
        lambda s: dict(
            moe_intermediate_size=s.ffn,
            n_routed_experts=s.num_experts,
            n_shared_experts=s.shared_experts,
            n_group=DEEPSEEK_V3.n_groups,
            topk_group=DEEPSEEK_V3.topk_groups,
            routed_scaling_factor=DEEPSEEK_V3.routed_scaling,
            norm_topk_prob=True,
        ),
        shared_prefix="shared_experts",
    ),
)


def _transformers(impl: str) -> Any:
    """transformers, with its experts interface, or a refusal naming what to install."""
    try:
        transformers = importlib.import_module("transformers")
        importlib.import_module("transformers.integrations.moe")
    except ImportError as exc:
        raise UnsupportedCaseError(
            impl, f"transformers >= 5 is not importable ({exc}); {INSTALL_HINT}"
        ) from None
    return transformers


def installed_backends() -> tuple[str, ...]:
    """Experts backends of the installed transformers ("eager" first); () without it."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return ()
    return ("eager", *ALL_EXPERTS_FUNCTIONS.keys())


def refusal_for_shape(spec: BlockSpec, weights: ExpertWeights) -> str | None:
    """Why the block cannot compute this weight set's layer faithfully, or None."""
    shape = weights.shape
    if spec.exact and case_convention(shape) != MOEBENCH_BASE:
        return (
            f"the case's router is {case_convention(shape).describe()}; "
            f"{spec.block_class} computes {spec.convention.describe()}"
        )
    if bool(weights.router_bias_E.any()):
        return (
            "the weight set has a router logit bias (routing other than 'uniform') and "
            f"{spec.block_class}'s router has none"
        )
    if spec.shared == "none" and shape.shared_experts:
        return f"{spec.block_class} has no shared expert; the shape has {shape.shared_experts}"
    if spec.shared == "gated" and getattr(weights, SHARED_GATE_WEIGHT, None) is None:
        return (
            f"{spec.block_class}'s sigmoid shared-expert gate (shared_expert_gate.weight) has "
            f"no value in moebench's weight set (no {SHARED_GATE_WEIGHT}); it would stay "
            "uninitialised"
        )
    groups = spec.convention.n_groups
    if groups > 1:
        per_group = shape.num_experts // groups
        if shape.num_experts % groups or per_group < 2:
            return (
                f"{groups} expert groups of >= 2 experts need E divisible by {groups} "
                f"and >= {2 * groups}, got {shape.num_experts}"
            )
        if spec.convention.topk_groups * per_group < shape.top_k:
            return (
                f"{spec.convention.topk_groups} groups of {per_group} experts < top_k {shape.top_k}"
            )
    return None


def state_from_weights(spec: BlockSpec, weights: ExpertWeights) -> dict[str, torch.Tensor]:
    """The block's state dict in transformers' names and layouts, from moebench's weights."""
    state = {
        "gate.weight": weights.w_router_DE.float().t().contiguous(),
        "experts.gate_up_proj": torch.cat(
            [weights.w_gate_EDF.transpose(1, 2), weights.w_up_EDF.transpose(1, 2)], dim=1
        ).contiguous(),
        "experts.down_proj": weights.w_down_EFD.transpose(1, 2).contiguous(),
    }
    if spec.shared != "none":
        D, dtype, device = weights.shape.hidden, weights.dtype, weights.device
        empty_DS = torch.empty(D, 0, dtype=dtype, device=device)
        gate_DS = weights.w_shared_gate_DS if weights.w_shared_gate_DS is not None else empty_DS
        up_DS = weights.w_shared_up_DS if weights.w_shared_up_DS is not None else empty_DS
        down_SD = weights.w_shared_down_SD if weights.w_shared_down_SD is not None else empty_DS.t()
        prefix = spec.shared_prefix
        state[f"{prefix}.gate_proj.weight"] = gate_DS.t().contiguous()
        state[f"{prefix}.up_proj.weight"] = up_DS.t().contiguous()
        state[f"{prefix}.down_proj.weight"] = down_SD.t().contiguous()
    if spec.shared == "gated":
        gate_D = getattr(weights, SHARED_GATE_WEIGHT)
        state["shared_expert_gate.weight"] = gate_D.to(weights.dtype).reshape(1, -1).contiguous()
    if spec.convention.n_groups > 1:
        # DeepSeek-V3's selection bias: the weight set's where it has one, else zero (an
        # untrained router's, and what moebench's references use without one).
        state["gate.e_score_correction_bias"] = correction_bias(weights).contiguous()
    return state


def load_every_parameter(impl: str, block: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Assign `state` to `block` (built on the meta device); refuse the case if any
    parameter or buffer would be left without a value."""
    expected = set(block.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise UnsupportedCaseError(impl, f"no value in the weight set for {', '.join(missing)}")
    unexpected = sorted(set(state) - expected)
    assert not unexpected, f"{impl}: the adapter maps names the block lacks: {unexpected}"
    block.load_state_dict(state, strict=True, assign=True)
    unset = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
    if unset:
        raise UnsupportedCaseError(impl, f"left uninitialised after loading: {', '.join(unset)}")


def _float32_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the router sees float32 tokens (its weight is float32)."""
    return (args[0].float(), *args[1:])


class HFBlockLayer(RoutingRecorder, nn.Module):
    """A transformers MoE block behind moebench's layer interface: x_TD -> y_TD.

    Hooks on the block's router: its input goes in as float32 (its weight is float32);
    its gates come out in the dtype the block's own router gives its experts (so the
    experts' arithmetic and memory traffic are the block's); its choices are recorded."""

    def __init__(self, block: nn.Module, spec: BlockSpec, weights: ExpertWeights, detail: str):
        nn.Module.__init__(self)
        self.block = block
        self.num_experts = weights.shape.num_experts
        self.scoring = spec.convention.scoring
        self.gate_dtype = weights.dtype if spec.gates_in_input_dtype else torch.float32
        self.impl_detail = detail
        block.gate.register_forward_pre_hook(_float32_input)
        block.gate.register_forward_hook(self._gate_output)

    def _gate_output(
        self, module: nn.Module, args: Any, output: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        router_logits_TE, gate_TK, expert_ids_TK = output
        self.record(router_logits_TE, expert_ids_TK)
        return router_logits_TE, gate_TK.to(self.gate_dtype), expert_ids_TK

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.block(x_TD.unsqueeze(0)).reshape(x_TD.shape)


def build_block(spec: BlockSpec, backend: str, weights: ExpertWeights, case: Case) -> HFBlockLayer:
    """The block at the case's shape, every parameter from `weights`, experts on `backend`."""
    impl = case.impl
    transformers = _transformers(impl)
    if backend not in installed_backends():
        raise UnsupportedCaseError(
            impl, f"transformers {transformers.__version__} has no experts backend {backend!r}"
        )
    reason = refusal_for_shape(spec, weights)
    if reason is not None:
        raise UnsupportedCaseError(impl, reason)
    shape = weights.shape
    config_class = getattr(transformers, spec.config_class)
    config = config_class(
        hidden_size=shape.hidden,
        num_experts_per_tok=shape.top_k,
        hidden_act="silu",
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        experts_implementation=backend,
        **spec.config_kwargs(shape),
    )
    block_class = getattr(importlib.import_module(spec.module), spec.block_class)
    with torch.device("meta"):
        block = block_class(config)
    load_every_parameter(impl, block, state_from_weights(spec, weights))
    detail = (
        f"transformers {transformers.__version__} {spec.block_class}, experts {backend}, "
        "router float32"
    )
    layer = HFBlockLayer(block, spec, weights, detail)
    if backend not in CORE_BACKENDS:
        _probe(impl, layer, weights)
    return layer


def _probe(impl: str, layer: HFBlockLayer, weights: ExpertWeights) -> None:
    """Run two tokens through a backend that may need a kernel this machine lacks."""
    x_TD = torch.randn(2, weights.shape.hidden, device=weights.device, dtype=weights.dtype)
    try:
        with torch.no_grad():
            layer(x_TD)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise UnsupportedCaseError(
            impl, f"the experts backend does not run here ({reason})"
        ) from None


def _register(spec: BlockSpec, backend: str) -> None:
    name = f"hf-{spec.name}:{backend}"
    kind = "" if spec.exact else f" ({spec.convention.describe()}; checked against that function)"

    def build(weights: ExpertWeights, case: Case) -> nn.Module:
        return build_block(spec, backend, weights, case)

    register(
        name,
        family="hf-transformers",
        description=f"transformers' {spec.block_class}, experts backend {backend}{kind}",
        exact=spec.exact,
        reference=None if spec.exact else convention_reference(spec.convention),
    )(build)


for _spec in BLOCKS:
    for _backend in (*CORE_BACKENDS, *KERNEL_BACKENDS):
        _register(_spec, _backend)
