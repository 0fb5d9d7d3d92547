"""Suite expansion: a checked `_Plan` -> the product of its axes as `Case`s, the
[[exclude]]/[[include]] filters, and the checks of each case (see `moebench.suite`)."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from moebench import registry
from moebench.case import (
    CASE_FIELDS,
    DEFAULT_ROUTER_SCALE,
    MODES,
    SHAPE_FIELDS,
    WORKLOAD_FIELDS,
    Case,
    LayerShape,
    Workload,
)
from moebench.presets import PRESETS
from moebench.routing import RoutingSpecError, routing_prior
from moebench.suite_schema import _REQUIRED_OTHER, _REQUIRED_SHAPE, GRID_KEYS, _Axis

_UNSET = object()
_SHAPE_KEYS = frozenset(("preset", *SHAPE_FIELDS))
_REST_KEYS = frozenset(k for k in GRID_KEYS if k not in SHAPE_FIELDS + WORKLOAD_FIELDS)


def _picker(axes: list[_Axis], keys: frozenset[str] | None) -> Callable[[tuple[int, ...]], Any]:
    """A function of a combination of value indices: the indices of the axes holding any
    of `keys` (None: the option axes), as a cache key."""
    if keys is None:
        wanted = [i for i, axis in enumerate(axes) if axis.is_option]
    else:
        wanted = [i for i, axis in enumerate(axes) if not axis.is_option and keys & set(axis.keys)]
    return operator.itemgetter(*wanted) if wanted else (lambda combination: ())


def _chosen(
    axes: list[_Axis], combination: tuple[int, ...], keys: frozenset[str] | None
) -> dict[str, Any]:
    """The values of `keys` (None: the options) that `combination` picks, by key."""
    chosen: dict[str, Any] = {}
    for axis, index in zip(axes, combination):
        if axis.is_option == (keys is None):
            chosen.update(
                (k, v) for k, v in zip(axis.keys, axis.values[index]) if keys is None or k in keys
            )
    return chosen


class CaseExpander:
    """Expands axes into cases and checks each case; problems go to `problem`."""

    def __init__(self, problem: Callable[[str], None]):
        self.problem = problem
        self._identity: dict[int, tuple[Any, ...]] = {}

    def expand(self, axes: list[_Axis], device: str) -> list[Case]:
        present = {key for axis in axes if not axis.is_option for key in axis.keys}
        missing = [key for key in _REQUIRED_OTHER if key not in present]
        if "preset" not in present:
            missing += [key for key in _REQUIRED_SHAPE if key not in present]
        for key in missing:
            extra = " (or a preset)" if key in _REQUIRED_SHAPE else ""
            self.problem(
                f"[grid] key {key!r}: required{extra} but not set in [grid] or [[zip]]; "
                f"allowed: {', '.join(GRID_KEYS)}"
            )
        if missing:
            return []
        # The product runs over value indices; shapes, workloads, the other fields and the
        # options repeat across it, so each distinct one is built once (and its part of
        # the case's identity computed once): a grid of a million cases expands in
        # seconds, and no case_id is hashed here.
        get_shape = _picker(axes, _SHAPE_KEYS)
        get_workload = _picker(axes, frozenset(WORKLOAD_FIELDS))
        get_rest = _picker(axes, _REST_KEYS)
        get_options = _picker(axes, None)
        shapes: dict[Any, LayerShape | None] = {}
        workloads: dict[Any, Workload] = {}
        rests: dict[Any, tuple[dict[str, Any], tuple[Any, ...]]] = {}
        options_of: dict[Any, tuple[tuple[tuple[str, Any], ...], tuple[Any, ...]]] = {}
        canonical: dict[Any, Any] = {}  # equal shapes/workloads share one object
        cases = []
        for combination in itertools.product(*(range(len(axis.values)) for axis in axes)):
            shape_key = get_shape(combination)
            shape = shapes.get(shape_key, _UNSET)
            if shape is _UNSET:
                made = self.make_shape(_chosen(axes, combination, _SHAPE_KEYS))
                shape = shapes[shape_key] = canonical.setdefault(made, made)
            if shape is None:
                continue
            workload_key = get_workload(combination)
            workload = workloads.get(workload_key)
            if workload is None:
                made = Workload(**_chosen(axes, combination, frozenset(WORKLOAD_FIELDS)))
                workload = workloads[workload_key] = canonical.setdefault(made, made)
            rest_key = get_rest(combination)
            if rest_key not in rests:
                rest = _chosen(axes, combination, _REST_KEYS)
                rests[rest_key] = (rest, tuple(v for k, v in rest.items() if k != "preset"))
            rest, rest_identity = rests[rest_key]
            options_key = (rest["impl"], get_options(combination))
            if options_key not in options_of:
                declared = registry.get(rest["impl"]).options
                chosen_options = _chosen(axes, combination, None)
                options = tuple(sorted((k, v) for k, v in chosen_options.items() if k in declared))
                # JSON tells 1, 1.0 and true apart, and so must the identity
                options_of[options_key] = (options, tuple((type(v), v) for _, v in options))
            options, options_identity = options_of[options_key]
            case = Case(shape=shape, workload=workload, device=device, options=options, **rest)
            # Equal identity <=> equal case_id (the id hashes every field but the preset).
            self._identity[id(case)] = (id(shape), id(workload), rest_identity, options_identity)
            cases.append(case)
        return cases

    def unique(self, cases: list[Case]) -> list[Case]:
        """`cases` (from `expand`) with those of one case_id kept once, first one wins."""
        seen: set[Any] = set()
        kept = []
        for case in cases:
            identity = self._identity[id(case)]
            if identity not in seen:
                seen.add(identity)
                kept.append(case)
        return kept

    def make_shape(self, chosen: dict[str, Any]) -> LayerShape | None:
        preset = chosen.get("preset", "")
        shape = asdict(PRESETS[preset]) if preset else {}
        shape.update({k: v for k, v in chosen.items() if k in SHAPE_FIELDS})
        missing = [key for key in _REQUIRED_SHAPE if key not in shape]
        if missing:
            self.problem(
                f"[grid] key {missing[0]!r}: required when preset is '' but not set; "
                "allowed: set it in [grid]/[[zip]] or name a preset"
            )
            return None
        return LayerShape(**shape)

    def check_cases(self, cases: list[Case], device: str, probe_device: bool = True) -> None:
        """Every case's problems, one line per distinct problem with a count of cases.
        Each check runs once per distinct value of what it reads (a shape, a routing for
        its expert count, an implementation with its dtype and mode, ...). Without
        `probe_device`, what only the device itself can say (CUDA's bfloat16 support) is
        not asked: the rest holds for any machine."""
        found: dict[tuple[str, str], list[Any]] = {}  # (key, message) -> [count, first case]
        memo: dict[tuple[Any, ...], list[tuple[str, str]]] = {}
        for case in cases:
            shape, workload = case.shape, case.workload
            checks = (
                (id(shape), _shape_problems),
                (id(workload), _workload_problems),
                (("routing", case.routing, shape.num_experts), _routing_problems),
                (("weights", case.weights), _weights_problems),
                (("cuda_graph", case.cuda_graph, case.world_size), _cuda_graph_problems),
                (("ranks", case.world_size, case.seed), _rank_problems),
                (("router_scale", case.router_scale, case.weights), _router_scale_problems),
                (("impl", case.impl, case.dtype, workload.mode), _impl_problems),
            )
            if probe_device:
                checks += ((("cuda_dtype", case.dtype), _cuda_dtype_problems),)
            for memo_key, check in checks:
                problems = memo.get(memo_key)
                if problems is None:
                    problems = memo[memo_key] = check(case, device)
                for key, message in problems:
                    entry = found.setdefault((key, message), [0, case])
                    entry[0] += 1
        for (key, message), (count, case) in found.items():
            more = f", and {count - 1} more case(s)" if count > 1 else ""
            options = f" {dict(case.options)}" if case.options else ""
            self.problem(f"key {key!r}: {message} (in case '{case.label()}{options}'{more})")


def _shape_problems(case: Case, device: str) -> list[tuple[str, str]]:
    return case.shape.problems()


def _workload_problems(case: Case, device: str) -> list[tuple[str, str]]:
    return case.workload.problems()


def _routing_problems(case: Case, device: str) -> list[tuple[str, str]]:
    if case.shape.num_experts >= 1:
        try:
            routing_prior(case.routing, case.shape.num_experts)
        except RoutingSpecError as exc:
            return [("routing", str(exc))]
    return []


def _weights_problems(case: Case, device: str) -> list[tuple[str, str]]:
    if case.weights != "random":
        from moebench.weight_sources import validate_weights_spec

        if problem := validate_weights_spec(case.weights):
            return [("weights", problem)]
    return []


def _cuda_graph_problems(case: Case, device: str) -> list[tuple[str, str]]:
    if case.cuda_graph and not (device.startswith("cuda") and case.world_size == 1):
        return [("cuda_graph", "needs a CUDA device and world_size 1; allowed: false here")]
    return []


def _rank_problems(case: Case, device: str) -> list[tuple[str, str]]:
    problems = []
    for key, minimum in (("world_size", 1), ("seed", 0)):
        if getattr(case, key) < minimum:
            problems.append((key, f"must be >= {minimum}, got {getattr(case, key)}"))
    return problems


def _router_scale_problems(case: Case, device: str) -> list[tuple[str, str]]:
    """router_scale: a finite number > 0, and only for drawn router weights (a
    checkpoint's router is the checkpoint's)."""
    scale = case.router_scale
    if not (math.isfinite(scale) and scale > 0):
        return [("router_scale", f"must be a finite number > 0, got {scale}")]
    if case.weights.startswith("checkpoint") and scale != DEFAULT_ROUTER_SCALE:
        return [
            (
                "router_scale",
                f"{scale} has no effect on weights {case.weights!r} (the checkpoint's router "
                f"is used); allowed: the default {DEFAULT_ROUTER_SCALE} with a checkpoint",
            )
        ]
    return []


def _impl_problems(case: Case, device: str) -> list[tuple[str, str]]:
    """What the implementation (ImplInfo) says about the case's dtype, device and mode."""
    problems: list[tuple[str, str]] = []
    info = registry.get(case.impl)
    if case.dtype not in info.dtypes:
        problems.append(
            (
                "dtype",
                f"impl {case.impl!r} does not support dtype {case.dtype!r}; "
                f"allowed for it: {', '.join(info.dtypes)}",
            )
        )
    device_type = device.split(":")[0]
    if device_type not in info.devices:
        problems.append(
            (
                "impl",
                f"impl {case.impl!r} does not run on device {device!r}; "
                f"allowed for it: {', '.join(info.devices)}",
            )
        )
    if case.workload.mode in MODES and case.workload.mode not in info.modes:
        problems.append(
            (
                "mode",
                f"impl {case.impl!r} does not support mode {case.workload.mode!r}; "
                f"allowed for it: {', '.join(info.modes)}",
            )
        )
    return problems


def runnable_problems(case: Case, device: str) -> list[str]:
    """Why the case's implementation cannot run it on `device` (the devices, dtypes and
    modes it registered; CUDA's bfloat16 support, asked; on several ranks, what the
    expert-parallel launcher refuses), one sentence each; [] if it can."""
    found = [message for _, message in _impl_problems(case, device)]
    found += [message for _, message in _cuda_dtype_problems(case, device)]
    if case.world_size > 1:
        from moebench.distributed.group import case_problem

        if problem := case_problem(case):
            found.append(problem)
    return found


def _cuda_dtype_problems(case: Case, device: str) -> list[tuple[str, str]]:
    """What the CUDA device itself says about the case's dtype (it is asked)."""
    if device.startswith("cuda") and case.dtype == "bfloat16" and not _cuda_bf16_supported():
        return [
            (
                "dtype",
                f"bfloat16 is not supported by CUDA device {device!r} "
                "(torch.cuda.is_bf16_supported() is False); allowed: float32 or float16",
            )
        ]
    return []


def _cuda_bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_bf16_supported())


_MISSING = object()


def _matches(case: Case, table: dict[str, list[Any]]) -> bool:
    """True if every key of the filter table matches (a list matches any of its items)."""
    for key, allowed in table.items():
        value = _field_value(case, key)
        if value is _MISSING or value not in allowed:
            return False
    return True


def _field_value(case: Case, key: str) -> Any:
    """The case's value of a filter key (a field, "tokens" or an option), or _MISSING;
    read from its part, not from a flattened copy of every field."""
    if key in SHAPE_FIELDS:
        return getattr(case.shape, key)
    if key in WORKLOAD_FIELDS:
        return getattr(case.workload, key)
    if key == "tokens":
        return case.tokens
    if key in CASE_FIELDS and key != "options":
        return getattr(case, key)
    return case.option(key, _MISSING)
