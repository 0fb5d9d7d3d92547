"""The cached Triton launch path (moebench/triton_launch.py), on CPU with a stand-in
kernel: which calls reuse a compiled kernel, with which arguments, and which go through
Triton's own path every time. On CUDA every Triton test runs through it."""

from __future__ import annotations

import pytest
import torch

from moebench import triton_launch


class FakeCompiled:
    """What Triton's path returns: a compiled kernel, launched by grid."""

    packed_metadata = object()

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *values: self.calls.append(("fast", grid, values))


class FakeKernel:
    """A @triton.jit kernel's interface: arg_names, and kernel[grid](*args, **meta)."""

    arg_names = ("x_ptr", "n", "BLOCK", "EVEN")

    def __init__(self) -> None:
        self.calls: list = []
        self.compiles = 0

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("triton", grid, args, meta))
            self.compiles += 1
            return FakeCompiled(self.calls)

        return run


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return FakeKernel()


def test_second_launch_of_a_specialisation_skips_binding(kernel):
    x = torch.zeros(64)
    launcher = triton_launch.Launcher(kernel)
    launcher[(4,)](x, 32, BLOCK=16, EVEN=True, num_warps=4)
    launcher[(8, 2)](x, 48, BLOCK=16, EVEN=True, num_warps=4)  # same spec: 48 % 16 == 0
    assert [c[0] for c in kernel.calls] == ["triton", "fast"]
    # the compiled kernel gets every parameter in signature order, the grid as 3 dims
    assert kernel.calls[1][1] == (8, 2, 1)
    assert kernel.calls[1][2][1:] == (48, 16, True)
    assert kernel.calls[1][2][0] is x


@pytest.mark.parametrize(
    "second",
    [
        dict(n=33),  # no longer divisible by 16
        dict(n=1),  # Triton specialises 1
        dict(n=2**40),  # a 64-bit int
        dict(x=torch.zeros(64)[1:]),  # an address not 16-byte aligned
        dict(x=torch.zeros(64, dtype=torch.float64)),  # another dtype
        dict(BLOCK=32),  # another constexpr
        dict(num_warps=8),  # another launch option
    ],
)
def test_a_new_specialisation_goes_through_triton(kernel, second):
    first = dict(x=torch.zeros(64), n=32, BLOCK=16, num_warps=4)
    launcher = triton_launch.Launcher(kernel)
    for call in (first, {**first, **second}):
        launcher[(4,)](call["x"], call["n"], BLOCK=call["BLOCK"], EVEN=True,
                       num_warps=call["num_warps"])  # fmt: skip
    assert [c[0] for c in kernel.calls] == ["triton", "triton"]


def test_calls_it_cannot_key_always_take_triton_path(kernel):
    launcher = triton_launch.Launcher(kernel)
    for _ in range(2):  # a tensor passed by keyword, an argument of another type
        launcher[(1,)](torch.zeros(4), 4, BLOCK=torch.zeros(1), EVEN=True)
        launcher[(1,)](torch.zeros(4), "4", BLOCK=16, EVEN=True)
    for _ in range(2):  # a parameter left to its default: never cached
        launcher[(1,)](torch.zeros(4), 4, BLOCK=16)
    assert [c[0] for c in kernel.calls] == ["triton"] * 6


def test_launcher_is_the_kernel_itself_when_off(monkeypatch):
    monkeypatch.setattr(triton_launch, "_ENABLED", False)
    off = FakeKernel()
    assert triton_launch.launcher(off) is off
    monkeypatch.setattr(triton_launch, "_ENABLED", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = FakeKernel()
    assert triton_launch.launcher(interpreted) is interpreted
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_launch.launcher(interpreted) is interpreted  # decided once per kernel
    on = FakeKernel()
    assert isinstance(triton_launch.launcher(on), triton_launch.Launcher)
    assert triton_launch.launcher(on) is triton_launch.launcher(on)
