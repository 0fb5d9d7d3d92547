"""The correctness checks a case must pass before it is timed, and after.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
S shared-expert width.

The checks, each against the float32 reference of the same weights (an exact layer) or
of the variant's own design (a variant registered with `reference=`):

- output: the global relative error ||y - y_ref|| / ||y_ref|| (`rel_err`, tolerance per
  dtype, TOLERANCE) and the worst token's relative error (`max_token_err`,
  TOKEN_TOLERANCE), so one wrong token fails at any token count; a global norm over 4096
  tokens hides it (one zeroed token of 4096 in bfloat16 is 1.6e-2 globally).
- stacks (`layers` > 1, in `case_run.check_first_call`): each layer's output against
  its reference on the input that layer got (`Stack.recorded`, `designs.stack_inputs`),
  and the whole output against the sum of those, so one layer's rounding is not
  propagated into the next layer's routing choices and one wrong token of one layer
  still fails.
- gradients (train cases of exact layers): one forward and backward with a seeded
  upstream gradient, then the gradient of the input and of every weight of the weight
  set the layer trains (router, routed experts, shared experts) against the reference's
  autograd gradients (`grad_err`, the worst of them, GRAD_TOLERANCE); a weight the layer
  does not train, or trains without gradient, fails.
- drift: the output of the last timed call on the first input batch, checked the same way
  after timing (warm caches, asynchronous copies in flight): a layer right on its first
  call and wrong later (a race) fails as "drifted during timing". A stack instead gets
  one more call after timing, checked layer by layer as its first: its later layers'
  inputs differ from the first call's by rounding, which may flip near-tied choices.
- output contract: the output is a tensor of the input's shape, dtype and device (a
  bfloat16 case answered in float32 is another layer; a row short, no layer at all).
- input untouched: the first call must leave its input as it was (the references are
  computed on the batch as given, shared by the impls of a shape, and the timed calls
  reuse the batch): a layer that writes into x fails, whatever its output.
- gradients after timing (train cases of exact layers): one more forward and backward on
  the checked batch, with the checked step's upstream gradient, each gradient held to the
  checked step's own (a strided sample of about GRAD_SAMPLE elements of each, every
  expert's rows and columns): a backward right on its first step only (a workspace never
  cleared) fails as "gradients drifted during timing". Against the layer's own checked
  step, not the reference again, so it costs one step.
- unseen input: then one call on an input batch no call has seen (another seed,
  `make_inputs(..., unseen=True)`), checked as the first call is: a layer that keeps what
  it worked out on its first batch (a routing plan cached by shape) is right on that
  batch, where the checks above look, and fails here ("wrong on an input it was not
  timed on").

Which of the layer's parameters is which weight (`weight_grads`): a parameter that is a
weight-set tensor, a copy of one, a copy with its last two dimensions transposed, or gate
and up side by side along the last dimension (Hugging Face's gate_up_proj; maybe
transposed) is found by value; a plugin that keeps the weight set's tensors gets the
check for free. A layer holding weights in another layout (fused otherwise, quantised)
defines `weight_grads()`
returning the gradient of each weight-set tensor (ExpertWeights field name, e.g.
"w_gate_EDF") in the weight set's layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moebench.case import Case
from moebench.impls.reference import reference_output
from moebench.layer import Stack, swiglu
from moebench.routing import route
from moebench.weights import ExpertWeights

# Relative error ||y - y_ref|| / ||y_ref|| allowed against the float32 reference.
TOLERANCE = {"float64": 1e-6, "float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
# The worst token's relative error. Measured on CPU (grouped, reference, capacity; 4 shapes,
# 512-4096 tokens, 2 seeds): at most 9.5e-3 in bfloat16, 1.1e-3 in float16, 8e-8 in float32,
# so these are about 10x the worst seen; a zeroed or garbage token is ~1.
TOKEN_TOLERANCE = {"float64": 1e-6, "float32": 1e-3, "bfloat16": 1e-1, "float16": 2e-2}
# A token's error is relative to its own norm, but never to less than this fraction of
# the RMS token norm (a token whose output nearly cancels would make noise look large).
TOKEN_NORM_FLOOR = 0.1
# Gradients, norm-wise per tensor (against float32 autograd of the reference function).
GRAD_TOLERANCE = {"float64": 1e-6, "float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
# A token whose k-th and (k+1)-th router logits are closer than this (relative to the
# token's logit spread) routes either way within float32 rounding: left out of the
# worst-token check (still in rel_err). Float32 GEMMs differ by ~1e-6 of the spread; the
# Router's bfloat16 tensor-core logits (moebench.router_logits) sum in Hopper's
# accumulators, whose worst logit was 5.7e-6 of the spread off on an H200 at D = 2048
# and grows with D, so the margin leaves room to D = 7168 and more.
TIE_MARGIN = 5e-5
# Weight-set fields a layer trains (the routing bias is a fixed prior, not trained).
TRAINED_FIELDS = (
    "w_router_DE",
    "w_gate_EDF",
    "w_up_EDF",
    "w_down_EFD",
    "w_shared_gate_DS",
    "w_shared_up_DS",
    "w_shared_down_SD",
    "w_shared_expert_gate_D",
)


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """||y - y_ref|| / ||y_ref|| in float64; inf when y has a NaN or inf."""
    y64, ref64 = y.detach().double(), y_ref.double()
    if not torch.isfinite(y64).all():
        return math.inf
    return float(torch.linalg.vector_norm(y64 - ref64) / torch.linalg.vector_norm(ref64))


def max_token_error(
    y_TD: torch.Tensor, ref_TD: torch.Tensor, skip_T: torch.Tensor | None = None
) -> tuple[float, int]:
    """(worst token's relative error, its index): ||y_t - ref_t|| / max(||ref_t||,
    TOKEN_NORM_FLOOR x RMS of ||ref_t||); tokens in `skip_T` (bool) are left out."""
    y64, ref64 = y_TD.detach().double().flatten(1), ref_TD.double().flatten(1)
    if not torch.isfinite(y64).all():
        return math.inf, int((~torch.isfinite(y64)).any(dim=1).nonzero()[0])
    norm_T = torch.linalg.vector_norm(ref64, dim=1)
    floor = TOKEN_NORM_FLOOR * float(norm_T.pow(2).mean().sqrt())
    error_T = torch.linalg.vector_norm(y64 - ref64, dim=1) / norm_T.clamp(min=max(floor, 1e-300))
    if skip_T is not None:
        error_T = error_T.masked_fill(skip_T.to(error_T.device), 0.0)
    if error_T.numel() == 0:
        return 0.0, -1
    worst = int(error_T.argmax())
    return float(error_T[worst]), worst


def routing_ties(weights: ExpertWeights, x_TD: torch.Tensor) -> torch.Tensor:
    """Bool T: tokens whose top-k choice under the base router is within float32
    rounding of a tie (TIE_MARGIN), so another summation order may pick another expert."""
    k, num_experts = weights.shape.top_k, weights.shape.num_experts
    if k >= num_experts:
        return torch.zeros(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)
    logits_TE = x_TD.float() @ weights.w_router_DE.float() + weights.router_bias_E.float()
    top_TK = torch.topk(logits_TE, k + 1, dim=-1).values
    gap_T = top_TK[:, k - 1] - top_TK[:, k]
    return gap_T <= TIE_MARGIN * logits_TE.std(dim=-1).clamp(min=1e-30)


@dataclass(frozen=True)
class OutputCheck:
    """The output check's numbers and, when it failed, why."""

    rel_err: float
    max_token_err: float
    failure: str | None


