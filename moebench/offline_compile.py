"""Compiling moebench's Triton kernels for a card this host does not have (Hopper, sm_90,
by default), to see that they compile and what they use, with no card and no data.

Triton compiles for a target without a device (`triton.compile` with a `GPUTarget`, its
bundled `ptxas`). Inside `compiling_for()`, every `moebench.fast_launch.launch` compiles
its kernel as Triton's JIT would for those arguments (the JIT's own binder and argument
packing: a pointer's 16-byte alignment, an integer's divisibility by 16, the
constexprs) and launches nothing; meta tensors (`device="meta"`) stand in for the data,
so a layer's code can run whole at a real model's shapes in no memory. The tuner, in
such a pass, compiles every candidate of each key and returns the first
(`tuning.Tuner`). Each compile is recorded with what the kernel uses: shared memory,
warps, and registers and stack (spills) per thread from its cubin (`cuobjdump`, which
Triton bundles), and its PTX without debug locations (`comparable_ptx`): two
checkouts' PTX, the same to the line, is the same kernel, so an edit meant to change no
kernel (a helper moved, a function shared) is checked without a card.

`scripts/offline_compile.py` runs the fused layer's forward so for a preset's shape.
Written for Triton 3.6 (it calls the JIT's `create_function_from_signature` and
`_pack_args`).

The compiled kernels land in Triton's cache as the JIT's own do, so a pass run with
`TRITON_CACHE_DIR` set can be packed (`pack_cache`: metadata and cubins only) and carried
to a card, where the JIT loads them instead of compiling (`unpack_cache` there first).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moebench import fast_launch

# Hopper (H100, H200): the GPUTarget's backend, capability and warp size.
HOPPER = ("cuda", 90, 32)


@dataclass(frozen=True)
class Compiled:
    """One kernel compiled for the target: its name, the launch's keyword arguments
    (constexprs and options), and what it uses, or why it did not compile."""

    kernel: str
    constants: dict[str, Any]
    shared_bytes: int = 0
    warps: int = 0
    registers: int = 0
    stack_bytes: int = 0
    error: str | None = None
    ptx: str = field(default="", repr=False)  # `comparable_ptx` of it, where it has PTX

    def describe(self) -> str:
        """One line: the kernel, its constants, and what it uses or its error."""
        constants = " ".join(f"{k}={v}" for k, v in self.constants.items())
        if self.error:
            return f"{self.kernel} {constants}: FAILED {self.error}"
        return (
            f"{self.kernel} {constants}: shared {self.shared_bytes} B, {self.warps} warps,"
            f" {self.registers} registers, stack {self.stack_bytes} B"
        )


def compile_for(kernel: Any, args: tuple, kwargs: dict, target: tuple = HOPPER) -> Any:
    """`kernel` (a JIT function) compiled for `target` as Triton's JIT compiles it for
    these arguments; tensors may be meta tensors."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource, compile
    from triton.runtime.jit import create_function_from_signature

    gpu = GPUTarget(*target)
    backend = CUDABackend(gpu)
    kwargs = {  # as the JIT's `run` completes them
        **kwargs,
        "debug": kernel.debug or knobs.runtime.debug,
        "instrumentation_mode": knobs.compilation.instrumentation_mode,
    }
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialisation, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialisation, options
    )
    if getattr(kernel, "is_gluon", bool)():  # a Gluon kernel's source lowers through Gluon's own
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    return compile(
        ASTSource(kernel, signature, constexprs, attrs), target=gpu, options=options.__dict__
    )


