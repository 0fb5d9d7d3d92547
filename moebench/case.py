"""Cases: everything needed to reproduce one measurement, as frozen dataclasses.

A `Case` is a layer shape, a workload and the implementation, device, dtype, routing,
world size and seed. Its `case_id` is a hash of those fields (never of the suite name),
so a run can resume and two runs can be matched case by case.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

Mode = Literal["forward", "train"]
MODES: tuple[str, ...] = ("forward", "train")
ACTIVATIONS: tuple[str, ...] = ("swiglu",)
Scoring = Literal["softmax", "sigmoid"]
SCORINGS: tuple[str, ...] = ("softmax", "sigmoid")
SharedExpertGate = Literal["none", "sigmoid"]
SHARED_EXPERT_GATES: tuple[str, ...] = ("none", "sigmoid")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
DEFAULT_ROUTER_SCALE = 0.02


@dataclass(frozen=True)
class LayerShape:
    """The shape of one MoE layer, and its router convention.

    hidden: model width D. ffn: width F of one routed expert's hidden layer.
    num_experts: routed experts E. top_k: experts per token. shared_experts: experts of
    width `ffn` that every token passes through. capacity_factor: only read by capacity-
    limited implementations (slots per expert = capacity_factor x tokens x top_k / E).

    The router convention (what real models differ in; `moebench.routing.route`; the
    defaults are moebench's base router, softmax top-k renormalised):
    scoring: "softmax" over the E logits, or "sigmoid" per expert (DeepSeek-V3).
    norm_topk_prob: the k chosen scores are divided by their sum (else used as they are).
    n_groups, topk_groups: group-limited selection: the E experts form n_groups equal
    groups, each scored by the sum of its two highest selection scores, and only the
    topk_groups best groups are eligible (0 = every group).
    correction_bias: selection adds the weight set's per-expert correction bias to the
    scores (DeepSeek-V3's e_score_correction_bias); the gate weights do not.
    routed_scaling: the gate weights are multiplied by this (DeepSeek-V3: 2.5).
    shared_expert_gate: "sigmoid" scales the shared experts' output per token by
    sigmoid(x . w), w a D-vector of the weight set (Qwen2-MoE); "none" adds it as is.
    """

    hidden: int
    ffn: int
    num_experts: int
    top_k: int
    shared_experts: int = 0
    capacity_factor: float = 1.25
    activation: str = "swiglu"
    scoring: Scoring = "softmax"
    norm_topk_prob: bool = True
    n_groups: int = 1
    topk_groups: int = 0
    correction_bias: bool = False
    routed_scaling: float = 1.0
    shared_expert_gate: SharedExpertGate = "none"

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every value that cannot describe a layer."""
        found = []
        for name in ("hidden", "ffn", "num_experts", "top_k"):
            if getattr(self, name) < 1:
                found.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.top_k > self.num_experts:
            found.append(("top_k", f"top_k={self.top_k} exceeds num_experts={self.num_experts}"))
        if self.shared_experts < 0:
            found.append(("shared_experts", f"must be >= 0, got {self.shared_experts}"))
        if self.capacity_factor <= 0:
            found.append(("capacity_factor", f"must be > 0, got {self.capacity_factor}"))
        if self.activation not in ACTIVATIONS:
            found.append(
                (
                    "activation",
                    f"{self.activation!r} not one of {', '.join(map(repr, ACTIVATIONS))}",
                )
            )
        return found + self.router_problems()

    def router_problems(self) -> list[tuple[str, str]]:
        """(field, message) for every router-convention value that cannot work here."""
        found = []
        if self.scoring not in SCORINGS:
            found.append(
                ("scoring", f"{self.scoring!r} not one of {', '.join(map(repr, SCORINGS))}")
            )
        if self.shared_expert_gate not in SHARED_EXPERT_GATES:
            gates = ", ".join(map(repr, SHARED_EXPERT_GATES))
            found.append(("shared_expert_gate", f"{self.shared_expert_gate!r} not one of {gates}"))
        if not self.routed_scaling > 0:
            found.append(("routed_scaling", f"must be > 0, got {self.routed_scaling}"))
        E, groups = self.num_experts, self.n_groups
        if groups < 1 or E < 1 or E % groups:
            found.append(("n_groups", f"{groups} must be >= 1 and divide num_experts={E}"))
        elif not 0 <= self.topk_groups <= groups:
            found.append(("topk_groups", f"{self.topk_groups} must be in 0..n_groups={groups}"))
        elif self.groups_kept * (E // groups) < self.top_k:
            found.append(
                (
                    "topk_groups",
                    f"{self.groups_kept} groups x {E // groups} experts per group < "
                    f"top_k={self.top_k}",
                )
            )
        return found

    @property
    def groups_kept(self) -> int:
        """Expert groups each token may choose from (topk_groups, 0 meaning all)."""
        return self.topk_groups or self.n_groups

    @property
    def expert_params(self) -> int:
        """Parameters of one SwiGLU expert: gate, up (D x F each) and down (F x D)."""
        return 3 * self.hidden * self.ffn

    @property
    def router_params(self) -> int:
        return self.hidden * self.num_experts


@dataclass(frozen=True)
class Workload:
    """What is pushed through the layer: batch x seq_len tokens, forward or train, through
    `layers` MoE layers in sequence (each with its own weights and a residual connection)."""

    batch: int
    seq_len: int
    mode: str = "forward"
    layers: int = 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def problems(self) -> list[tuple[str, str]]:
        found = []
        for name in ("batch", "seq_len", "layers"):
            if getattr(self, name) < 1:
                found.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.mode not in MODES:
            found.append(("mode", f"{self.mode!r} not one of {', '.join(map(repr, MODES))}"))
        return found


@dataclass(frozen=True)
class Case:
    """One sweep point. `options` holds implementation-specific knobs as sorted pairs."""

    shape: LayerShape
    workload: Workload
    impl: str
    device: str = "cpu"
    dtype: str = "float32"
    routing: str = "uniform"
    seed: int = 0
    world_size: int = 1
    preset: str = ""
    weights: str = "random"
    # Standard deviation of the random router weights: larger is a sharper router (low
    # entropy, as trained routers are); the default is that of every other weight.
    router_scale: float = DEFAULT_ROUTER_SCALE
    options: tuple[tuple[str, Any], ...] = field(default=())
    # Time replays of a CUDA graph of the whole step (launch-bound cases); CUDA only.
    cuda_graph: bool = False

    @property
    def tokens(self) -> int:
        return self.workload.tokens

    @property
    def case_id(self) -> str:
        """Stable 16-hex-digit hash of every field (the preset label excluded). Fields
        added after the first release are left out while at their default, so the ids
        of earlier runs' cases stay valid."""
        cached = self.__dict__.get("_case_id")
        if cached is None:  # computed once: a suite of a million cases asks for each id
            fields_ = self.fields()
            fields_.pop("preset")
            for name, default in LATE_FIELD_DEFAULTS.items():
                if fields_[name] == default:
                    fields_.pop(name)
            blob = json.dumps(fields_, sort_keys=True, default=str)
            cached = hashlib.sha256(blob.encode()).hexdigest()[:16]
            object.__setattr__(self, "_case_id", cached)
        return cached

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def fields(self) -> dict[str, Any]:
        """Flat mapping of every case field, as stored in the results table."""
        flat = self.__dict__.get("_flat")
        if flat is None:  # read by id, filters and rows: built once (the case is frozen)
            flat = {name: getattr(self.shape, name) for name in SHAPE_FIELDS}
            flat.update((name, getattr(self.workload, name)) for name in WORKLOAD_FIELDS)
            flat.update((name, getattr(self, name)) for name in CASE_FIELDS if name != "options")
            flat["tokens"] = self.tokens
            flat["options"] = json.dumps(dict(self.options), sort_keys=True)
            object.__setattr__(self, "_flat", flat)
        return dict(flat)

    def label(self) -> str:
        """Short human-readable name for progress bars and tables."""
        s, w = self.shape, self.workload
        name = self.preset or f"D{s.hidden}F{s.ffn}"
        stack = f" L{w.layers}" if w.layers > 1 else ""
        scale = "" if self.router_scale == DEFAULT_ROUTER_SCALE else f" rs{self.router_scale:g}"
        graph = " graph" if self.cuda_graph else ""  # else a graphed case reads as its twin
        return (
            f"{self.impl} {name} E{s.num_experts}k{s.top_k} T{w.tokens}{stack} {w.mode} "
            f"{self.dtype} {self.routing}{scale}{graph}"
        )

    def with_(self, **changes: Any) -> Case:
        return replace(self, **changes)


# Fields added after the first release, with the default that leaves them out of case_id
# (and that a results file written before them reads as: moebench.store.read_run).
LATE_FIELD_DEFAULTS: dict[str, Any] = {
    "layers": 1,
    "weights": "random",
    "cuda_graph": False,
    "router_scale": DEFAULT_ROUTER_SCALE,
    # the router convention (LayerShape): at moebench's base router, today's ids stand
    "scoring": "softmax",
    "norm_topk_prob": True,
    "n_groups": 1,
    "topk_groups": 0,
    "correction_bias": False,
    "routed_scaling": 1.0,
    "shared_expert_gate": "none",
}

SHAPE_FIELDS = tuple(f.name for f in fields(LayerShape))
WORKLOAD_FIELDS = tuple(f.name for f in fields(Workload))
CASE_FIELDS = tuple(f.name for f in fields(Case) if f.name not in ("shape", "workload"))
ALL_FIELDS = SHAPE_FIELDS + WORKLOAD_FIELDS + CASE_FIELDS