def check_output(
    y_TD: torch.Tensor, ref_TD: torch.Tensor, dtype: str, ties_T: torch.Tensor | None = None
) -> OutputCheck:
    """Global and worst-token relative error of y against ref, judged for `dtype`."""
    rel = relative_error(y_TD, ref_TD)
    token_err, token = max_token_error(y_TD, ref_TD, ties_T)
    failure = None
    if not rel <= TOLERANCE[dtype]:
        failure = f"relative error {rel:.3g} > tolerance {TOLERANCE[dtype]:g} ({dtype})"
    elif not token_err <= TOKEN_TOLERANCE[dtype]:
        failure = (
            f"token {token} of {y_TD.shape[0]}: relative error {token_err:.3g} > token "
            f"tolerance {TOKEN_TOLERANCE[dtype]:g} ({dtype}; whole output {rel:.3g})"
        )
    return OutputCheck(rel, token_err, failure)


# ----------------------------------------------------------------------------- gradients


# Elements of each gradient kept from the checked step (a strided sample, every expert's
# rows and columns alike), to hold the steps after timing to it (`later_gradients`).
GRAD_SAMPLE = 1 << 20


@dataclass
class GradCheck:
    """Relative errors of each checked gradient, and the failures found; `samples`: each
    gradient of the checked step, sampled (`sample_gradient`)."""

    errors: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    samples: dict[str, torch.Tensor | None] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=math.nan)


