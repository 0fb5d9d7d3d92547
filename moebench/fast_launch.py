"""Launching moebench's Triton kernels without the JIT's per-call dispatch.

`kernel[grid](*args, **kwargs)` goes through Triton's JIT dispatch on every call: it
binds the arguments to the signature, specialises each one (a pointer's 16-byte
alignment, an integer's divisibility by 16, an integer equal to 1), builds a cache key
from that and the options, looks the compiled kernel up, checks the globals the kernel
read, and only then launches. Under cProfile on an H200 machine's host that was 45 us a
launch, and a one-token forward of the fused layer launches five kernels: un-graphed,
the host's time is the call's latency (triton/NOTES.md, version 15).

`launch(kernel, grid, *args, **kwargs)` is the same launch. The first call of each
specialisation goes through the JIT (which compiles if need be, and launches) and keeps
the compiled kernel, keyed by the kernel, the current device, the keyword arguments
(constexprs and options, by name) and each positional argument's specialisation as
Triton's binder computes it (`native_specialize_impl`, with the kernel's own backend
and the parameter's flags). Later calls compute that key and hand the arguments to the
compiled kernel's launcher (the C function `CompiledKernel[grid]` ends in) with the
current stream. Since the key is Triton's own specialisation, arguments that would
compile another kernel get another entry: a kernel compiled for other arguments is
never reused.

`CompiledKernel[grid]` itself is skipped too: on every call it reads the current device
through `torch.cuda.current_device` and builds a launch-metadata record for hooks that
are not set (in Triton 3.6 the hook chains are never None). Under cProfile on the H200
machine's host that was half of a fast launch's time, three times the key's
(triton/NOTES.md, version 16). It is still the path where a launch hook is set (Proton,
say: the hooks run as Triton runs them), for a kernel that needs scratch memory
allocated per launch, and with a Triton whose C launcher takes other leading arguments
than 3.6's (`LAUNCHER_HEAD_FORMAT`).

What it skips: the check that the globals a kernel read have not changed since it
compiled (moebench's kernels read module constants only), and the pre-run hooks (none
are set on these kernels).

Host-side tensor descriptors (the TMA kernels' operands) take the fast path too: the
binder keys each by its dtype and block shape, and Triton 3.6's launcher (`launch` of
the compiled kernel's `run`) encodes each descriptor's CUtensorMap on every launch, as
it does under the JIT. Through the JIT, the fused layer's TMA gate_up launch took 120
us under cProfile where its pointer down launch took 47 (an H200 machine's host,
OLMoE-1B-7B at 1024 tokens, where the tuner picks TMA tiles; triton/NOTES.md, version
20).

Plain launches remain where the fast path does not apply: Triton's interpreter (the CPU
tests), a kernel whose parameters carry annotations or `do_not_specialize` (the binder
treats those apart), a kernel first launched with tensor descriptors under a Triton
whose launcher does not expand them (`_launcher_expands_descriptors`), a Triton without
`native_specialize_impl`, and `$MOEBENCH_FAST_LAUNCH=0` (to measure what it gives, or to
rule it out).

Within `compile_only()`, a launch compiles its kernel for its arguments and runs nothing:
by default through the JIT's `warmup` (under Triton's `AsyncCompileMode` the compile goes
to a thread pool; the tuner compiles all of a key's candidates at once so before timing
them one by one, `tuning.py`), or through a function of the caller's
(`moebench.offline_compile`: for a card this host does not have).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from typing import Any

import torch

from moebench.env import switch_off

ENV_SWITCH = "MOEBENCH_FAST_LAUNCH"


def switched_off() -> bool:
    """Whether `$MOEBENCH_FAST_LAUNCH` turns the fast path off ("0", "off", "false", "no")."""
    return switch_off(ENV_SWITCH)


# The switch, read once per process and again by `refresh_switch`: an environment read
# per launch would be a measurable part of what this module saves.
_off = switched_off()


def refresh_switch() -> None:
    """Read `$MOEBENCH_FAST_LAUNCH` again (for tests that flip it)."""
    global _off
    _off = switched_off()


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for the grids: `triton.cdiv` is a constexpr function, whose call from
    Python costs about 3 us (next to 0.04 for this), several times a layer call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (>= 1): `triton.next_power_of_2` without the 3 us of
    a constexpr function's call from Python."""
    return 1 << max(0, n - 1).bit_length()


def state() -> str | None:
    """The run's environment record: "on" or "off" where CUDA is present, else None
    (`moebench compare` sets it side by side: it moves the latency of un-graphed small
    calls)."""
    if not torch.cuda.is_available():
        return None
    return "off" if _off else "on"


