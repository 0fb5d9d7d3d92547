"""`moebench.fast_launch`: its switch and record (`moebench show`'s line is tested in
tests/test_dependent_launch.py), a plain launch under Triton's interpreter, and on CUDA
that a launch past the JIT's dispatch takes the kernel compiled for exactly its
arguments' specialisation (a pointer's alignment, an integer equal to 1 or divisible by
16), through the compiled kernel's C launcher unless a launch hook is set, under a CUDA
graph too, and that the fused layer gives the same bits with it as without (forward and
a training step's input gradient)."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton", reason="moebench.fast_launch launches Triton kernels")

import triton
import triton.language as tl

from moebench import env, fast_launch, registry
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs
from tests.conftest import KERNEL_DEVICE, needs_kernels

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@triton.jit
def _scaled_copy_kernel(src_ptr, dst_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    values = tl.load(src_ptr + offs, mask=mask, other=0.0)
    tl.store(dst_ptr + offs, values * scale, mask=mask)


@triton.jit
def _tile_copy_kernel(src_desc, dst_ptr, BLOCK: tl.constexpr):
    """The BLOCK x BLOCK tile at (0, 0) of a TMA descriptor, copied to dst."""
    offs = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs[:, None] * BLOCK + offs[None, :], src_desc.load([0, 0]))


@pytest.fixture
def switch(launch_switch):
    """Sets `$MOEBENCH_FAST_LAUNCH` for the test (`launch_switch`)."""
    return lambda value: launch_switch(fast_launch, value)


@pytest.mark.parametrize("value", ["0", "off", "False", " no "])
def test_switched_off_by_the_environment(switch, value: str) -> None:
    switch(value)
    assert fast_launch.switched_off()


@pytest.mark.parametrize("value", ["", "1", "on"])
def test_on_by_default(switch, value: str) -> None:
    switch(value)
    assert not fast_launch.switched_off()


def test_the_run_records_it_where_cuda_is(monkeypatch, switch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fast_launch.state() is None
    assert env._launch_state("fast_launch") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    switch("1")
    assert env._launch_state("fast_launch") == "on"
    switch("0")
    assert env._launch_state("fast_launch") == "off"


def test_host_profile_takes_turns_with_the_switch(monkeypatch, switch) -> None:
    """`scripts/host_profile.py --ab fast-launch` times each call with the switch as read
    by this module (not only set in the environment), both sides alike, and leaves the
    environment as it found it."""
    import os
    import runpy
    from pathlib import Path

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    switch("")  # unset: on
    monkeypatch.delenv(fast_launch.ENV_SWITCH)
    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "host_profile.py"))
    seen: list[tuple[str | None, bool]] = []

    def call() -> None:
        seen.append((os.environ.get(fast_launch.ENV_SWITCH), fast_launch._off))

    text = script["switch_turns"](call, calls=3, switch="fast-launch", rounds=4)
    assert text.startswith("fast-launch off ") and " on " in text
    assert sorted(set(seen)) == [("0", True), ("1", False)]
    assert seen.count(("0", True)) == seen.count(("1", False))
    assert fast_launch.ENV_SWITCH not in os.environ and not fast_launch._off


def _copy(src: torch.Tensor, dst: torch.Tensor, n: int, scale: float = 2.0) -> None:
    fast_launch.launch(_scaled_copy_kernel, (triton.cdiv(n, 32),), src, dst, n, scale, BLOCK=32)


@needs_kernels
def test_a_launch_computes_what_the_kernel_does() -> None:
    """On CUDA through the fast path, under the interpreter (TRITON_INTERPRET=1) plainly."""
    src = torch.arange(40, dtype=torch.float32, device=KERNEL_DEVICE)
    dst = torch.zeros_like(src)
    for _ in range(2):  # the first launch through the JIT, the second past it on CUDA
        _copy(src, dst, 40)
        torch.testing.assert_close(dst, src * 2)
    if KERNEL_DEVICE == "cpu":  # the interpreter's kernels launch plainly
        assert fast_launch._launchers[id(_scaled_copy_kernel)].plain


@pytest.mark.parametrize("kernel", ["_scaled_copy_kernel", "_fill_kernel"])
def test_the_key_is_the_binders_specialisation(kernel: str) -> None:
    """What a launch is keyed by equals what Triton's own binder specialises (on CPU:
    Hopper's backend, no device needed): a tensor's dtype and 16-byte alignment, an
    integer's divisibility by 16 or its being 1, a float, a bool; a constexpr passed by
    position by its value. With all positional arguments before the first constexpr
    (`_scaled_copy_kernel`) the key is made in one `map`, else argument by argument."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = globals()[kernel]
    jit = JITFunction(getattr(fn, "fn", fn))  # a JIT function under the interpreter too
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    launcher = fast_launch._Launcher(jit, ())
    assert not launcher.plain
    buffer = torch.arange(80, dtype=torch.float16)
    for tensor in (buffer, buffer[1:], buffer[8:], buffer.float()):
        for n in (1, 16, 17, 48):
            for scalar in (2.0, True):
                if kernel == "_scaled_copy_kernel":
                    args = (tensor, tensor, n, scalar)
                    kwargs = {"BLOCK": 32}
                else:
                    args = (tensor, n, scalar, 32)  # BLOCK by position
                    kwargs = {}
                _, expected, _ = binder(*args, **kwargs)
                got = launcher.specialisations(backend, args)
                as_binder = [
                    ("constexpr", value) if constexpr else value
                    for value, constexpr in zip(got, launcher.constexprs)
                ]
                assert as_binder == list(expected[: len(args)])