def layer_modules(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of a Stack, or the layer itself."""
    return list(layer.layers) if isinstance(layer, Stack) else [layer]


def weight_grads(
    module: torch.nn.Module, weights: ExpertWeights
) -> Callable[[], dict[str, torch.Tensor | None]] | str:
    """A function returning the gradient of each weight-set tensor that `module` trains
    (in the weight set's layout; None: no gradient reached it), to be called after the
    backward; or a sentence saying which parameter could not be placed."""
    if hasattr(module, "weight_grads"):
        return module.weight_grads
    wanted = {
        name: getattr(weights, name)
        for name in TRAINED_FIELDS
        if getattr(weights, name) is not None
    }
    found: dict[str, tuple[torch.nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]] = {}
    for param_name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        matches = _match_weight(param, wanted)
        if not matches:
            return (
                f"parameter {param_name} {tuple(param.shape)} is no weight-set tensor, copy, "
                "transposed copy or gate|up concatenation: define weight_grads() on the layer"
            )
        for name, extract in matches.items():
            found[name] = (param, extract)

    def collect() -> dict[str, torch.Tensor | None]:
        return {
            name: None if param.grad is None else extract(param.grad)
            for name, (param, extract) in found.items()
        }

    return collect


def _same(view: torch.Tensor, tensor: torch.Tensor) -> bool:
    return view.shape == tensor.shape and torch.equal(view, tensor.to(view.dtype))


# Gate and up projections that kernels often keep side by side in one tensor.
FUSED_PAIRS = (("w_gate_EDF", "w_up_EDF"), ("w_shared_gate_DS", "w_shared_up_DS"))


def _match_weight(
    param: torch.Tensor, wanted: dict[str, torch.Tensor]
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The weights `param` holds, found by value, each with the function that takes its
    gradient out of the parameter's (identity, a transpose, a slice of a gate|up
    concatenation along the last dimension, maybe transposed); {} when none."""
    data = param.detach()
    layouts: list[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] = [
        (data, lambda g: g)
    ]
    if data.dim() >= 2:
        layouts.append((data.transpose(-1, -2), lambda g: g.transpose(-1, -2)))
    for view, back in layouts:
        for name, tensor in wanted.items():
            if tensor.device == data.device and _same(view, tensor):
                return {name: back}
        for gate, up in FUSED_PAIRS:
            if gate not in wanted or wanted[gate].device != data.device:
                continue
            width = wanted[gate].shape[-1]
            fused = view.shape[-1] == 2 * width and _same(view[..., :width], wanted[gate])
            if fused and _same(view[..., width:], wanted[up]):
                return {
                    gate: lambda g, back=back, w=width: back(g)[..., :w],
                    up: lambda g, back=back, w=width: back(g)[..., w:],
                }
    return {}


class _Errors:
    """Sums of squares per gradient name, so a gradient compares in slices (one expert at
    a time) without holding a float32 copy of the whole tensor."""

    def __init__(self) -> None:
        self.diff_sq: dict[str, float] = {}
        self.ref_sq: dict[str, float] = {}

    def add(self, name: str, got: torch.Tensor | None, ref: torch.Tensor) -> None:
        ref64 = ref.detach().double()
        got64 = torch.zeros_like(ref64) if got is None else got.detach().double()
        if not torch.isfinite(got64).all():
            self.diff_sq[name] = math.inf
        else:
            diff = float(torch.linalg.vector_norm(got64 - ref64) ** 2)
            self.diff_sq[name] = self.diff_sq.get(name, 0.0) + diff
        self.ref_sq[name] = self.ref_sq.get(name, 0.0) + float(torch.linalg.vector_norm(ref64) ** 2)

    def relative(self) -> dict[str, float]:
        out = {}
        for name, diff in self.diff_sq.items():
            ref = math.sqrt(self.ref_sq[name])
            out[name] = 0.0 if diff == 0 else (math.sqrt(diff) / ref if ref > 0 else math.inf)
        return out


def check_gradients(
    layer: torch.nn.Module,
    weights_list: list[ExpertWeights],
    x_TD: torch.Tensor,
    dtype: str,
    seed: int,
) -> GradCheck:
    """One forward and backward of `layer` against the reference's float32 autograd
    gradients: the input's and each trained weight's (module docstring). Leaves no
    gradient behind on the layer or on x."""
    result = GradCheck()
    collectors = _collectors(layer, weights_list)
    if isinstance(collectors, str):
        result.failures.append(collectors)
        return result
    g_TD = _upstream_gradient(x_TD, seed)
    got, grad_x = _step_gradients(layer, collectors, x_TD, g_TD)
    result.samples = _samples(got, grad_x)
    errors = _Errors()
    ref_grad_x = _reference_backward(weights_list, x_TD, g_TD.float(), got, errors)
    errors.add("input", grad_x, ref_grad_x)
    for p in layer.parameters():
        p.grad = None
    result.errors = dict(sorted(errors.relative().items()))
    tolerance = GRAD_TOLERANCE[dtype]
    for name, error in result.errors.items():
        if error <= tolerance:
            continue
        why = ""
        if name != "input":
            layer_part, _, field_name = name.rpartition(".")
            grads = got[int(layer_part.removeprefix("layer")) if layer_part else 0]
            if field_name not in grads:
                why = " (the layer trains no parameter holding it)"
            elif grads[field_name] is None:
                why = " (no gradient reached it)"
        result.failures.append(
            f"gradient of {name}: relative error {error:.3g} > tolerance {tolerance:g} "
            f"({dtype}){why}"
        )
    return result


def _collectors(
    layer: torch.nn.Module, weights_list: list[ExpertWeights]
) -> list[Callable[[], dict[str, torch.Tensor | None]]] | str:
    """Each module's weight-gradient collector (`weight_grads`), or the sentence saying
    which parameter could not be placed."""
    modules = layer_modules(layer)
    collectors = []
    for index, (module, weights) in enumerate(zip(modules, weights_list)):
        collect = weight_grads(module, weights)
        if isinstance(collect, str):
            where = f"layer {index}: " if len(modules) > 1 else ""
            return f"gradient not checkable: {where}{collect}"
        collectors.append(collect)
    return collectors


def _upstream_gradient(x_TD: torch.Tensor, seed: int) -> torch.Tensor:
    """The seeded gradient of the layer's output that the gradient checks backpropagate."""
    generator = torch.Generator(device=x_TD.device).manual_seed(seed + 17)
    return torch.randn(x_TD.shape, generator=generator, device=x_TD.device).to(x_TD.dtype)


def _step_gradients(
    layer: torch.nn.Module,
    collectors: list[Callable[[], dict[str, torch.Tensor | None]]],
    x_TD: torch.Tensor,
    g_TD: torch.Tensor,
) -> tuple[list[dict[str, torch.Tensor | None]], torch.Tensor | None]:
    """One forward and backward of `layer` on x_TD with upstream gradient g_TD: each
    module's weight gradients (weight-set layout) and the input's gradient."""
    x_leaf = x_TD.detach().clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    with torch.enable_grad():
        layer(x_leaf).backward(g_TD)
    return [collect() for collect in collectors], x_leaf.grad


def sample_gradient(grad: torch.Tensor | None) -> torch.Tensor | None:
    """About GRAD_SAMPLE elements of `grad` in float32: every f-th row and column of each
    matrix (every expert's), taken through a strided view, so a gradient of many GB is
    not copied whole."""
    if grad is None:
        return None
    grad = grad.detach()
    factor = max(1, math.ceil(math.sqrt(grad.numel() / GRAD_SAMPLE)))
    view = grad[..., ::factor, ::factor] if grad.dim() >= 2 else grad[:: factor * factor]
    return view.float().clone()


def _samples(
    got: list[dict[str, torch.Tensor | None]], grad_x: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    stacked = len(got) > 1
    samples = {
        (f"layer{index}.{name}" if stacked else name): sample_gradient(grad)
        for index, grads in enumerate(got)
        for name, grad in grads.items()
    }
    samples["input"] = sample_gradient(grad_x)
    return samples


def later_gradients(
    layer: torch.nn.Module,
    weights_list: list[ExpertWeights],
    x_TD: torch.Tensor,
    dtype: str,
    seed: int,
    checked: dict[str, torch.Tensor | None],
) -> str | None:
    """One more forward and backward on the checked batch, with the checked step's
    upstream gradient, its gradients held to the checked step's samples (`checked`,
    `GradCheck.samples`) within GRAD_TOLERANCE: a layer whose backward goes wrong after
    its first step (a workspace accumulated into and never cleared) fails. The failures
    in a sentence, or None. Leaves no gradient behind."""
    collectors = _collectors(layer, weights_list)
    if isinstance(collectors, str):
        return None  # not checkable at all: the first check said so
    got, grad_x = _step_gradients(layer, collectors, x_TD, _upstream_gradient(x_TD, seed))
    later = _samples(got, grad_x)
    for p in layer.parameters():
        p.grad = None
    failures = []
    for name, first in checked.items():
        now = later.get(name)
        if first is None or now is None:
            if first is not None:
                failures.append(f"gradient of {name}: none reached it (the checked step's did)")
            elif now is not None:
                failures.append(f"gradient of {name}: one reached it (none in the checked step)")
            continue
        scale = float(torch.linalg.vector_norm(first))
        error = float(torch.linalg.vector_norm(now - first)) / scale if scale else 0.0
        if not torch.isfinite(now).all():
            error = math.inf
        if not error <= GRAD_TOLERANCE[dtype]:
            failures.append(
                f"gradient of {name}: relative error {error:.3g} against the checked step's "
                f"> tolerance {GRAD_TOLERANCE[dtype]:g} ({dtype})"
            )
    return "; ".join(failures) or None


def _reference_backward(
    weights_list: list[ExpertWeights],
    x_TD: torch.Tensor,
    g32_TD: torch.Tensor,
    got: list[dict[str, torch.Tensor | None]],
    errors: _Errors,
) -> torch.Tensor:
    """The input gradient of the reference (a layer, or a residual stack), comparing each
    layer's weight gradients with `got` on the way; float32."""
    inputs = [x_TD]
    for weights in weights_list[:-1]:  # each layer's input, rounded as the stack rounds it
        x32 = inputs[-1].float() + reference_output(weights, inputs[-1])
        inputs.append(x32.to(x_TD.dtype))
    stacked = len(weights_list) > 1
    grad_TD = g32_TD
    for index in reversed(range(len(weights_list))):
        prefix = f"layer{index}." if stacked else ""
        layer_grad = _reference_layer_backward(
            weights_list[index], inputs[index], grad_TD, got[index], errors, prefix
        )
        grad_TD = grad_TD + layer_grad if stacked else layer_grad
    return grad_TD


def _reference_layer_backward(
    weights: ExpertWeights,
    x_TD: torch.Tensor,
    g32_TD: torch.Tensor,
    got: dict[str, torch.Tensor | None],
    errors: _Errors,
    prefix: str,
) -> torch.Tensor:
    """One reference layer's input gradient by float32 autograd, one expert at a time
    (only one expert's weights upcast at once); compares weight gradients on the way."""
    shape = weights.shape
    with torch.enable_grad():
        x32_TD = x_TD.detach().float().requires_grad_(True)
        w_router_DE = weights.w_router_DE.detach().float().requires_grad_(True)
        logits_TE = x32_TD @ w_router_DE + weights.router_bias_E.float()
        gate_TK, expert_ids_TK, _ = route(logits_TE, shape, weights.correction_bias_E)
        gate_leaf_TK = gate_TK.detach().requires_grad_(True)
        x_leaf_TD = x32_TD.detach().requires_grad_(True)
        for expert in range(shape.num_experts):
            token_idx, slot_idx = torch.where(expert_ids_TK == expert)
            w = [
                t[expert].detach().float().requires_grad_(True)
                for t in (weights.w_gate_EDF, weights.w_up_EDF, weights.w_down_EFD)
            ]
            if token_idx.numel():
                out_ND = swiglu(x_leaf_TD[token_idx], *w)
                weighted_ND = out_ND * gate_leaf_TK[token_idx, slot_idx, None]
                (weighted_ND * g32_TD[token_idx]).sum().backward()
            for name, ref in zip(("w_gate_EDF", "w_up_EDF", "w_down_EFD"), w):
                ref_grad = ref.grad if ref.grad is not None else torch.zeros_like(ref)
                mine = got.get(name)
                errors.add(prefix + name, None if mine is None else mine[expert], ref_grad)
        if weights.w_shared_gate_DS is not None:
            names = ["w_shared_gate_DS", "w_shared_up_DS", "w_shared_down_SD"]
            if weights.w_shared_expert_gate_D is not None:
                names.append("w_shared_expert_gate_D")
            shared = [getattr(weights, n).detach().float().requires_grad_(True) for n in names]
            shared_TD = swiglu(x_leaf_TD, *shared[:3])
            if len(shared) == 4:  # Qwen2-MoE's sigmoid gate on the shared expert
                shared_TD = shared_TD * torch.sigmoid(x_leaf_TD @ shared[3])[:, None]
            (shared_TD * g32_TD).sum().backward()
            for name, ref in zip(names, shared):
                errors.add(prefix + name, got.get(name), ref.grad)
        gate_TK.backward(gate_leaf_TK.grad)
    errors.add(prefix + "w_router_DE", got.get("w_router_DE"), w_router_DE.grad)
    grad_x = x32_TD.grad
    if x_leaf_TD.grad is not None:
        grad_x = x_leaf_TD.grad if grad_x is None else grad_x + x_leaf_TD.grad
    return grad_x


def gradient_columns(
    exact: bool,
    layer: torch.nn.Module,
    weights_list: list[ExpertWeights],
    x_TD: torch.Tensor,
    case: Case,
) -> tuple[dict[str, object], str | None, dict[str, torch.Tensor | None]]:
    """The gradient check of a train case: (`grad_err`, `grad_check` columns; the failure
    sentence or None; the checked step's gradient samples, for `later_gradients`). A
    variant is not the reference function and its design reference has no autograd path:
    skipped, with the reason in `grad_check`."""
    if not exact:
        skipped = "skipped: a variant (its design reference has no gradients)"
        return {"grad_check": skipped}, None, {}
    result = check_gradients(layer, weights_list, x_TD, case.dtype, case.seed)
    columns: dict[str, object] = {
        "grad_err": result.worst,
        "grad_check": "failed" if result.failures else f"ok ({len(result.errors)} gradients)",
    }
    return columns, "; ".join(result.failures) or None, result.samples