Compiler = Callable[[Any, Sequence[int], tuple, dict], object]


def _warm_up(kernel: Any, grid: Sequence[int], args: tuple, kwargs: dict) -> None:
    kernel.warmup(*args, grid=grid, **kwargs)


# Set inside `compile_only()`: what a launch compiles through instead of launching.
_compile_only: Compiler | None = None


@contextlib.contextmanager
def compile_only(compiler: Compiler | None = None) -> Iterator[None]:
    """Within it, `launch` compiles the kernel for its arguments and launches nothing
    (module docstring): `compiler(kernel, grid, args, kwargs)`, by default the JIT's
    `warmup`. Nothing is kept for the fast path: a compile handed to a thread pool is no
    kernel yet, and the first launch after goes through the JIT, which finds the
    compiled kernel in its cache."""
    global _compile_only
    was, _compile_only = _compile_only, compiler or _warm_up
    try:
        yield
    finally:
        _compile_only = was


def compiling_only() -> bool:
    """Whether launches only compile (`compile_only`)."""
    return _compile_only is not None


def compiling_offline() -> bool:
    """Whether launches compile through a caller's compiler (`compile_only(compiler)`),
    for a card this host may not have, rather than the JIT's own."""
    return _compile_only is not None and _compile_only is not _warm_up


def launch(kernel: Any, grid: Sequence[int], *args: object, **kwargs: object) -> None:
    """`kernel[grid](*args, **kwargs)` (module docstring): `args` positional in the
    kernel's parameter order, `kwargs` the remaining parameters by name and the launch
    options (num_warps, num_stages, launch_pdl)."""
    if _compile_only is not None:
        if _is_jit_function(kernel):  # (the interpreter's kernels compile nothing)
            _compile_only(kernel, grid, args, kwargs)
        return
    launcher = _launchers.get(id(kernel))
    if launcher is None:
        launcher = _launchers[id(kernel)] = _Launcher(kernel, args)
    if _off or launcher.plain:
        kernel[grid](*args, **kwargs)
    else:
        launcher(grid, args, kwargs)


class _Launcher:
    """One kernel's compiled kernels by specialisation (module docstring)."""

    def __init__(self, kernel: Any, args: tuple):
        self.kernel = kernel
        self.native = _native_specialize_impl()
        params = list(getattr(kernel, "params", ()))
        self.plain = (
            self.native is None
            or not _is_jit_function(kernel)
            # Gluon's descriptors: left to the JIT's own packing
            or getattr(kernel, "is_gluon", bool)()
            or any(p.annotation_type or p.do_not_specialize for p in params if not p.is_constexpr)
            # a descriptor at the first launch: plain before the binder is asked to key
            # it (`__call__` catches one that comes later)
            or (
                any(_is_tensor_descriptor(arg) for arg in args)
                and not _launcher_expands_descriptors()
            )
        )
        # per parameter: constexpr, const, specialised on alignment
        self.constexprs = [p.is_constexpr for p in params]
        self.consts = [p.is_const for p in params]
        self.aligns = [not p.do_not_specialize_on_alignment for p in params]
        # positional arguments before the first constexpr are specialised in one `map`
        self.first_constexpr = next(
            (i for i, p in enumerate(params) if p.is_constexpr), len(params)
        )
        self.params = params
        self.backends: dict[int, Any] = {}
        # (device, keyword items, specialisations) -> _Compiled
        self.compiled: dict[tuple, _Compiled] = {}

    def __call__(self, grid: Sequence[int], args: tuple, kwargs: dict) -> None:
        device = _current_device()
        backend = self.backends.get(device)
        if backend is None:
            # the backend the JIT's binder specialises with on this device
            backend = self.backends[device] = self.kernel.device_caches[device][3]
        key = (device, tuple(kwargs.items()), self.specialisations(backend, args))
        found = self.compiled.get(key)
        if found is None:
            # A kernel first seen without a descriptor may take one later (the weight
            # gradients' persistent tiles): a launcher that cannot expand it sends the
            # kernel through the JIT from now on.
            if not _launcher_expands_descriptors() and any(map(_is_tensor_descriptor, args)):
                self.plain = True
            compiled = self.kernel[grid](*args, **kwargs)  # the JIT: compiles, launches
            if compiled is not None and hasattr(compiled, "packed_metadata"):
                rest = tuple(kwargs.get(p.name, p.default) for p in self.params[len(args) :])
                self.compiled[key] = _Compiled(compiled, rest)
            return
        found.launch(grid, device, args)

    def specialisations(self, backend: Any, args: tuple) -> tuple:
        """Each positional argument's specialisation as the JIT's binder computes it
        with `backend` (`native_specialize_impl`), a constexpr's as its value."""
        if len(args) <= self.first_constexpr:  # a C loop: no Python frame per argument
            return tuple(
                map(self.native, repeat(backend), args, self.consts, repeat(True), self.aligns)
            )
        return tuple(
            arg if constexpr else self.native(backend, arg, const, True, align)
            for arg, constexpr, const, align in zip(args, self.constexprs, self.consts, self.aligns)
        )


