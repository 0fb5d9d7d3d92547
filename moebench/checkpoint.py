"""The "checkpoint:PATH:LAYER" weight source: one MoE layer of a local Hugging Face
checkpoint (safetensors + config.json) read into an `ExpertWeights`, in the Mixtral,
Qwen2/3-MoE, OLMoE and DeepSeek-V3 layouts (moebench.weight_sources parses the spec and
picks the source). Nothing is downloaded; safetensors is imported where it is used.
"""

from __future__ import annotations

import json
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
    ExpertWeights,
    has_shared_expert_gate,
    torch_dtype,
)

SAFETENSORS_HINT = (
    "the checkpoint weight source needs the safetensors package: pip install safetensors "
    "(or pip install 'moebench[hf]')"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot give the case's layer (missing files, layout, dims)."""


@dataclass(frozen=True)
class CheckpointSpec:
    """ "checkpoint:PATH:LAYER": layer LAYER (the case's first) of the checkpoint at PATH."""

    path: str
    layer: int


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
