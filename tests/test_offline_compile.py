"""`moebench.offline_compile` and scripts/offline_compile.py: moebench's kernels compiled
for Hopper on a host without a card (CI's too). A launch in the pass compiles and runs
nothing, a kernel that does not compile is recorded with its error and the pass goes
on, the fused layer's forward compiles every tuning candidate of both GEMMs and its
training step its backward's kernels, and a packed cache is loaded, not compiled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="compiling for a card is Triton's")

import triton.language as tl
from triton.runtime.jit import JITFunction

from moebench import fast_launch, offline_compile
from moebench.impls.triton import tuning
from tests.conftest import without_interpreter

SCRIPT = Path(__file__).parents[1] / "scripts" / "offline_compile.py"


def _scale(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


def _broken(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), not_a_name)  # noqa: F821 (the compile error)


def check_a_pass() -> None:
    """The body of `test_a_launch_compiles_for_hopper_and_runs_nothing`, run in a process
    without the interpreter (which patches Triton's language while kernels run under it,
    so a compile in the same process may fail for that)."""
    x, out = torch.ones(32), torch.zeros(32)
    scale, broken = JITFunction(_scale), JITFunction(_broken)
    with offline_compile.compiling_for() as record:
        assert fast_launch.compiling_offline()
        fast_launch.launch(scale, (1,), x, out, 32, BLOCK=32, num_warps=2)
        fast_launch.launch(broken, (1,), x, BLOCK=32)
        fast_launch.launch(scale, (1,), x, out, 17, BLOCK=64, num_warps=4)
    assert not fast_launch.compiling_only() and (out == 0).all()
    good, bad, again = record
    assert good.kernel == "_scale" and good.error is None
    assert good.constants == {"BLOCK": 32, "num_warps": 2} and good.warps == 2
    assert good.registers > 0 and good.stack_bytes == 0
    assert bad.kernel == "_broken" and "not_a_name" in bad.error
    assert "FAILED" in bad.describe()
    assert again.error is None and again.warps == 4  # the pass went on


def test_a_launch_compiles_for_hopper_and_runs_nothing():
    code = "from tests.test_offline_compile import check_a_pass; check_a_pass()"
    done = subprocess.run(
        [sys.executable, "-c", code], env=without_interpreter(), cwd=SCRIPT.parents[1],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _run(*args: str) -> subprocess.CompletedProcess:
    """The script in a process without the interpreter (moebench's kernels then are
    JIT functions)."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=without_interpreter(),
        capture_output=True, text=True,
    )  # fmt: skip


def test_the_fused_forward_compiles_every_candidate_for_hopper():
    done = _run("--shape", "256", "384", "8", "2", "--tokens", "1", "64")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-1].startswith(f"{len(lines) - 1} kernels compiled for sm_90: 0 failed")
    for tokens in (1, 64):
        block_m = tuning.block_m_for(tokens, 2, 8)
        for gemm in ("gate_up", "down"):
            tiles = {
                line.split(": ")[0]
                for line in lines
                if line.startswith(f"T{tokens} {gemm}_kernel ")
            }
            assert len(tiles) == len(tuning.candidates(gemm, block_m)), (tokens, gemm)
    # one token: the per-assignment layout, no alignment kernel; 64 tokens: aligned, PDL
    assert all("PER_ASSIGNMENT=True" in line for line in lines if line.startswith("T1 gate"))
    assert any(line.startswith("T64 _align") for line in lines)
    assert all("PDL=True" in line for line in lines if line.startswith("T64 "))


def test_the_training_step_compiles_its_backward_too():
    done = _run("--shape", "256", "384", "8", "2", "--tokens", "64", "--train")
    assert done.returncode == 0, done.stderr[-2000:]
    kernels = {line.split()[1] for line in done.stdout.splitlines()[:-1]}
    assert kernels == {
        "_align_one_program_kernel", "gate_up_kernel", "down_kernel", "swiglu_backward_kernel",
        "token_rows_kernel", "weight_grad_kernel", "token_sum_kernel",
    }  # fmt: skip
    assert all("STORE_PRE=True" in line for line in done.stdout.splitlines() if " gate_up" in line)


def test_bad_arguments_exit_2():
    done = _run("--shape", "256", "384", "8", "9", "--tokens", "1")
    assert done.returncode == 2 and "top_k at most the experts" in done.stderr


