"""The implementation registry: `@register` for built-ins and plugins alike.

An implementation is a function `build(weights, case) -> torch.nn.Module` whose module
maps `x_TD` to `y_TD` (see `moebench.layer.MoELayer`). Other packages publish theirs
under the entry-point group `moebench.implementations`; the entry point names a module
(or an object in it) whose import runs `@register`:

    # my_pkg/moe.py
    from moebench import register
    from moebench.layer import MoELayer

    @register("my-moe", family="mine", description="my fused MoE kernel")
    def build(weights, case):
        return MyLayer(weights, case)

    # pyproject.toml of my_pkg
    [project.entry-points."moebench.implementations"]
    my-moe = "my_pkg.moe"

A plugin that fails to import is listed as broken with its error; nothing else breaks.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "moebench.implementations"
BUILTIN_MODULES = (
    "moebench.impls.reference",
    "moebench.impls.dense",
    "moebench.impls.grouped",
    "moebench.impls.capacity",
    "moebench.impls.merging",
    "moebench.impls.offload",
    "moebench.impls.deepseek",
    "moebench.impls.moepp",
    "moebench.impls.dsmoe",
    "moebench.impls.topp",
    "moebench.impls.hierarchical",
    "moebench.impls.expert_parallel",
    "moebench.impls.triton",
)


@dataclass(frozen=True)
class ImplInfo:
    """What the registry knows of one implementation."""

    name: str
    build: Callable[..., Any]
    family: str
    description: str
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    exact: bool = True
    modes: tuple[str, ...] = ("forward", "train")
    source: str = "builtin"
    options: tuple[str, ...] = field(default=())
    reference: Callable[..., Any] | None = None


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that could not be loaded, with the reason."""

    name: str
    target: str
    error: str


_REGISTRY: dict[str, ImplInfo] = {}
_BROKEN: dict[str, BrokenPlugin] = {}
_loaded = False
_current_source = "builtin"


class RegistryError(ValueError):
    """A registration or look-up that cannot be honoured."""


class Unsupported(Exception):  # noqa: N818 (a refusal, not an error: the row is `skipped`)
    """Raised by `build(weights, case)` for a case the implementation cannot compute (a
    router convention it does not know, say): the runner records a `skipped` row with
    the message, rather than run a different function under the case's name.

        if case.shape.scoring != "softmax":
            raise Unsupported("my-moe: softmax routing only")
    """


def register(
    name: str,
    *,
    family: str,
    description: str,
    devices: tuple[str, ...] = ("cpu", "cuda"),
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16"),
    exact: bool = True,
    modes: tuple[str, ...] = ("forward", "train"),
    options: tuple[str, ...] = (),
    reference: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `build(weights, case) -> nn.Module` under `name`; refuse duplicates.

    exact: True if the layer computes the reference function (checked against it before
    timing); False for variants that change it on purpose (their deviation is recorded
    as `fidelity_err`). options: names of the case options the implementation reads.
    reference: for a variant, `reference(weights_list, x_TD, case) -> y_TD` (float32),
    the plain reference of its own design (weights_list: one weight set per stacked
    layer); the variant is then checked against it like an exact layer (`rel_err`,
    `mismatch`) and still reports `fidelity_err` against the base MoE layer.
    """

    def decorate(build: Callable[..., Any]) -> Callable[..., Any]:
        if build.__module__ not in BUILTIN_MODULES:
            # Built-ins first, so a plugin cannot take a built-in's name unnoticed. (Not
            # for the built-ins themselves: one may import another while half-loaded.)
            load_all()
        if name in _REGISTRY:
            raise RegistryError(
                f"implementation {name!r} is already registered "
                f"(by {_REGISTRY[name].source}); pick another name"
            )
        _REGISTRY[name] = ImplInfo(
            name=name,
            build=build,
            family=family,
            description=description,
            devices=tuple(devices),
            dtypes=tuple(dtypes),
            exact=exact,
            modes=tuple(modes),
            source=_current_source,
            options=tuple(options),
            reference=reference,
        )
        return build

    return decorate


def unregister(name: str) -> None:
    """Remove an implementation (for tests and interactive use)."""
    _REGISTRY.pop(name, None)


def load_all() -> None:
    """Import the built-ins and every entry-point plugin, once."""
    global _loaded, _current_source
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _current_source = f"plugin {ep.name} ({ep.value})"
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            _BROKEN[ep.name] = BrokenPlugin(ep.name, ep.value, detail)
        finally:
            _current_source = "builtin"


def get(name: str) -> ImplInfo:
    """The implementation called `name`, or an error listing the known names (and the
    plugins that failed to import: the name may be one of theirs)."""
    load_all()
    if name not in _REGISTRY:
        known = ", ".join(map(repr, sorted(_REGISTRY)))
        raise RegistryError(f"unknown implementation {name!r}; known: {known}{broken_note()}")
    return _REGISTRY[name]


def broken_note() -> str:
    """'; plugin(s) that failed to import, which may have registered it: ...' or ''."""
    load_all()
    if not _BROKEN:
        return ""
    named = "; ".join(f"{b.name} ({b.target}): {b.error}" for b in _BROKEN.values())
    return f"; plugins that failed to import (one may have registered it): {named}"


def available() -> dict[str, ImplInfo]:
    load_all()
    return dict(sorted(_REGISTRY.items()))


def broken() -> dict[str, BrokenPlugin]:
    load_all()
    return dict(_BROKEN)
