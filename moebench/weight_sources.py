"""Weight sources other than "random": weights that mean something.

Shape legend: D hidden, F expert ffn width, E routed experts, C clusters of experts,
S shared-expert width (shared_experts x F), P x Q one expert matrix (D x F or F x D).

`Case.weights` names the source; `make_weights(case, layer)` here is the entry point for
every source ("random" is drawn by `moebench.weights.random_weights`):

- "random": N(0, 0.02^2) experts (moebench.weights; not handled here).
- "redundant:R", 0 <= R <= 1: synthetic redundant experts, for studying merging and
  pruning. The E experts fall into C = max(1, round(E x (1 - R))) clusters (a seeded
  permutation of the experts dealt round-robin, so cluster sizes differ by at most one);
  each cluster has a centroid c drawn like a random expert, and expert e of cluster k is

      w_e = sqrt(R) x c_k + sqrt(1 - R) x n_e,   n_e drawn like a random expert,

  for each of its three matrices. Every expert keeps the variance of a random expert
  (0.02^2 per entry) for every R, and two experts of one cluster have expected cosine
  similarity R: R = 0 gives independent experts (and E clusters of one), R = 1 gives
  identical copies within each cluster (and one cluster). The router weights, the routing
  bias and the shared experts are those of "random" (random_weights draws the case's
  set, then the routed experts are replaced). Deterministic in shape,
  seed, layer and R: the generator is seeded with seed + LAYER_SEED_STRIDE x layer +
  REDUNDANT_SEED_OFFSET (the offset keeps the centroids from repeating the router's
  numbers, which random_weights draws from seed + LAYER_SEED_STRIDE x layer).
- "checkpoint:PATH:LAYER": one MoE layer of a Hugging Face checkpoint in the local folder
  PATH (config.json + *.safetensors, sharded through model.safetensors.index.json or
  not); LAYER is the checkpoint's layer index for the case's first layer, and layer i of
  a stacked case (Workload.layers > 1) is checkpoint layer LAYER + i. PATH may contain
  colons (the last one separates LAYER). Nothing is downloaded: the files must be there.
  Needs the `safetensors` package (`pip install safetensors`).

Checkpoint layouts recognised (L = layer index, any prefix before `layers.` accepted, so
`model.language_model.layers.{L}` works too; HF Linear weights are (out, in) and are
transposed into ExpertWeights' (E, D, F) / (E, F, D)):

- Mixtral: router `block_sparse_moe.gate`; experts `block_sparse_moe.experts.{e}.w1`
  (gate), `w3` (up), `w2` (down).
- Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3: router `mlp.gate`; experts
  `mlp.experts.{e}.gate_proj`, `up_proj`, `down_proj`.
- stacked (transformers 5's in-memory layout), under either router's block:
  `experts.gate_up_proj` (E, 2F, D), gate rows first, and `experts.down_proj` (E, D, F).

A stacked tensor stored input-major ((E, D, 2F) and (E, F, D), as Llama 4 does) is
recognised by its shape (where both readings have one shape, D = 2F or D = F, the
transformers 5 reading is taken). Shared experts: Qwen2-MoE's `mlp.shared_expert.*`
and DeepSeek's `mlp.shared_experts.*` become the case's shared experts (their width must be
a multiple of F: shared_experts = width / F). DeepSeek-V3 FP8 weights with
`weight_scale_inv` block scales are dequantised (block size from config.json's
quantization_config.weight_block_size, default 128 x 128).

What moebench computes with them is the case's layer: its router convention
(LayerShape: scoring, norm_topk_prob, groups, correction bias, routed scaling, shared-
expert gate; a preset carries its model's) on the checkpoint's tensors. The convention's
own weights come from the checkpoint:

- DeepSeek-V3's `gate.e_score_correction_bias` becomes `correction_bias_E` (float32, E)
  when the case's convention has correction_bias (the deepseek-v3 preset); zeros if the
  checkpoint has none. A checkpoint's bias that the convention does not use is ignored
  with a warning (it is a selection-only bias on sigmoid scores, never folded into
  `router_bias_E`, which would change the gates).
- Qwen2-MoE's `shared_expert_gate` (a D -> 1 linear) becomes `w_shared_expert_gate_D`
  when the case's convention has shared_expert_gate = "sigmoid" (the qwen2-moe preset);
  a checkpoint without one is an error then, and one the convention does not use is
  ignored with a warning.

The checkpoint's config.json is not read for the convention: a case says which function
it computes (a suite's preset and keys), and the checkpoint gives the numbers.

Checked against transformers 5 on tiny blocks (tests/test_presets_hf.py loads the same
weights into Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 blocks and compares
outputs); the safetensors layouts below against save_pretrained's output of tiny models.

Dimensions come from config.json (hidden_size; moe_intermediate_size, else
intermediate_size; num_local_experts / num_experts / n_routed_experts; a nested
`text_config` is read when the top level has no hidden_size) and are checked against
every tensor read; the case's hidden, ffn, num_experts and shared_experts must equal the
checkpoint's (the error names both). top_k is not checked: a case may route a
checkpoint's layer with another top_k than num_experts_per_tok. The case's routing spec
still adds its bias on top of the checkpoint's router.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from moebench.case import Case
from moebench.checkpoint import CheckpointError, CheckpointSpec, checkpoint_weights
from moebench.weights import (
    LAYER_SEED_STRIDE,
    WEIGHT_STD,
    ExpertWeights,
    random_weights,
    torch_dtype,
)

__all__ = [
    "WEIGHTS_FORMS",
    "CheckpointError",
    "CheckpointSpec",
    "RedundantSpec",
    "WeightSpecError",
    "make_weights",
    "parse_weights_spec",
    "redundant_clusters",
    "validate_weights_spec",
]

WEIGHTS_FORMS = (
    '"random", "redundant:R" (a number 0 <= R <= 1), '
    '"checkpoint:PATH:LAYER" (a local folder of safetensors + config.json, LAYER an int >= 0)'
)
REDUNDANT_SEED_OFFSET = 4_000_037


class WeightSpecError(ValueError):
    """A `weights` spec that does not parse."""


@dataclass(frozen=True)
class RedundantSpec:
    """ "redundant:R": synthetic experts clustered with redundancy R in [0, 1]."""

    redundancy: float


def parse_weights_spec(spec: str) -> RedundantSpec | CheckpointSpec | None:
    """The parsed spec (None for "random"); raises WeightSpecError naming the spec and the
    allowed forms. Reads no file: whether a checkpoint exists is checked when loading."""
    if not isinstance(spec, str):
        raise WeightSpecError(f"bad weights {spec!r}: not a string; allowed: {WEIGHTS_FORMS}")
    kind, sep, rest = spec.partition(":")
    if kind == "random" and not sep:
        return None
    if kind == "redundant" and sep:
        try:
            redundancy = float(rest)
        except ValueError:
            redundancy = math.nan
        if not 0.0 <= redundancy <= 1.0:  # also refuses nan
            raise WeightSpecError(
                f"bad weights {spec!r}: R must be a number with 0 <= R <= 1, got {rest!r}; "
                f"allowed: {WEIGHTS_FORMS}"
            )
        return RedundantSpec(redundancy)
    if kind == "checkpoint" and sep:
        path, colon, layer_text = rest.rpartition(":")
        if not colon or not path:
            raise WeightSpecError(
                f"bad weights {spec!r}: expected checkpoint:PATH:LAYER (a folder and a layer "
                f"index); allowed: {WEIGHTS_FORMS}"
            )
        if not re.fullmatch(r"\d+", layer_text):
            raise WeightSpecError(
                f"bad weights {spec!r}: LAYER must be an int >= 0, got {layer_text!r}; "
                f"allowed: {WEIGHTS_FORMS}"
            )
        return CheckpointSpec(path, int(layer_text))
    raise WeightSpecError(f"bad weights {spec!r}; allowed: {WEIGHTS_FORMS}")


def validate_weights_spec(spec: str) -> str | None:
    """A sentence saying what is wrong with `spec`, or None if it parses (for suites)."""
    try:
        parse_weights_spec(spec)
    except WeightSpecError as exc:
        return str(exc)
    return None


def make_weights(case: Case, layer: int = 0) -> ExpertWeights:
    """The weight set of layer `layer` of `case` from the source `case.weights` names
    (deterministic in the case and the layer index)."""
    spec = parse_weights_spec(case.weights)
    if spec is None:
        return random_weights(case, layer)
    if isinstance(spec, RedundantSpec):
        loaded = redundant_weights(case, layer, spec.redundancy)
    else:
        loaded = checkpoint_weights(case, layer, spec)
    loaded.layer = layer
    return loaded


# --------------------------------------------------------------------------- redundant


def redundant_clusters(num_experts: int, redundancy: float) -> int:
    """Clusters of "redundant:R" experts: max(1, round(E x (1 - R))), half rounded up."""
    return max(1, math.floor(num_experts * (1.0 - redundancy) + 0.5))


def redundant_cluster_of(case: Case, layer: int = 0) -> list[int]:
    """The cluster of each expert of `case`'s layer `layer` under "redundant:R" (as
    drawn by `redundant_weights`): a seeded permutation dealt round-robin."""
    spec = parse_weights_spec(case.weights)
    if not isinstance(spec, RedundantSpec):
        raise WeightSpecError(f"weights {case.weights!r} is not a redundant:R spec")
    num_experts = case.shape.num_experts
    clusters = redundant_clusters(num_experts, spec.redundancy)
    generator = torch.Generator().manual_seed(_redundant_seed(case, layer))
    order = torch.randperm(num_experts, generator=generator)
    cluster_of = [0] * num_experts
    for rank, expert in enumerate(order.tolist()):
        cluster_of[expert] = rank % clusters
    return cluster_of


def _redundant_seed(case: Case, layer: int) -> int:
    return case.seed + LAYER_SEED_STRIDE * layer + REDUNDANT_SEED_OFFSET


def redundant_weights(case: Case, layer: int, redundancy: float) -> ExpertWeights:
    """ "redundant:R" weights (module docstring): the random weight set with its routed
    experts replaced by clustered ones."""
    weights = random_weights(case, layer)
    shape = case.shape
    device = torch.device(case.device)
    dtype = torch_dtype(case.dtype)
    cluster_of = redundant_cluster_of(case, layer)
    clusters = max(cluster_of) + 1
    generator = torch.Generator(device=device).manual_seed(_redundant_seed(case, layer) + 1)
    shared_part, own_part = math.sqrt(redundancy), math.sqrt(1.0 - redundancy)
    D, F, E = shape.hidden, shape.ffn, shape.num_experts

    def clustered(rows: int, cols: int) -> torch.Tensor:
        centroids_CPQ = torch.randn(
            clusters, rows, cols, generator=generator, device=device, dtype=torch.float32
        )
        experts_EPQ = torch.randn(
            E, rows, cols, generator=generator, device=device, dtype=torch.float32
        )
        experts_EPQ.mul_(own_part)
        for expert, cluster in enumerate(cluster_of):  # in place: no E x rows x cols temp
            experts_EPQ[expert].add_(centroids_CPQ[cluster], alpha=shared_part)
        return experts_EPQ.mul_(WEIGHT_STD).to(dtype)

    weights.w_gate_EDF = clustered(D, F)
    weights.w_up_EDF = clustered(D, F)
    weights.w_down_EFD = clustered(F, D)
    return weights