def test_a_packed_cache_is_loaded_instead_of_compiled(tmp_path):
    """--cache: only metadata and cubins are kept, their groups named relative to the
    placeholder; unpacked where it lies, a second pass compiles nothing (no IR written
    again: every kernel was a hit in Triton's cache)."""
    cache = tmp_path / "cache"
    args = ("--shape", "256", "384", "8", "2", "--tokens", "64")
    done = _run(*args, "--cache", str(cache))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith(f"packed {cache}: ")
    suffixes = {path.suffix for path in cache.rglob("*") if path.is_file()}
    assert suffixes == {".json", ".cubin"}
    groups = list(cache.rglob("__grp__*.json"))
    assert groups and all(offline_compile.CACHE_PLACEHOLDER in g.read_text() for g in groups)
    made_by = json.loads((cache / offline_compile.MADE_BY).read_text())
    assert made_by == offline_compile.compiler_identity()
    moved = tmp_path / "elsewhere"
    cache.rename(moved)
    assert offline_compile.unpack_cache(moved).endswith("loadable")
    env = {**without_interpreter(), "TRITON_CACHE_DIR": str(moved)}
    again = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert {path.suffix for path in moved.rglob("*") if path.is_file()} == suffixes
    # made by another Triton's wheel (another Python's, say): said so, not loaded silently
    (moved / offline_compile.MADE_BY).write_text(json.dumps({**made_by, "triton_key": "x"}))
    assert "triton_key differ): every kernel will compile again" in offline_compile.unpack_cache(
        moved
    )
    (moved / offline_compile.MADE_BY).unlink()
    assert "not known" in offline_compile.unpack_cache(moved)


def test_comparable_ptx_drops_where_the_code_came_from_and_keeps_what_it_does():
    """Two compiles of one kernel from rearranged source differ in debug locations and
    the numbering of the inlined calls' labels only: those go; an instruction stays."""
    ptx = (
        '.version 8.7\n.file 1 "/a/gluon_down.py"\n.visible .entry k(\n)\n{\n'
        "\t.loc 1 40 5\n$L__tmpN:\n\tadd.s32 %r1, %r2, C;\n\tbra $L__BB0_2;\n"
        "// a comment\n}\n\t.section\t.debug_info\n{\n.b8 1\n}\n"
    )

    def compile_of(label: int, constant: int) -> str:
        return ptx.replace("N:", f"{label}:").replace("C;", f"{constant};")

    one, other = compile_of(3, 1), compile_of(7, 1)
    assert one != other
    kept = offline_compile.comparable_ptx(one)
    assert kept == offline_compile.comparable_ptx(other)
    assert ".loc" not in kept and ".file" not in kept and "$L__tmp" not in kept
    assert "debug_info" not in kept and "comment" not in kept
    assert "add.s32 %r1, %r2, 1;" in kept and "bra $L__BB0_2;" in kept
    assert kept != offline_compile.comparable_ptx(compile_of(3, 2))


def test_ptx_folder_holds_each_kernel_and_refuses_another_pass(tmp_path):
    folder = tmp_path / "ptx"
    done = _run("--shape", "256", "384", "8", "2", "--tokens", "64", "--ptx", str(folder))
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted(folder.glob("*.ptx"))
    kernels = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("T64 ")}
    assert {f.name.split("_", 1)[1].split("_BLOCK")[0] for f in files} >= {"gate_up_kernel"}
    assert len(files) >= len(kernels) and all(f.name.startswith("T64_") for f in files)
    for path in files:
        text = path.read_text()
        assert ".entry" in text and "\t.loc" not in text, path.name
    again = _run("--shape", "256", "384", "8", "2", "--tokens", "64", "--ptx", str(folder))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_passes_into_one_cache_add_up_and_another_compilers_is_refused(tmp_path):
    """A second --cache pass into a folder packed by this compiler takes it up (its
    kernels load, the other shape's are added) and packs it again; a folder packed by
    another compiler is refused (exit 2), not mixed."""
    cache = tmp_path / "cache"
    first = _run("--shape", "256", "384", "8", "2", "--tokens", "64", "--cache", str(cache))
    assert first.returncode == 0, first.stderr[-2000:]
    cubins = len(list(cache.rglob("*.cubin")))
    second = _run("--shape", "512", "384", "8", "2", "--tokens", "64", "--cache", str(cache))
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.splitlines()[0].endswith("loadable")
    assert len(list(cache.rglob("*.cubin"))) > cubins
    groups = list(cache.rglob("__grp__*.json"))
    assert all(str(cache) not in group.read_text() for group in groups)  # packed again
    made_by = json.loads((cache / offline_compile.MADE_BY).read_text())
    (cache / offline_compile.MADE_BY).write_text(json.dumps({**made_by, "backend": "other"}))
    third = _run("--shape", "256", "384", "8", "2", "--tokens", "64", "--cache", str(cache))
    assert third.returncode == 2 and "give an empty folder" in third.stderr
