"""Programmatic dependent launch (`moebench.dependent_launch`): where it is on, its
switch, and the run's record of it. On the GPU: tests/test_triton.py
(`test_dependent_launch_keeps_every_bit`)."""

from __future__ import annotations

import pytest
import torch

from moebench import env

pytest.importorskip("triton", reason="the module's kernels helpers need triton")

from moebench import dependent_launch


def test_off_on_the_cpu() -> None:
    assert not dependent_launch.enabled(torch.device("cpu"))


@pytest.mark.parametrize("value", ["0", "off", "False", " no "])
def test_switched_off_by_the_environment(monkeypatch, value: str) -> None:
    monkeypatch.setenv(dependent_launch.ENV_SWITCH, value)
    assert dependent_launch.switched_off()
    monkeypatch.setattr(dependent_launch, "_capable", lambda index: True)
    assert not dependent_launch.enabled(torch.device("cuda", 0))


@pytest.mark.parametrize("value", ["", "1", "on"])
def test_on_where_the_card_can(monkeypatch, value: str) -> None:
    monkeypatch.setenv(dependent_launch.ENV_SWITCH, value)
    monkeypatch.setattr(dependent_launch, "_capable", lambda index: True)
    assert dependent_launch.enabled(torch.device("cuda", 0))
    monkeypatch.setattr(dependent_launch, "_capable", lambda index: False)  # before Hopper
    assert not dependent_launch.enabled(torch.device("cuda", 0))


def test_calls_of_a_few_tokens_take_it(monkeypatch) -> None:
    monkeypatch.setattr(dependent_launch, "_capable", lambda index: True)
    cuda = torch.device("cuda", 0)
    limit = dependent_launch.MAX_TOKENS
    assert dependent_launch.for_tokens(cuda, 1) and dependent_launch.for_tokens(cuda, limit)
    assert not dependent_launch.for_tokens(cuda, limit + 1)
    assert not dependent_launch.for_tokens(torch.device("cpu"), 1)


def test_the_run_records_it_where_cuda_is(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dependent_launch.state() is None
    assert env._dependent_launch() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dependent_launch, "_capable", lambda index: True)
    assert env._dependent_launch() == "on"
    monkeypatch.setenv(dependent_launch.ENV_SWITCH, "0")
    assert env._dependent_launch() == "off"


def test_environment_holds_the_fact() -> None:
    expected = None if not torch.cuda.is_available() else dependent_launch.state()
    assert env.collect_environment()["dependent_launch"] == expected
