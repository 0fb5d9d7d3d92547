"""Shared fixtures: tiny cases and suites, a fast timing plan and a seeded random
generator; where
the Triton kernels' tests run (`KERNEL_DEVICE`, `needs_kernels`)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moebench.case import Case, LayerShape, Workload
from moebench.measure.timing import TimingPlan

FAST_PLAN = TimingPlan(budget_ms=20, warmup=1, min_repeats=2, max_repeats=5)

# The Triton kernels run on CUDA, or on CPU in Triton's interpreter (TRITON_INTERPRET=1,
# `make test-kernels`); their tests skip without either.
KERNEL_DEVICE = (
    "cuda"
    if torch.cuda.is_available()
    else ("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)
)
needs_kernels = pytest.mark.skipif(
    KERNEL_DEVICE is None or importlib.util.find_spec("triton") is None,
    reason="needs triton and a CUDA device (or TRITON_INTERPRET=1)",
)


CHECKOUT = Path(__file__).parents[1]


def without_interpreter() -> dict[str, str]:
    """This process's environment less TRITON_INTERPRET, the checkout importable: for a
    subprocess that compiles Triton kernels (the interpreter patches Triton's language
    while kernels run under it, so compiling in a process that runs it may fail)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(CHECKOUT), env.get("PYTHONPATH", "")])
    return env


def in_a_fresh_process(module: str, call: str) -> None:
    """Run `call` (Python code: a function of the test module `module`, "tests.test_x",
    with its arguments) in a new interpreter without Triton's interpreter
    (`without_interpreter`); fail with its error output unless it exits 0."""
    import subprocess
    import sys

    code = f"from {module} import *; {call}"
    done = subprocess.run(
        [sys.executable, "-c", code], env=without_interpreter(), cwd=CHECKOUT,
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(autouse=True)
def no_shipped_tuning(monkeypatch):
    """Every test tunes as if moebench shipped no tuned choices: on a card it ships them
    for, a test that tunes would take them and time nothing (the tests of the shipped
    choices turn them back on)."""
    monkeypatch.setenv("MOEBENCH_TRITON_SHIPPED", "0")


@pytest.fixture(autouse=True)
def no_columns(monkeypatch):
    """Every test's output as in a log, whatever $COLUMNS the shell or CI sets (a set
    $COLUMNS bounds piped output's width: moebench.console.bounded_width)."""
    monkeypatch.delenv("COLUMNS", raising=False)


@pytest.fixture
def launch_switch(monkeypatch):
    """`launch_switch(module, value)`: sets the environment switch of `module`
    (`moebench.fast_launch` or `moebench.dependent_launch`: `ENV_SWITCH`, read once per
    process) and has the module read it again; both undone after the test."""
    touched = []

    def set_to(module, value: str) -> None:
        monkeypatch.setenv(module.ENV_SWITCH, value)
        module.refresh_switch()
        touched.append(module)

    yield set_to
    for module in touched:
        monkeypatch.delenv(module.ENV_SWITCH, raising=False)
        module.refresh_switch()


def tiny_case(impl: str = "grouped", **changes) -> Case:
    """A case small enough to run in milliseconds on a CPU."""
    shape = LayerShape(
        hidden=changes.pop("hidden", 32),
        ffn=changes.pop("ffn", 48),
        num_experts=changes.pop("num_experts", 4),
        top_k=changes.pop("top_k", 2),
        shared_experts=changes.pop("shared_experts", 0),
        capacity_factor=changes.pop("capacity_factor", 1.25),
    )
    workload = Workload(
        batch=changes.pop("batch", 2),
        seq_len=changes.pop("seq_len", 8),
        mode=changes.pop("mode", "forward"),
        layers=changes.pop("layers", 1),
    )
    return Case(shape=shape, workload=workload, impl=impl, **changes)


TINY_SUITE = """[suite]
device = "cpu"
[grid]
impl = "grouped"
hidden = 32
ffn = 48
num_experts = 4
top_k = 2
batch = 1
seq_len = 4
"""


def tiny_suite_toml(**grid: str) -> str:
    """A CPU suite of one tiny `grouped` case (4 tokens), with more [grid] keys given as
    TOML values: `tiny_suite_toml(cuda_graph="[false, true]")`."""
    return TINY_SUITE + "".join(f"{key} = {value}\n" for key, value in grid.items())


@pytest.fixture
def fast_plan() -> TimingPlan:
    return FAST_PLAN


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator, for synthetic runs' samples."""
    return np.random.default_rng(1234)
