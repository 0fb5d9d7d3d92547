"""Measure one case, start to finish: build, check against the reference, peak memory,
latency, counts, balance and energy. Returns the measured columns of one results row.

Correctness comes first (moebench.measure.check): a layer whose output, worst token or
(train cases) gradients are not within the dtype's tolerances of the float32 reference is
a `mismatch` row and is never timed; so is one whose last timed output drifted.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from moebench import registry
from moebench.case import Case
from moebench.designs import stack_inputs
from moebench.impls.reference import reference_output, reference_stack_output
from moebench.layer import Stack, balance_columns
from moebench.measure import check, counters, nvml
from moebench.measure.check import TOLERANCE, relative_error  # public here too
from moebench.measure.graph import graphed_step
from moebench.measure.memory import peak_during, weight_bytes
from moebench.measure.phases import timer_of
from moebench.measure.profile import NO_PROFILE, ProfileOptions, where_time_goes
from moebench.measure.stats import summarize
from moebench.measure.timing import TimingPlan, time_repeats
from moebench.weight_sources import make_weights
from moebench.weights import ExpertWeights, make_inputs, torch_dtype, weights_key

# Inputs rotated through while timing: enough distinct bytes to spill a 50 MB L2.
ROTATE_BYTES = 64 * 1024 * 1024
MAX_ROTATIONS = 8
ENERGY_WINDOW_S = 0.25


@dataclass
class WeightCache:
    """Holds the last weight sets (one per layer of the stack) and their reference
    outputs, so the implementations of one shape share them; a new shape frees the old
    ones first."""

    key: tuple | None = None
    weights: list[ExpertWeights] = field(default_factory=list)
    golden: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def get(self, case: Case) -> list[ExpertWeights]:
        key = (*weights_key(case), case.workload.layers)
        if key != self.key:
            self.key, self.weights, self.golden = None, [], {}
            if case.device.startswith("cuda"):
                torch.cuda.empty_cache()
            self.weights = [make_weights(case, i) for i in range(case.workload.layers)]
            self.key = key
        if self.weights[0].shape == case.shape:
            return self.weights
        # Same tensors, another top_k or capacity factor: a shallow copy (keeping any
        # attributes a weight source attached) that carries this case's shape.
        views = [copy.copy(w) for w in self.weights]
        for view in views:
            view.shape = case.shape
        return views

    def reference(self, case: Case, x_TD: torch.Tensor, unseen: bool = False) -> torch.Tensor:
        """The base reference's output on x_TD: the case's first timed input batch, or
        with `unseen` its unseen one (`make_inputs`); one of each kept, for the cases of
        one shape that follow."""
        key = (case.shape, case.tokens, unseen)
        if key not in self.golden:
            weights = self.get(case)
            golden = (
                reference_output(weights[0], x_TD)
                if len(weights) == 1
                else reference_stack_output(weights, x_TD)
            )
            kept = {k: v for k, v in self.golden.items() if k[2] != unseen}
            self.golden = {**kept, key: golden}
        return self.golden[key]


def build_layer(case: Case, weights: list[ExpertWeights]) -> torch.nn.Module:
    """The implementation's layer, or a residual Stack of one per weight set."""
    build = registry.get(case.impl).build
    if len(weights) == 1:
        return build(weights[0], case)
    return Stack([build(w, case) for w in weights])


@dataclass
class FirstCall:
    """The correctness check of a layer's first call (`check_first_call`)."""

    columns: dict[str, Any]  # fidelity_err (variants), rel_err and max_token_err (checked)
    failure: str | None  # why it is a mismatch; None: it passed (or has nothing to pass)
    expected: torch.Tensor  # what later outputs on the same input are held to (drift)
    ties_T: torch.Tensor  # tokens within rounding of a routing tie (first layer)
    modules: list[torch.nn.Module]  # the layer, or each layer of the stack
    module_stats: list[Any]  # each module's routing stats of this call (None: none)