def resources(compiled: Any) -> dict[str, int]:
    """What a compiled kernel uses: shared memory and warps from its metadata, registers
    and stack per thread from its cubin (`cuobjdump --dump-resource-usage`)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(tool), "--dump-resource-usage", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump gave no resource usage: {usage[:200]!r}")
    return {
        "shared_bytes": compiled.metadata.shared,
        "warps": compiled.metadata.num_warps,
        "registers": int(found.group(1)),
        "stack_bytes": int(found.group(2)),
    }


@contextlib.contextmanager
def compiling_for(target: tuple = HOPPER) -> Iterator[list[Compiled]]:
    """Within it, each `fast_launch.launch` compiles its kernel for `target` and launches
    nothing; yields the list each compile is appended to (module docstring). A kernel
    that does not compile is recorded with its error, and the pass goes on."""
    record: list[Compiled] = []

    def compile_(kernel: Any, grid: object, args: tuple, kwargs: dict) -> None:
        record.append(compile_record(kernel, args, kwargs, target))

    with fast_launch.compile_only(compile_):
        yield record


def compile_record(kernel: Any, args: tuple, kwargs: dict, target: tuple = HOPPER) -> Compiled:
    """`kernel` compiled for `target` for these arguments (`compile_for`), as what it
    uses (`resources`) or, where it does not compile, why."""
    name = getattr(kernel, "__name__", None) or kernel.fn.__name__
    try:
        compiled = compile_for(kernel, args, kwargs, target)
        used = resources(compiled)
    except Exception as error:  # any compile failure is the finding
        return Compiled(name, kwargs, error=_summary(error))
    # (a kernel loaded from a packed cache has its cubin and no PTX)
    return Compiled(name, kwargs, **used, ptx=comparable_ptx(compiled.asm.get("ptx", "")))


# What of a PTX file says where its code came from, not what it does: debug locations,
# file names, comments, the debug sections, and the labels that mark inlined calls' lines
# (`$L__tmp7:`, numbered in order, so one call more or less renumbers all after it).
_PTX_PROVENANCE = re.compile(r"^\s*(\.loc|\.file|//)|^\$L__tmp\d+:$")


def comparable_ptx(ptx: str) -> str:
    """`ptx` without what says where its code came from (`_PTX_PROVENANCE`), with the
    references to the inlined calls' labels made alike: equal for the same kernel compiled
    from source rearranged (helpers moved between modules, a function passed in)."""
    if not ptx:
        return ""
    ptx = re.sub(r"^\s*\.section\s+\.debug.*", "", ptx, flags=re.S | re.M)
    lines = [line for line in ptx.splitlines() if not _PTX_PROVENANCE.match(line)]
    return re.sub(r"\$L__tmp\d+", "$L__tmp", "\n".join(lines)) + "\n"


def _summary(error: Exception) -> str:
    """An error in one line: its type, where (a compile error's first line, "at L:C:")
    and its cause (the last line, Triton's message after the quoted source)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    where = f"{lines[0]} " if len(lines) > 1 else ""
    return f"{type(error).__name__}: {where}{lines[-1].strip()}"


# Where a packed cache's groups name their files: replaced by the cache's folder where it
# is unpacked (`unpack_cache`), since Triton's groups hold absolute paths.
CACHE_PLACEHOLDER = "@TRITON_CACHE@"
# What loading a cached kernel reads: its metadata (and the group naming it) and binary.
_KEPT_SUFFIXES = (".json", ".cubin")


def pack_cache(cache_dir: Path) -> int:
    """Shrink the Triton cache in `cache_dir` (`TRITON_CACHE_DIR` of an offline pass) to
    what a card's JIT needs to load its kernels instead of compiling them: each entry's
    metadata and cubin (the IR, about nine tenths of an entry, goes), each group's paths
    relative to CACHE_PLACEHOLDER. Returns the bytes left. A JIT finds an entry only
    under the same key, which takes in Triton's version and its `ptxas`, the kernel's
    code, its arguments' specialisation and options (Triton's `get_cache_key`)."""
    for path in sorted(cache_dir.rglob("*")):
        if path.is_file() and not path.name.endswith(_KEPT_SUFFIXES):
            path.unlink()
    for group in cache_dir.rglob("__grp__*.json"):
        children = json.loads(group.read_text())["child_paths"]
        kept = {
            name: f"{CACHE_PLACEHOLDER}/{group.parent.name}/{Path(child).name}"
            for name, child in children.items()
            if name.endswith(_KEPT_SUFFIXES)
        }
        group.write_text(json.dumps({"child_paths": kept}))
    (cache_dir / MADE_BY).write_text(json.dumps(compiler_identity()))
    return sum(path.stat().st_size for path in cache_dir.rglob("*") if path.is_file())


# A packed cache's record of the compiler that made it (`compiler_identity`).
MADE_BY = "made_by.json"


def compiler_identity(target: tuple = HOPPER) -> dict[str, str]:
    """What of this host's compiler goes into every one of Triton's cache keys: the hash of
    Triton's own files and `libtriton` binary (`triton_key`, which differs between two
    Pythons' wheels of one version), and the backend's (`ptxas`'s version and the
    target), with the Python and Triton versions for the reader."""
    import platform

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.cache import triton_key

    return {
        "triton_key": triton_key(),
        "backend": CUDABackend(GPUTarget(*target)).hash(),
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def unpack_cache(cache_dir: Path) -> str:
    """Point a packed cache's groups at `cache_dir`, where it now lies (`pack_cache`), and
    say whether this host's Triton can load its kernels: one line, for the log."""
    for group in cache_dir.rglob("__grp__*.json"):
        text = group.read_text()
        group.write_text(text.replace(CACHE_PLACEHOLDER, str(cache_dir.resolve())))
    made_by = cache_dir / MADE_BY
    if not made_by.exists():
        return f"{cache_dir}: no {MADE_BY}, so whether this Triton can load it is not known"
    theirs, mine = json.loads(made_by.read_text()), compiler_identity()
    differ = [key for key in ("triton_key", "backend") if theirs.get(key) != mine[key]]
    if not differ:
        return f"{cache_dir}: made by this compiler (Triton {mine['triton']}), loadable"
    made = f"Triton {theirs.get('triton')} on Python {theirs.get('python')}"
    here = f"Triton {mine['triton']} on Python {mine['python']}"
    return (
        f"{cache_dir}: made by another compiler ({made}; here {here}; {' and '.join(differ)}"
        " differ): every kernel will compile again"
    )
