"""The tuned choices moebench ships (`moebench/impls/triton/tuned/`) still match the code.

A shipped choice is taken only under the fingerprint the running code computes for its
key (`tuning.code_fingerprint`: the kernels' cache keys, the candidates, Triton's and
torch's versions). A kernel's cache key takes its source and its first line's number, so
an edit of a kernel, or a line added above one in its file, leaves every shipped choice
that depends on it unmatched, and a card tunes again: version 17 lost its first shipped
file so (NOTES.md). This recomputes the fingerprint of each shipped forward choice (the
two GEMMs and the row-block race) under the card's versions, in a process without
Triton's interpreter (whose kernels have no cache key), and of the backward's weight
gradients (version 40 shipped the H100's again and dropped the H200's, which no longer
matched). A GEMM's choice matches if it was made with the Gluon and merged-tail races in
any of their states (on by default since version 31; both cards' shipped choices were
made with both on, the H100's in version 32, the H200's in version 33), by one pass or
with the run-off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CHECKOUT, without_interpreter

pytest.importorskip("triton", reason="the fingerprints take the kernels' Triton cache keys")

# The versions on the lent H200 that the shipped choices were tuned with
# (results/reference/h200-triton-v17/run.json, "environment").
CARD_TRITON, CARD_TORCH = "3.6.0", "2.11.0+cu130"

CHECK = """
import json, sys, torch
from moebench.impls.triton import layer, tuning, weight_grad

tuning._version = lambda distribution: sys.argv[1]
torch.__version__ = sys.argv[2]
checked, stale = 0, []
for path in sorted(tuning.shipped_dir().glob("*.json")):
    for full_key in json.loads(path.read_text()):
        kind, _, D, F, E, K, _, T, *rest = full_key.split()
        D, F, E, K, T = (int(part[1:]) for part in (D, F, E, K, T))
        if kind in ("gate_up", "gate_up_train", "down"):
            block_m = int(rest[0][1:])
            expected = set(layer.shipped_fingerprints(kind, block_m, D, F, T))
        elif kind == "block_m":
            configs = [{"BLOCK_M": m} for m in tuning.block_m_choices(T, K, E)]
            expected = {
                tuning.code_fingerprint(layer.BLOCK_M_CODE, configs, timed_by)
                for timed_by in (tuning.timing_way(False, runoff) for runoff in (True, False))
            }
        elif kind.startswith("weight_grad_"):
            # the block height is the alignment's, which the key leaves out: either side of
            # the few-rows kernel's two candidate lists; both cards store by TMA and run
            # torch's grouped GEMM on bfloat16
            M = 2 * F if kind == "weight_grad_gate_up" else F
            expected = {
                tuning.code_fingerprint(
                    (weight_grad.weight_grad_kernel,),
                    weight_grad.candidates(block_m, True, M, D, store_tma=True),
                    tuning.timing_way(False, runoff),
                )
                for block_m in (16, 64)
                for runoff in (True, False)
            }
        else:  # dh and dx: other code, not checked here
            continue
        checked += 1
        if rest[-1] not in expected:
            stale.append(f"{path.name}: {full_key} (the code gives {sorted(expected)})")
print(json.dumps({"checked": checked, "stale": stale}))
"""


def _check(package_root: Path | None = None) -> dict:
    """The check's findings, with moebench imported from `package_root` if given."""
    env = without_interpreter()
    if package_root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package_root), env["PYTHONPATH"]])
    result = subprocess.run(
        [sys.executable, "-c", CHECK, CARD_TRITON, CARD_TORCH],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=package_root or CHECKOUT,
    )  # fmt: skip  (`-c` puts the working directory first on sys.path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_shipped_gemm_choice_matches_the_codes_fingerprint():
    found = _check()
    assert found["checked"] > 0, "no shipped choice to check"
    assert found["stale"] == [], (
        "shipped choices the code no longer matches (a kernel edited or moved in its "
        "file): tune them again on the card and `scripts/ship_tuning.py --replace`:\n"
        + "\n".join(found["stale"])
    )


def test_a_line_added_above_a_kernel_is_caught(tmp_path):
    """The check itself: a copy of the package whose tma.py has one line more at its
    top fails it."""
    copy = tmp_path / "moebench"
    shutil.copytree(CHECKOUT / "moebench", copy, ignore=shutil.ignore_patterns("__pycache__"))
    tma_py = copy / "impls" / "triton" / "tma.py"
    tma_py.write_text("# one line more\n" + tma_py.read_text())
    found = _check(tmp_path)
    assert found["checked"] > 0 and found["stale"]


# Triton 3.6's `JITFunction.cache_key` adds a function's constexpr globals (and those of
# its callees hashed before it) to its key: a key then depends on the order the kernels
# were first hashed or compiled in, and a choice tuned on a card under one order is not
# found under another (version 31's H100 choices of the Gluon race: NOTES.md).
NO_CONSTEXPR_GLOBALS = """
import importlib, json, sys
from triton.language.core import constexpr
from triton.runtime.jit import JITCallable

sys.path.insert(0, sys.argv[1])
found = []
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    for attr, value in sorted(vars(module).items()):
        if isinstance(value, JITCallable) and value.fn.__module__ == name:
            value.cache_key
            for (var, _), (val, _) in value.used_global_vals.items():
                if isinstance(val, constexpr):
                    found.append(f"{name}.{attr} reads the constexpr global {var}")
print(json.dumps(found))
"""


def _constexpr_globals(modules: list[str], path: Path = CHECKOUT) -> list[str]:
    env = without_interpreter()
    result = subprocess.run(
        [sys.executable, "-c", NO_CONSTEXPR_GLOBALS, str(path), *modules],
        capture_output=True, text=True, env=env, timeout=300, cwd=CHECKOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _kernel_modules() -> list[str]:
    """moebench's modules that define Triton or Gluon functions."""
    modules = []
    for path in sorted((CHECKOUT / "moebench").rglob("*.py")):
        if "@triton.jit" in (text := path.read_text()) or "@gluon.jit" in text:
            modules.append(".".join(path.relative_to(CHECKOUT).with_suffix("").parts))
    return modules


def test_no_kernel_reads_a_constexpr_global():
    """Every kernel's cache key, and so every fingerprint, is the same whatever order the
    kernels were hashed in: no JIT function of moebench reads a constexpr global."""
    pytest.importorskip("triton.experimental.gluon", reason="the Gluon modules import it")
    modules = _kernel_modules()
    assert "moebench.impls.triton.gluon_common" in modules and len(modules) >= 10, modules
    assert _constexpr_globals(modules) == []


def test_a_constexpr_global_is_caught(tmp_path):
    """The check itself: a kernel that reads a constexpr global fails it."""
    (tmp_path / "reads_a_global.py").write_text(
        "import triton\nimport triton.language as tl\n\n_WIDTH = tl.constexpr(4)\n\n\n"
        "@triton.jit\ndef kernel(ptr):\n    tl.store(ptr + tl.arange(0, _WIDTH), 0)\n"
    )
    found = _constexpr_globals(["reads_a_global"], tmp_path)
    assert found == ["reads_a_global.kernel reads the constexpr global _WIDTH"]