def check_first_call(
    case: Case,
    layer: torch.nn.Module,
    weights: list[ExpertWeights],
    x_TD: torch.Tensor,
    cache: WeightCache,
    unseen: bool = False,
) -> FirstCall:
    """One forward of `layer` on x_TD (no grad), checked as `moebench run` checks it: an
    exact layer against the base reference, a variant against its own design reference
    (and `fidelity_err` against the base), globally and per token (`moebench.measure.check`);
    a stack layer by layer, each layer on the input it got (`designs.stack_inputs`).
    x_TD is the case's first timed input batch, or with `unseen` its unseen one."""
    info = registry.get(case.impl)
    stacked = isinstance(layer, Stack)
    columns: dict[str, Any] = {}
    with torch.no_grad():
        if stacked:
            layer.record = True
        given_TD = x_TD.clone()  # what the references see, whatever the layer does to x
        y = layer(x_TD)
        overwrote = not torch.equal(x_TD, given_TD)
        x_TD = given_TD
        misshapen = _output_problem(y, x_TD)
        recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        if stacked:
            layer.record, recorded, layer.recorded = False, layer.recorded or [], None
        # Each layer's routing of this call: the balance columns and the counts.
        modules = list(layer.layers) if stacked else [layer]
        module_stats = [m.stats() if hasattr(m, "stats") else None for m in modules]
        if not info.exact and not misshapen:
            # fidelity: the distance from the base layer's function, end to end
            columns["fidelity_err"] = relative_error(y, cache.reference(case, x_TD, unseen))
        layer_inputs = [x for x, _ in recorded] if recorded else None
        with stack_inputs(layer_inputs) as reference_layers:
            if info.exact and stacked:
                expected = reference_stack_output(weights, x_TD)
            elif info.exact:
                expected = cache.reference(case, x_TD, unseen)
            else:
                # A variant without a design reference is held to its own first output.
                reference = info.reference
                expected = y if reference is None else reference(weights, x_TD, case)
        ties = check.routing_ties(weights[0], x_TD)
    failure = None
    if misshapen:  # nothing to compare number by number
        return FirstCall(columns, misshapen, expected, ties, modules, module_stats)
    if info.exact or info.reference is not None:
        checked = check.check_output(y, expected, case.dtype, ties)
        failure, worst_token = checked.failure, checked.max_token_err
        # A stack: each layer against its reference on the input it got, so one wrong
        # token of one layer fails even where the residual stream dwarfs it.
        for index, ((x_j, y_j), ref_j) in enumerate(zip(recorded, reference_layers)):
            ties_j = check.routing_ties(weights[index], x_j)
            layer_check = check.check_output(y_j, ref_j, case.dtype, ties_j)
            worst_token = max(worst_token, layer_check.max_token_err)
            if failure is None and layer_check.failure:
                failure = f"layer {index} of {len(recorded)}: {layer_check.failure}"
        columns.update(rel_err=checked.rel_err, max_token_err=worst_token)
    if overwrote:
        # Checked on the batch as given (the references, which the impls of a shape share,
        # are computed on it), it may pass; the timed calls would reuse a changed batch.
        failure = "it wrote into its input x (in place); a layer's input is read-only"
    return FirstCall(columns, failure, expected, ties, modules, module_stats)


UNSEEN_FAILURE = "wrong on an input it was not timed on"


def check_unseen(
    case: Case, layer: torch.nn.Module, weights: list[ExpertWeights], cache: WeightCache
) -> str | None:
    """`layer` on a batch no timed call sees (`make_inputs(..., unseen=True)`), checked as
    its first call was: a layer that keeps what it worked out on its first batch (a
    routing plan cached by shape) is right there, where the other checks look, and wrong
    here. The failure sentence, or None."""
    (unseen_TD,) = make_inputs(case, 1, unseen=True)
    failure = check_first_call(case, layer, weights, unseen_TD, cache, unseen=True).failure
    return f"{UNSEEN_FAILURE}: {failure}" if failure else None