class _Compiled:
    """A compiled kernel and the parameters after the positional ones, launched through
    its C launcher where no hook is set and it needs no scratch memory, else through
    `CompiledKernel[grid]` (module docstring)."""

    __slots__ = ("c_launch", "direct", "head", "kernel", "rest", "runtime")

    def __init__(self, compiled: Any, rest: tuple):
        from triton import knobs

        self.kernel, self.rest, self.runtime = compiled, rest, knobs.runtime
        launcher = compiled.run  # loads the module and function handles if need be
        self.direct = (
            _launcher_takes_head()
            and getattr(launcher, "global_scratch_size", 1) == 0
            and getattr(launcher, "profile_scratch_size", 1) == 0
            and callable(getattr(launcher, "launch", None))
        )
        if self.direct:
            self.c_launch = launcher.launch
            # what the launcher takes between the stream and the kernel's arguments:
            # function, cooperative grid, PDL, two scratch buffers (none), the packed
            # metadata, launch metadata and the two hooks (none)
            self.head = (
                compiled.function,
                launcher.launch_cooperative_grid,
                launcher.launch_pdl,
                None, None, compiled.packed_metadata, None, None, None,
            )  # fmt: skip

    def launch(self, grid: Sequence[int], device: int, args: tuple) -> None:
        grid_x = grid[0]
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        if self.direct and _no_launch_hooks(self.runtime):
            stream = _current_stream(device)
            self.c_launch(grid_x, grid_y, grid_z, stream, *self.head, *args, *self.rest)
        else:
            self.kernel[(grid_x, grid_y, grid_z)](*args, *self.rest)


def _current_device() -> int:
    """The current CUDA device's index, without `torch.cuda.current_device`'s lazy-init
    check (a fast launch follows a JIT launch, which initialised CUDA)."""
    return torch._C._cuda_getDevice()


def _current_stream(device: int) -> int:
    """The current stream's handle on `device`, as Triton's driver reads it."""
    return torch._C._cuda_getCurrentRawStream(device)


def _no_launch_hooks(runtime: Any) -> bool:
    """Whether no launch hook is set in Triton's `knobs.runtime` (3.6's empty hook
    chains; None or a hook set by assignment count as set: `CompiledKernel[grid]` runs
    them)."""
    return not getattr(runtime.launch_enter_hook, "calls", True) and not getattr(
        runtime.launch_exit_hook, "calls", True
    )


_launchers: dict[int, _Launcher] = {}

# The arguments Triton 3.6's C launcher parses before the kernel's own (grid, stream,
# function, cooperative grid, PDL, then seven objects: `_Compiled.head`); a Triton whose
# launcher takes others keeps `CompiledKernel[grid]`.
LAUNCHER_HEAD_FORMAT = "iiiKKppOOOOOO"


@functools.cache
def _launcher_takes_head() -> bool:
    try:
        from triton.backends.nvidia.driver import _BASE_ARGS_FORMAT
    except ImportError:
        return False
    return _BASE_ARGS_FORMAT == LAUNCHER_HEAD_FORMAT


@functools.cache
def _launcher_expands_descriptors() -> bool:
    """Whether the compiled kernel's launcher expands host-side tensor descriptors itself
    (Triton 3.6: `launcher.launch` is `wrap_handle_tensordesc`'s wrapper, which encodes
    each descriptor's CUtensorMap on every launch), so the fast path can hand them over
    as the JIT does."""
    try:
        from triton.backends.nvidia.driver import wrap_handle_tensordesc  # noqa: F401
    except ImportError:
        return False
    return _launcher_takes_head()


def _native_specialize_impl() -> Any:
    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:
        return None
    return native_specialize_impl


def _is_jit_function(kernel: Any) -> bool:
    """A JIT function (under Triton's interpreter kernels are `InterpretedFunction`s,
    whose launches stay plain)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return isinstance(kernel, JITFunction)


def _is_tensor_descriptor(arg: object) -> bool:
    """A host-side TMA tensor descriptor (`triton.tools.tensor_descriptor`)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return False
    return isinstance(arg, TensorDescriptor)
