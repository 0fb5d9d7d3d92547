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

import json
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moebench.case import Case, LayerShape
from moebench.routing import routing_bias
from moebench.weights import (
    LAYER_SEED_STRIDE,
    WEIGHT_STD,
    ExpertWeights,
    has_shared_expert_gate,
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
SAFETENSORS_HINT = (
    "the checkpoint weight source needs the safetensors package: pip install safetensors "
    "(or pip install 'moebench[hf]')"
)


class WeightSpecError(ValueError):
    """A `weights` spec that does not parse."""


class CheckpointError(ValueError):
    """A checkpoint that cannot give the case's layer (missing files, layout, dims)."""


@dataclass(frozen=True)
class RedundantSpec:
    """ "redundant:R": synthetic experts clustered with redundancy R in [0, 1]."""

    redundancy: float


@dataclass(frozen=True)
class CheckpointSpec:
    """ "checkpoint:PATH:LAYER": layer LAYER (the case's first) of the checkpoint at PATH."""

    path: str
    layer: int


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


# -------------------------------------------------------------------------- checkpoint

_ROUTER_RE = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.)(?P<layer>\d+)\.(?P<block>block_sparse_moe|mlp)"
    r"\.gate\.weight$"
)


@dataclass(frozen=True)
class CheckpointDims:
    """A checkpoint's MoE dimensions, with the config.json key each came from."""

    hidden: int
    ffn: int
    num_experts: int
    top_k: int | None
    num_layers: int | None
    sources: dict[str, str]


def _import_safe_open() -> Any:
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ImportError(SAFETENSORS_HINT) from exc
    return safe_open


def _read_config(folder: Path, spec_text: str) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"weights {spec_text!r}: no config.json in {folder} (a Hugging Face checkpoint "
            "folder has config.json beside its *.safetensors)"
        ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"weights {spec_text!r}: cannot read {path}: {exc}") from exc
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # multimodal wrappers keep the LM's config nested
    return config


def _config_dims(config: dict[str, Any], spec_text: str) -> CheckpointDims:
    sources: dict[str, str] = {}

    def first(name: str, keys: tuple[str, ...], required: bool = True) -> int | None:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                sources[name] = key
                return value
        if required:
            raise CheckpointError(
                f"weights {spec_text!r}: config.json has none of {', '.join(keys)} "
                f"(needed for {name}); is this an MoE checkpoint?"
            )
        return None

    hidden = first("hidden", ("hidden_size",))
    ffn = first("ffn", ("moe_intermediate_size", "intermediate_size"))
    experts = first("num_experts", ("num_local_experts", "num_experts", "n_routed_experts"))
    top_k = first("top_k", ("num_experts_per_tok",), required=False)
    layers = first("num_layers", ("num_hidden_layers",), required=False)
    assert hidden is not None and ffn is not None and experts is not None
    return CheckpointDims(hidden, ffn, experts, top_k, layers, sources)