def _output_problem(y: Any, x_TD: torch.Tensor) -> str | None:
    """Why `y` is not an output of the layer's contract (a tensor of the input's shape,
    dtype and device), or None."""
    if not isinstance(y, torch.Tensor):
        return f"its output is a {type(y).__name__}, not a tensor"
    found = (tuple(y.shape), y.dtype, y.device)
    if found != (tuple(x_TD.shape), x_TD.dtype, x_TD.device):
        return (
            f"its output is {found[0]} {str(y.dtype).removeprefix('torch.')} on {y.device}; "
            f"a layer returns its input's shape, dtype and device: {tuple(x_TD.shape)} "
            f"{str(x_TD.dtype).removeprefix('torch.')} on {x_TD.device}"
        )
    return None


def _step_fn(case: Case, layer: torch.nn.Module, inputs: list[torch.Tensor], last: dict):
    """The timed callable: one forward, or one forward + backward with fresh gradients
    (the input's too: a training step does not add into last step's input gradient).
    The output of the latest call on inputs[0] is kept in last[0] (no copy, no sync), for
    the drift check after timing."""
    params = [p for p in layer.parameters() if p.requires_grad]
    rotations = len(inputs)
    if case.workload.mode == "forward":

        def forward_step(i: int) -> torch.Tensor:
            y = layer(inputs[i % rotations])
            if i % rotations == 0:
                last[0] = y
            return y

        return forward_step
    grads = [torch.randn_like(x) for x in inputs[:1]]

    def train_step(i: int) -> None:
        x = inputs[i % rotations]
        for p in params:
            p.grad = None
        x.grad = None
        y = layer(x)
        with timer_of(layer).phase("backward"):
            y.backward(grads[0])
        if i % rotations == 0:
            last[0] = y

    return train_step