def test_a_tensor_descriptor_is_keyed_as_the_binder_keys_it() -> None:
    """A host-side TMA descriptor's key is the binder's (dtype and block shape), and a
    kernel launched with one takes the fast path where Triton's launcher expands it."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    from triton.tools.tensor_descriptor import TensorDescriptor

    fn = _tile_copy_kernel
    jit = JITFunction(getattr(fn, "fn", fn))
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    for dtype, block in ((torch.float16, 16), (torch.bfloat16, 16), (torch.float16, 32)):
        source = torch.zeros(64, 64, dtype=dtype)
        args = (TensorDescriptor.from_tensor(source, [block, block]), source)
        _, expected, _ = binder(*args, BLOCK=block)
        launcher = fast_launch._Launcher(jit, args)
        assert not launcher.plain
        assert list(launcher.specialisations(backend, args)) == list(expected[:2])


def test_a_descriptor_first_seen_later_takes_the_jit_where_the_launcher_cannot_expand_it(
    monkeypatch,
) -> None:
    """A kernel first launched without a descriptor (a pointer, or None where the weight
    gradients' plain tiles leave their descriptor out) and later with one: where Triton's
    launcher does not expand descriptors, that launch and every later one go through the
    JIT (the C launcher would be handed a Python object); where it does, the fast path
    stays."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction
    from triton.tools.tensor_descriptor import TensorDescriptor

    if fast_launch._native_specialize_impl() is None:
        pytest.skip("this Triton has no native specialisation: every launch is plain")
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    source = torch.zeros(64, 64, dtype=torch.float16)
    descriptor_args = (TensorDescriptor.from_tensor(source, [16, 16]), source)
    monkeypatch.setattr(fast_launch, "_current_device", lambda: 0)
    for expands in (False, True):
        monkeypatch.setattr(fast_launch, "_launcher_expands_descriptors", lambda e=expands: e)
        jit = JITFunction(getattr(_tile_copy_kernel, "fn", _tile_copy_kernel))
        launcher = fast_launch._Launcher(jit, (source, source))  # no descriptor yet
        assert not launcher.plain
        launched = []
        launcher.kernel = _FakeKernel(backend, launched)
        launcher((1,), descriptor_args, {"BLOCK": 16})
        assert launched == [(1,)]  # the first launch of a specialisation: the JIT's
        assert launcher.plain is not expands


class _FakeKernel:
    """A JIT function's face to `_Launcher`: its device caches' backend, and `[grid]`
    recording the launch (nothing compiles on a CPU)."""

    def __init__(self, backend, launched: list):
        self.device_caches = {0: (None, None, None, backend)}
        self._launched = launched

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launched.append(grid)


def _jit_compiled() -> int:
    """How many kernels the JIT has compiled of `_scaled_copy_kernel` on this device."""
    return len(_scaled_copy_kernel.device_caches[torch.cuda.current_device()][0])


@contextlib.contextmanager
def _jit_forbidden(kernel=_scaled_copy_kernel):
    """`kernel`'s JIT dispatch (its `run`) fails inside."""
    kernel.run = _fails
    try:
        yield
    finally:
        del kernel.run


def _fails(*args, **kwargs):
    raise AssertionError("the JIT's dispatch ran where the fast path should have")


@needs_cuda
def test_each_specialisation_gets_the_kernel_compiled_for_it(switch) -> None:
    """A repeat of the same arguments' specialisation skips the JIT (`_jit_forbidden`);
    a pointer off 16-byte alignment, a count of 1, one not divisible by 16 each compile
    and keep their own kernel, and each computes right."""
    switch("1")
    buffer = torch.arange(80, dtype=torch.float16, device="cuda")

    def launch_and_check(src: torch.Tensor, n: int, new_kernel: bool, scale: float) -> None:
        dst = torch.full((80,), -1.0, dtype=torch.float16, device="cuda")
        before = _jit_compiled()
        with contextlib.nullcontext() if new_kernel else _jit_forbidden():
            _copy(src, dst, n, scale)
        torch.testing.assert_close(dst[:n], src[:n] * scale)
        assert (dst[n:] == -1).all()
        assert _jit_compiled() == before + int(new_kernel)
        kept = fast_launch._launchers[id(_scaled_copy_kernel)].compiled
        assert len(kept) == _jit_compiled()  # one entry per kernel the JIT compiled

    aligned = buffer[:64]
    launch_and_check(aligned, 48, new_kernel=True, scale=2.0)
    launch_and_check(aligned, 48, new_kernel=False, scale=3.0)  # a float is not specialised
    launch_and_check(buffer[16:], 32, new_kernel=False, scale=2.0)  # 32 bytes on: aligned
    launch_and_check(buffer[1:], 48, new_kernel=True, scale=2.0)  # 2 bytes off
    launch_and_check(buffer[1:], 48, new_kernel=False, scale=2.0)
    launch_and_check(aligned, 1, new_kernel=True, scale=2.0)  # 1: a constant
    launch_and_check(aligned, 17, new_kernel=True, scale=2.0)  # not divisible by 16
    launch_and_check(aligned, 33, new_kernel=False, scale=2.0)


@contextlib.contextmanager
def _compiled_kernel_forbidden():
    """`CompiledKernel[grid]` (Triton's Python launch path) fails inside."""
    from triton.compiler.compiler import CompiledKernel

    getitem = CompiledKernel.__getitem__
    CompiledKernel.__getitem__ = _fails
    try:
        yield
    finally:
        CompiledKernel.__getitem__ = getitem


@needs_cuda
def test_a_repeat_goes_to_the_c_launcher_unless_a_hook_is_set(switch) -> None:
    """Without launch hooks a repeat launch skips `CompiledKernel[grid]` too; with one
    set (Proton, say) it runs through it, and the hook sees the launch."""
    from triton import knobs

    switch("1")
    src = torch.arange(64, dtype=torch.float32, device="cuda")
    dst = torch.zeros_like(src)
    _copy(src, dst, 64)  # compiled, and kept by the fast path
    with _jit_forbidden(), _compiled_kernel_forbidden():
        _copy(src, dst, 64, 3.0)
    torch.testing.assert_close(dst, src * 3)
    seen = []

    def hook(metadata) -> None:
        seen.append(metadata.get()["name"])

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        with _jit_forbidden():
            _copy(src, dst, 64, 5.0)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert seen == ["_scaled_copy_kernel"]
    torch.testing.assert_close(dst, src * 5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a GPU with TMA (Hopper or later)",
)
def test_a_descriptor_launch_reads_the_descriptor_it_is_given(switch) -> None:
    """A repeat launch of a TMA kernel skips the JIT and `CompiledKernel[grid]`, and reads
    through the new call's descriptor (another tensor, another base), not the first's."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    switch("1")
    first, second = (torch.randn(32, 32, device="cuda").half() + offset for offset in (0.0, 100.0))
    for source, repeat in ((first, False), (second, True), (first, True)):
        out = torch.zeros(16, 16, device="cuda", dtype=torch.float16)
        descriptor = TensorDescriptor.from_tensor(source, [16, 16])
        with contextlib.ExitStack() as stack:
            if repeat:  # past the JIT and `CompiledKernel[grid]`: the C launcher itself
                stack.enter_context(_jit_forbidden(_tile_copy_kernel))
                stack.enter_context(_compiled_kernel_forbidden())
            fast_launch.launch(_tile_copy_kernel, (1,), descriptor, out, BLOCK=16)
        torch.testing.assert_close(out, source[:16, :16], rtol=0, atol=0)
    assert len(fast_launch._launchers[id(_tile_copy_kernel)].compiled) == 1


@triton.jit
def _fill_kernel(dst_ptr, n, value, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.full((BLOCK,), value, tl.float32), mask=offs < n)


@needs_cuda
def test_a_constexpr_passed_by_position(switch) -> None:
    """A constexpr among the positional arguments is keyed by its value: another value
    is another kernel, not the one compiled for the first."""
    switch("1")
    dst = torch.zeros(64, dtype=torch.float32, device="cuda")
    for block, value in ((16, 1.0), (16, 2.0), (64, 3.0), (64, 4.0), (16, 5.0)):
        fast_launch.launch(_fill_kernel, (triton.cdiv(40, block),), dst, 40, value, block)
        assert (dst[:40] == value).all() and (dst[40:] == 0).all()
    assert len(fast_launch._launchers[id(_fill_kernel)].compiled) == 2


@needs_cuda
def test_switched_off_it_launches_through_the_jit(monkeypatch, switch) -> None:
    src = torch.arange(64, dtype=torch.float32, device="cuda")
    dst = torch.zeros_like(src)
    switch("1")
    _copy(src, dst, 64)  # known to the fast path from here on
    switch("0")
    calls = []
    jit_run = _scaled_copy_kernel.run
    monkeypatch.setattr(
        _scaled_copy_kernel, "run", lambda *a, **k: calls.append(1) or jit_run(*a, **k)
    )
    _copy(src, dst, 64, 5.0)
    assert calls == [1]
    torch.testing.assert_close(dst, src * 5)


@needs_cuda
def test_a_cuda_graph_replays_a_fast_launch(switch) -> None:
    switch("1")
    src = torch.arange(64, dtype=torch.float32, device="cuda")
    dst = torch.zeros_like(src)
    _copy(src, dst, 64)  # compiled, and kept by the fast path
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _copy(src, dst, 64, 4.0)
    dst.zero_()
    graph.replay()
    torch.testing.assert_close(dst, src * 4)


@needs_cuda
@pytest.mark.parametrize(
    "shape",
    [
        (256, 512, 8, 2, 1),  # the one-token chain: few-token logits, no alignment
        (256, 512, 8, 2, 64),  # the one-program alignment
        (128, 256, 64, 32, 64),  # the three alignment kernels (2048 assignments)
    ],
)
def test_the_fused_layer_keeps_every_bit(shape, switch, monkeypatch) -> None:
    """The fused layer with every kernel launched past the JIT gives the bits it gives
    launched through it: a forward, and a training step's output and input gradient."""
    from moebench import route_kernel
    from moebench.impls.triton import kernels
    from tests.test_triton import _gpu_case

    case = _gpu_case(shape, "bfloat16")
    weights = make_weights(case)
    x_TD = make_inputs(case, 1)[0]
    grad_y_TD = torch.randn_like(x_TD)

    def run(value: str) -> list[torch.Tensor]:
        switch(value)
        layer = registry.get("triton").build(weights, case)
        with torch.inference_mode():
            forwards = [layer(x_TD) for _ in range(3)]  # the JIT's launch, then past it
        x = x_TD.detach().clone().requires_grad_(True)
        outputs = []
        for _ in range(2):
            x.grad = None
            y = layer(x)
            y.backward(grad_y_TD)
            outputs += [y.detach(), x.grad.clone()]
        return forwards + outputs

    plain = run("0")
    monkeypatch.setattr(fast_launch, "_launchers", {})
    fast = run("1")
    for kernel in (kernels.gate_up_kernel, kernels.down_kernel, route_kernel.route_top_k_kernel):
        assert fast_launch._launchers[id(kernel)].compiled, "launched through the JIT only"
    for a, b in zip(plain, fast, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_host_profile_says_which_side_set_a_calls_time(monkeypatch) -> None:
    """A call whose device work outlasts its queueing is GPU-bound, one the device keeps
    up with host-bound; presets timed in turns each get their median, in both orders."""
    import runpy
    import time
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "host_profile.py"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    host_bound = script["describe_call"]("layer", lambda: time.sleep(0.001), 5)
    assert host_bound.endswith(": host-bound)")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: time.sleep(0.02))
    text = script["describe_call"]("layer", lambda: time.sleep(0.0001), 20)
    assert text.startswith("layer ") and text.endswith(": GPU-bound)")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    text = script["preset_turns"](calls, calls=2, rounds=2)
    assert text.startswith("in turns (2 rounds): a ") and ", b " in text
    # each round: 5 warm-up calls and 2 timed per preset; the second round b first
    assert order == ["a"] * 7 + ["b"] * 7 + ["b"] * 7 + ["a"] * 7
