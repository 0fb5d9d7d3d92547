"""Triton launches without Triton's per-call argument binding, for launch-bound layers.

`kernel[grid](*args, **meta)` binds every argument, derives its specialisation, hashes a
cache key and looks the compiled kernel up on each call: at one token that host work is
a large part of an un-graphed layer's time (scripts/host_profile.py measures it).
`launcher(kernel)[grid](*args, **meta)` does the first launch of each specialisation the
same way, keeps the compiled kernel, and later launches it directly with the compiled
kernel's own launcher.

The specialisation key is what Triton specialises on: each tensor's dtype and whether
its address is 16-byte aligned; each int's being 1, its divisibility by 16 and its width
class; the values of the keyword (constexpr and launch option) arguments; the device.
Anything else (an argument of another type, a parameter left to its default, Triton's
interpreter) takes Triton's own path on every call. MOEBENCH_TRITON_FAST_LAUNCH=0 turns
the shortcut off, for comparing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

_INT32 = range(-(2**31), 2**31)


def _spec(arg: Any) -> Any:
    """What Triton's specialisation of one positional argument depends on."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool):
        return ("bool", arg)
    if isinstance(arg, int):
        return ("int", arg == 1, arg % 16 == 0, arg in _INT32, arg >= 2**63)
    if isinstance(arg, float):
        return ("float",)
    if arg is None:
        return None
    raise TypeError(f"no fast launch for an argument of type {type(arg).__name__}")


class Launcher:
    """One @triton.jit kernel's launches, cached per specialisation."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.arg_names: list[str] = list(getattr(kernel, "arg_names", []))
        self.compiled: dict[tuple, tuple[Any, tuple[str, ...]]] = {}

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
        """Launch the kernel on `grid` (a tuple of ints) with these arguments."""
        try:
            if not all(isinstance(v, (bool, int, float, str)) for v in meta.values()):
                raise TypeError("a keyword argument that is not a plain value")
            key = (torch.cuda.current_device(), tuple(map(_spec, args)), tuple(meta.items()))
            hit = self.compiled.get(key)
        except TypeError:  # an argument not keyed here (or an unhashable meta value)
            self.kernel[grid](*args, **meta)
            return
        if hit is None:
            compiled = self.kernel[grid](*args, **meta)  # Triton's path: bind, compile, launch
            tail = tuple(self.arg_names[len(args) :])
            if hasattr(compiled, "packed_metadata") and all(name in meta for name in tail):
                self.compiled[key] = (compiled, tail)
            return
        compiled, tail = hit
        values = (*args, *(meta[name] for name in tail))
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*values)


_LAUNCHERS: dict[int, Any] = {}
_ENABLED = os.environ.get("MOEBENCH_TRITON_FAST_LAUNCH", "1") != "0"


def launcher(kernel: Any) -> Any:
    """`kernel` itself where the shortcut is off or cannot apply (Triton's interpreter),
    else its cached `Launcher`: index it with the grid and call it as the kernel. Decided
    on a kernel's first launch (one dictionary look-up per launch after that)."""
    cached = _LAUNCHERS.get(id(kernel))
    if cached is None:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        cached = Launcher(kernel) if _ENABLED and not interpreted else kernel
        _LAUNCHERS[id(kernel)] = cached
    return cached