def measure_case(
    case: Case,
    plan: TimingPlan,
    cache: WeightCache,
    ceilings: dict[str, float] | None = None,
    profile: ProfileOptions = NO_PROFILE,
) -> dict[str, Any]:
    """Measure `case`; raises on failure (the runner turns exceptions into rows).
    `profile`: what the profiling passes after timing add (--profile, --nvtx)."""
    info = registry.get(case.impl)
    device = torch.device(case.device)
    dtype = torch_dtype(case.dtype)
    weights = cache.get(case)
    torch.manual_seed(case.seed)
    layer = build_layer(case, weights)
    row: dict[str, Any] = {
        "family": info.family,
        "exact": info.exact,
        "impl_detail": getattr(layer, "impl_detail", None),
        "weight_bytes": weight_bytes(layer),
    }
    input_bytes = case.tokens * case.shape.hidden * torch.empty((), dtype=dtype).element_size()
    rotations = max(1, min(MAX_ROTATIONS, math.ceil(ROTATE_BYTES / input_bytes)))
    if device.type == "cpu":
        rotations = min(rotations, 2)  # CPU caches are small next to these inputs anyway
    inputs = make_inputs(case, rotations)
    if case.workload.mode == "train":
        for x in inputs:
            x.requires_grad_(True)

    # 1. Correctness, before any timing: against the base MoE layer (the golden), and
    # for a variant with a reference of its own design, against that too.
    first = check_first_call(case, layer, weights, inputs[0], cache)
    module_stats, expected, ties = first.module_stats, first.expected, first.ties_T
    params = sum(
        (counters.param_counts(case, m, st) for m, st in zip(first.modules, module_stats)),
        start=counters.NO_PARAMS,
    )
    row["tolerance"] = TOLERANCE[case.dtype]
    row.update(first.columns)
    if first.failure:
        return _mismatch(row, first.failure)
    checked_gradients: dict[str, torch.Tensor | None] = {}
    if case.workload.mode == "train":
        columns, failure, checked_gradients = check.gradient_columns(
            info.exact, layer, weights, inputs[0], case
        )
        row.update(columns)
        if failure:
            return _mismatch(row, failure)
    routed_stats = [st for st in module_stats if st is not None]
    if routed_stats:
        row.update(balance_columns(routed_stats))

    # 2. Peak memory of one call, then 3. latency.
    last: dict[int, torch.Tensor] = {}
    step = _step_fn(case, layer, inputs, last)
    grad_mode = torch.inference_mode() if case.workload.mode == "forward" else torch.enable_grad()
    with grad_mode:
        if case.cuda_graph:
            step = graphed_step(step, len(inputs), device, case.impl)
        step(0)  # first call outside the memory window: lazy init and workspaces
        for p in layer.parameters():
            p.grad = None  # so the window sees the gradients allocated, not recycled
        peak, added = peak_during(lambda: step(1), device)
        samples_ms = time_repeats(step, device, plan)
        if isinstance(layer, Stack):
            # A stack's later layers route on inputs that differ from the first call's by
            # rounding (atomic adds), so near ties may flip: it is checked again layer by
            # layer, on one more call with its layer inputs recorded.
            last.clear()
            drift = check_first_call(case, layer, weights, inputs[0], cache).failure
        else:
            drift = check.check_output(last.pop(0).detach(), expected, case.dtype, ties).failure
        if drift:
            return _mismatch(row, f"drifted during timing: {drift}")
        if unseen := check_unseen(case, layer, weights, cache):
            return _mismatch(row, unseen)
        if checked_gradients:  # a train case's gradients, after as many steps as were timed
            later = check.later_gradients(
                layer, weights, inputs[0], case.dtype, case.seed, checked_gradients
            )
            if later:
                return _mismatch(row, f"gradients drifted during timing: {later}")
        energy = _energy(step, device) if device.type == "cuda" else None
        # 3b. Where the time goes: phases (and with --profile a profiler pass), after timing.
        mode = case.workload.mode
        row.update(where_time_goes(mode, layer, step, device, samples_ms, profile, plan.flush_l2))
    # The layer's footprint: its own weights plus what one call adds at its peak
    # (activations, workspaces, gradients). The allocator's raw peak also counts the
    # harness's inputs and reference output, so it is kept apart.
    row.update(
        allocator_peak_bytes=peak,
        activation_bytes=added,
        peak_mem_bytes=None if added is None else row["weight_bytes"] + added,
    )
    row.update(summarize(samples_ms, device.type))
    row["samples_ms"] = samples_ms
    row["repeats"] = len(samples_ms)
    latency_s = row["latency_ms"] / 1e3
    row["tokens_per_s"] = case.tokens / latency_s

    # 4. Counts and the work they imply.
    row.update(counters.work_columns(case, params, dtype, latency_s, ceilings))
    if case.world_size == 1:
        row.update(comm_ms=0.0, dispatch_ms=0.0, combine_ms=0.0, comm_bytes=0)
    # Design-specific columns, from the last timed call (steady state: a warm cache, say).
    # A layer that moves data itself (offloading) reports comm_ms / comm_bytes here too.
    if hasattr(layer, "extra_metrics"):
        row.update(layer.extra_metrics())
    if energy is not None:
        joules, calls = energy
        row["energy_j"] = joules / calls
        row["j_per_token"] = joules / calls / case.tokens
    if device.type == "cuda":
        row["device_mem_used_bytes"] = nvml.memory_used_bytes(device.index or 0)
    row["status"] = "ok"
    return row


def _mismatch(row: dict[str, Any], failure: str) -> dict[str, Any]:
    """The row of a case that failed a check: status mismatch, the failure in `error`."""
    row.update(status="mismatch", error=failure)
    return row


def _energy(step, device: torch.device) -> tuple[float, int] | None:
    """(joules, calls) over a window of back-to-back calls, from NVML's energy counter."""
    index = device.index or 0
    start_mj = nvml.energy_mj(index)
    if start_mj is None:
        return None
    torch.cuda.synchronize(device)
    start_mj = nvml.energy_mj(index)
    started = time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - started < ENERGY_WINDOW_S:
        step(calls)
        calls += 1
        if calls % 8 == 0:
            torch.cuda.synchronize(device)
    torch.cuda.synchronize(device)
    end_mj = nvml.energy_mj(index)
    if end_mj is None or end_mj <= start_mj:
        return None
    return (end_mj - start_mj) / 1e3, calls
