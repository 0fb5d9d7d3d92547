"""Programmatic dependent launch (`moebench.dependent_launch`): where it is on, its
switch, the run's record of it, and its contract read from the kernels' source (each
waits before it reads). On the GPU: tests/test_triton.py
(`test_dependent_launch_keeps_every_bit`)."""

from __future__ import annotations

import pytest
import torch

from moebench import env

pytest.importorskip("triton", reason="the module's kernels helpers need triton")

from moebench import dependent_launch


def test_off_on_the_cpu() -> None:
    assert not dependent_launch.enabled(torch.device("cpu"))


@pytest.fixture
def switch(launch_switch):
    """Sets `$MOEBENCH_PDL` for the test (`launch_switch`)."""
    return lambda value: launch_switch(dependent_launch, value)


@pytest.mark.parametrize("value", ["0", "off", "False", " no "])
def test_switched_off_by_the_environment(monkeypatch, switch, value: str) -> None:
    switch(value)
    assert dependent_launch.switched_off()
    monkeypatch.setattr(dependent_launch, "_capable", lambda index: True)
    assert not dependent_launch.enabled(torch.device("cuda", 0))


@pytest.mark.parametrize("value", ["", "1", "on"])
def test_on_where_the_card_can(monkeypatch, switch, value: str) -> None:
    switch(value)
    monkeypatch.setattr(dependent_launch, "_capable", lambda index: True)
    assert dependent_launch.enabled(torch.device("cuda", 0))
    monkeypatch.setattr(dependent_launch, "_capable", lambda index: False)  # before Hopper
    assert not dependent_launch.enabled(torch.device("cuda", 0))


@pytest.fixture
def uncached_capability():
    """`_capable` looked up anew inside the test (it caches per device) and after it."""
    dependent_launch._capable.cache_clear()
    yield
    dependent_launch._capable.cache_clear()


def test_off_with_a_triton_that_lacks_it(monkeypatch, uncached_capability) -> None:
    assert dependent_launch.triton_has_it()  # the pinned Triton (3.6) has it
    monkeypatch.setattr(dependent_launch, "triton_has_it", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    assert not dependent_launch.enabled(torch.device("cuda", 0))


def test_off_on_rocm(monkeypatch, uncached_capability) -> None:
    """ROCm's torch.cuda reports an AMD GPU's architecture as its capability (9.4 on an
    MI300): PTX's griddepcontrol is not there."""
    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 4))
    assert not dependent_launch.enabled(torch.device("cuda", 0))


def test_calls_of_a_few_tokens_take_it(monkeypatch) -> None:
    monkeypatch.setattr(dependent_launch, "_capable", lambda index: True)
    cuda = torch.device("cuda", 0)
    limit = dependent_launch.MAX_TOKENS
    assert dependent_launch.for_tokens(cuda, 1) and dependent_launch.for_tokens(cuda, limit)
    assert not dependent_launch.for_tokens(cuda, limit + 1)
    assert not dependent_launch.for_tokens(torch.device("cpu"), 1)


def test_the_run_records_it_where_cuda_is(monkeypatch, switch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dependent_launch.state() is None
    assert env._launch_state("dependent_launch") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dependent_launch, "_capable", lambda index: True)
    switch("1")
    assert env._launch_state("dependent_launch") == "on"
    switch("0")
    assert env._launch_state("dependent_launch") == "off"


def test_environment_holds_the_fact() -> None:
    expected = None if not torch.cuda.is_available() else dependent_launch.state()
    assert env.collect_environment()["dependent_launch"] == expected


@pytest.mark.parametrize(
    ("fact", "with_it", "before_it"),
    [
        ("dependent launch", "h200-triton-v13", "h200-triton-v12"),
        ("fast launch", "h200-forward-v15", "h200-peers-v14"),  # moebench.fast_launch
    ],
)
def test_show_says_how_a_run_launched(
    fact: str, with_it: str, before_it: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A committed run that had the launch switch on says so; a run from before it was
    recorded says nothing of it."""
    from pathlib import Path

    from moebench.cli import main as cli_main

    reference = Path(__file__).parent.parent / "results" / "reference"
    assert cli_main(["show", str(reference / with_it)]) == 0
    assert f"{fact} on" in " ".join(capsys.readouterr().out.split())
    assert cli_main(["show", str(reference / before_it)]) == 0
    assert fact not in capsys.readouterr().out


# ------------------------------------------------- the contract, read from the source

PDL_MODULES = (
    "moebench.route_kernel",
    "moebench.logits_kernel",
    "moebench.impls.triton.align",
    "moebench.impls.triton.kernels",
    "moebench.impls.triton.backward",
)


def _launched(tree) -> set[str]:
    """The kernels a module launches, as `kernel[grid](...)` or through
    `moebench.fast_launch` as `launch(kernel, grid, ...)`."""
    import ast

    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name):
            names.add(node.func.value.id)
        callee = ast.unparse(node.func)
        if callee in ("launch", "fast_launch.launch") and isinstance(node.args[0], ast.Name):
            names.add(node.args[0].id)
    return names


def _contract_breaches(source: str) -> list[str]:
    """Where `source` breaks the module docstring's contract: a kernel (launched in it,
    `_launched`) with a PDL parameter whose first statement after its docstring is not
    `wait_for_predecessor(PDL)`, or a launch whose `launch_pdl=` is not the value it
    passes as `PDL=` (a kernel launched with PDL that does not wait)."""
    import ast

    tree = ast.parse(source)
    launched = _launched(tree)
    breaches = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.FunctionDef)
            and node.name in launched
            and "PDL" in [a.arg for a in node.args.args]
        ):
            body = node.body[1:] if ast.get_docstring(node) else node.body
            first = ast.unparse(body[0]) if body else ""
            if first != "wait_for_predecessor(PDL)":
                breaches.append(f"{node.name} starts with {first!r}")
        if isinstance(node, ast.Call):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if "launch_pdl" in keywords and keywords["launch_pdl"] != keywords.get("PDL"):
                breaches.append(f"line {node.lineno}: launch_pdl={keywords['launch_pdl']}")
    return breaches


@pytest.mark.parametrize("module", PDL_MODULES)
def test_each_kernel_waits_before_it_reads(module: str) -> None:
    import ast
    import importlib
    import inspect

    source = inspect.getsource(importlib.import_module(module))
    assert "launch_pdl=" in source
    assert _launched(ast.parse(source)), "no kernel launch found: the check would pass blind"
    assert _contract_breaches(source) == []


def test_the_contract_check_finds_a_kernel_that_reads_first() -> None:
    wrong = '''
def reads_first(x_ptr, PDL: tl.constexpr):
    """Reads its predecessor's output before waiting."""
    x = tl.load(x_ptr)
    wait_for_predecessor(PDL)

def reads_first_too(x_ptr, PDL: tl.constexpr):
    x = tl.load(x_ptr)
    wait_for_predecessor(PDL)

def launch_them(x):
    reads_first[(1,)](x, PDL=False, launch_pdl=True)
    launch(reads_first_too, (1,), x, PDL=True, launch_pdl=True)
'''
    assert _contract_breaches(wrong) == [
        "reads_first starts with 'x = tl.load(x_ptr)'",
        "reads_first_too starts with 'x = tl.load(x_ptr)'",
        "line 12: launch_pdl=True",
    ]