class _Tensors:
    """Names -> tensors of a checkpoint folder, opening each safetensors file once."""

    def __init__(self, folder: Path, spec_text: str, stack: ExitStack):
        self.folder = folder
        self.spec_text = spec_text
        self._stack = stack
        self._safe_open = _import_safe_open()
        self._handles: dict[str, Any] = {}
        self.file_of: dict[str, str] = self._index()

    def _index(self) -> dict[str, str]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"weights {self.spec_text!r}: cannot read {index} "
                    f"(expected a JSON object with a weight_map): {exc}"
                ) from exc
            return dict(weight_map)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"weights {self.spec_text!r}: no *.safetensors files (and no "
                f"model.safetensors.index.json) in {self.folder}"
            )
        file_of: dict[str, str] = {}
        for file in files:
            names = self._handle(file.name).keys()
            file_of.update((name, file.name) for name in names)
        return file_of

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            path = self.folder / file
            if not path.is_file():
                raise CheckpointError(
                    f"weights {self.spec_text!r}: {path} is named by the index but missing"
                )
            self._handles[file] = self._stack.enter_context(
                self._safe_open(str(path), framework="pt", device="cpu")
            )
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name`, without reading its data."""
        return tuple(self._handle(self.file_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"weights {self.spec_text!r}: tensor {name!r} not found")
        return self._handle(self.file_of[name]).get_tensor(name)


@contextmanager
def _open_tensors(folder: Path, spec_text: str) -> Iterator[_Tensors]:
    with ExitStack() as stack:
        yield _Tensors(folder, spec_text, stack)


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts: list[str] = []
    for n in sorted(numbers):
        if parts and parts[-1][1] == n - 1:
            parts[-1] = (parts[-1][0], n)
        else:
            parts.append((n, n))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "none"


def _dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """DeepSeek-V3 FP8 block quantisation: w = w_fp8 x scale_inv of its (bo, bi) block."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return weight.float() * scale[:rows, :cols]


class _LayerReader:
    """Reads one MoE layer of a checkpoint into ExpertWeights."""

    def __init__(
        self, tensors: _Tensors, config: dict[str, Any], dims: CheckpointDims, spec_text: str
    ):
        self.tensors = tensors
        self.dims = dims
        self.spec_text = spec_text
        quant = config.get("quantization_config") or {}
        block = quant.get("weight_block_size") or [128, 128]
        self.fp8_block = (int(block[0]), int(block[1]))
        self.moe_layers: dict[int, tuple[str, str]] = {}
        for name in tensors.file_of:
            match = _ROUTER_RE.match(name)
            if match:
                layer = int(match["layer"])
                self.moe_layers[layer] = (match["prefix"], match["block"])

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor `name`, dequantised if FP8 with block scales, checked to have `shape`."""
        tensor = self.tensors.get(name)
        scale_name = name + "_scale_inv"
        if tensor.dtype in _FP8_DTYPES and tensor.dim() == 2 and scale_name in self.tensors:
            tensor = _dequantize_fp8(tensor, self.tensors.get(scale_name), self.fp8_block)
        if tuple(tensor.shape) != shape:
            expected = " x ".join(map(str, shape))
            raise CheckpointError(
                f"weights {self.spec_text!r}: tensor {name!r} has shape "
                f"{' x '.join(map(str, tensor.shape))}, expected {expected} from config.json "
                f"({self._dims_text()})"
            )
        return tensor

    def _dims_text(self) -> str:
        d = self.dims
        return ", ".join(
            f"{name}={getattr(d, name)} ({d.sources[name]})"
            for name in ("hidden", "ffn", "num_experts")
        )

    def base(self, layer: int) -> str:
        if layer not in self.moe_layers:
            found = sorted(self.moe_layers)
            dense = any(
                re.match(rf"^(?:.*\.)?layers\.{layer}\.mlp\.(gate|down)_proj\.weight$", name)
                for name in self.tensors.file_of
            )
            what = (
                f"layer {layer} is a dense MLP, not an MoE layer"
                if dense
                else f"layer {layer} has no MoE router (…layers.{layer}.mlp.gate.weight or "
                f"…layers.{layer}.block_sparse_moe.gate.weight)"
            )
            count = f" of {self.dims.num_layers}" if self.dims.num_layers else ""
            raise CheckpointError(
                f"weights {self.spec_text!r}: {what}; MoE layers{count} in this checkpoint: "
                f"{_ranges(found)}"
            )
        prefix, block = self.moe_layers[layer]
        return f"{prefix}{layer}.{block}"

    def layer_weights(
        self, layer: int, shape: LayerShape, device: torch.device, dtype: torch.dtype
    ) -> ExpertWeights:
        """The layer's weights with a zero router bias, and the convention's own weights
        (module docstring)."""
        base = self.base(layer)
        D, F, E = self.dims.hidden, self.dims.ffn, self.dims.num_experts
        w_router_ED = self.read(f"{base}.gate.weight", (E, D))
        weights = ExpertWeights(
            shape=shape,
            w_router_DE=w_router_ED.t().to(device=device, dtype=torch.float32),
            router_bias_E=torch.zeros(E, device=device),
            w_gate_EDF=torch.empty(E, D, F, device=device, dtype=dtype),
            w_up_EDF=torch.empty(E, D, F, device=device, dtype=dtype),
            w_down_EFD=torch.empty(E, F, D, device=device, dtype=dtype),
        )
        self._experts(base, weights)
        self._shared(base, weights, device, dtype)
        self._correction_bias(base, weights, device)
        return weights

    def _correction_bias(self, base: str, weights: ExpertWeights, device: torch.device) -> None:
        E = self.dims.num_experts
        name = f"{base}.gate.e_score_correction_bias"
        found = self.read(name, (E,)).float() if name in self.tensors else None
        if weights.shape.correction_bias:
            found = torch.zeros(E) if found is None else found
            weights.correction_bias_E = found.to(device)
        elif found is not None:
            warnings.warn(
                f"weights {self.spec_text!r}: {name} (DeepSeek-V3's selection bias) is "
                "ignored: the case's router has correction_bias = false (the deepseek-v3 "
                "preset sets it)",
                stacklevel=4,
            )

    def _experts(self, base: str, weights: ExpertWeights) -> None:
        D, F, E = self.dims.hidden, self.dims.ffn, self.dims.num_experts
        per_expert = {
            "Mixtral (w1, w3, w2)": ("w1", "w3", "w2"),
            "Qwen/OLMoE/DeepSeek (gate_proj, up_proj, down_proj)": (
                "gate_proj",
                "up_proj",
                "down_proj",
            ),
        }
        for names in per_expert.values():
            if f"{base}.experts.0.{names[0]}.weight" in self.tensors:
                for e in range(E):
                    gate, up, down = (f"{base}.experts.{e}.{n}.weight" for n in names)
                    weights.w_gate_EDF[e].copy_(self.read(gate, (F, D)).t())
                    weights.w_up_EDF[e].copy_(self.read(up, (F, D)).t())
                    weights.w_down_EFD[e].copy_(self.read(down, (D, F)).t())
                return
        gate_up_name, down_name = f"{base}.experts.gate_up_proj", f"{base}.experts.down_proj"
        if gate_up_name in self.tensors and down_name in self.tensors:
            gate_up = self.tensors.get(gate_up_name)
            down = self.tensors.get(down_name)
            if tuple(gate_up.shape) == (E, 2 * F, D):  # (out, in) per expert: transpose
                gate_up_EDF2 = gate_up.transpose(1, 2)
            elif tuple(gate_up.shape) == (E, D, 2 * F):
                gate_up_EDF2 = gate_up
            else:
                raise CheckpointError(
                    f"weights {self.spec_text!r}: tensor {gate_up_name!r} has shape "
                    f"{' x '.join(map(str, gate_up.shape))}, expected {E} x {2 * F} x {D} "
                    f"or {E} x {D} x {2 * F} ({self._dims_text()})"
                )
            if tuple(down.shape) == (E, D, F):
                down_EFD = down.transpose(1, 2)
            elif tuple(down.shape) == (E, F, D):
                down_EFD = down
            else:
                raise CheckpointError(
                    f"weights {self.spec_text!r}: tensor {down_name!r} has shape "
                    f"{' x '.join(map(str, down.shape))}, expected {E} x {D} x {F} "
                    f"or {E} x {F} x {D} ({self._dims_text()})"
                )
            weights.w_gate_EDF.copy_(gate_up_EDF2[:, :, :F])
            weights.w_up_EDF.copy_(gate_up_EDF2[:, :, F:])
            weights.w_down_EFD.copy_(down_EFD)
            return
        looked = [f"{base}.experts.0.{n[0]}.weight ({kind})" for kind, n in per_expert.items()]
        looked.append(f"{gate_up_name} + {down_name} (stacked)")
        raise CheckpointError(
            f"weights {self.spec_text!r}: no expert tensors found for {base}; looked for "
            + "; ".join(looked)
        )

    def _shared(
        self, base: str, weights: ExpertWeights, device: torch.device, dtype: torch.dtype
    ) -> None:
        D = self.dims.hidden
        for block in ("shared_expert", "shared_experts"):  # Qwen2-MoE, DeepSeek
            gate_name = f"{base}.{block}.gate_proj.weight"
            if gate_name not in self.tensors:
                continue
            S = self.tensors.shape_of(gate_name)[0]
            gate = self.read(gate_name, (S, D))
            up = self.read(f"{base}.{block}.up_proj.weight", (S, D))
            down = self.read(f"{base}.{block}.down_proj.weight", (D, S))
            weights.w_shared_gate_DS = gate.t().to(device=device, dtype=dtype)
            weights.w_shared_up_DS = up.t().to(device=device, dtype=dtype)
            weights.w_shared_down_SD = down.t().to(device=device, dtype=dtype)
            self._shared_expert_gate(base, weights, device)
            return

    def _shared_expert_gate(self, base: str, weights: ExpertWeights, device: torch.device) -> None:
        name = f"{base}.shared_expert_gate.weight"
        if has_shared_expert_gate(weights.shape):
            if name not in self.tensors:
                raise CheckpointError(
                    f"weights {self.spec_text!r}: the case's router gates the shared expert "
                    f"(shared_expert_gate = 'sigmoid') but the checkpoint has no {name}; set "
                    "shared_expert_gate = 'none'"
                )
            gate_1D = self.read(name, (1, self.dims.hidden))
            weights.w_shared_expert_gate_D = gate_1D[0].to(device=device, dtype=torch.float32)
        elif name in self.tensors:
            warnings.warn(
                f"weights {self.spec_text!r}: {name} (Qwen2-MoE's sigmoid gate on the shared "
                "expert) is ignored: the case's router has shared_expert_gate = 'none' (the "
                "qwen2-moe preset sets 'sigmoid')",
                stacklevel=5,
            )

    def shared_width(self, layer: int) -> int:
        base = self.base(layer)
        for block in ("shared_expert", "shared_experts"):
            name = f"{base}.{block}.gate_proj.weight"
            if name in self.tensors:
                return self.tensors.shape_of(name)[0]
        return 0


_FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)


def _check_shape(
    case: Case, dims: CheckpointDims, shared_width: int, layer: int, spec_text: str
) -> None:
    """The case's shape must be the checkpoint's; the error names both."""
    if shared_width % dims.ffn:
        raise CheckpointError(
            f"weights {spec_text!r}: checkpoint layer {layer}'s shared expert width "
            f"{shared_width} is not a multiple of the expert width ffn={dims.ffn}; moebench "
            "models shared experts as shared_experts x ffn"
        )
    have = {
        "hidden": dims.hidden,
        "ffn": dims.ffn,
        "num_experts": dims.num_experts,
        "shared_experts": shared_width // dims.ffn,
    }
    wrong = [
        f"{name}: checkpoint {value}, case {getattr(case.shape, name)}"
        for name, value in have.items()
        if getattr(case.shape, name) != value
    ]
    if wrong:
        wanted = ", ".join(f"{k}={v}" for k, v in have.items())
        raise CheckpointError(
            f"weights {spec_text!r}: the case's shape does not match checkpoint layer "
            f"{layer} ({'; '.join(wrong)}); set the case's shape to the checkpoint's: {wanted}"
        )


def checkpoint_weights(case: Case, layer: int, spec: CheckpointSpec) -> ExpertWeights:
    """Layer spec.layer + `layer` of the checkpoint at spec.path, in the case's dtype on
    its device (router in float32); see the module docstring for layouts and semantics."""
    spec_text = case.weights
    folder = Path(spec.path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"weights {spec_text!r}: {folder} is not a folder (expected a local Hugging Face "
            "checkpoint folder: config.json and *.safetensors; nothing is downloaded)"
        )
    config = _read_config(folder, spec_text)
    dims = _config_dims(config, spec_text)
    checkpoint_layer = spec.layer + layer
    device = torch.device(case.device)
    dtype = torch_dtype(case.dtype)
    with _open_tensors(folder, spec_text) as tensors:
        reader = _LayerReader(tensors, config, dims, spec_text)
        _check_shape(case, dims, reader.shared_width(checkpoint_layer), checkpoint_layer, spec_text)
        weights = reader.layer_weights(checkpoint_layer, case.shape, device, dtype)
    weights.router_bias_E = routing_bias(case.routing, dims.num_experts, case.seed).to(device)
    return weights
