"""The Router's top-k and the fused layer's alignment in one launch
(`moebench/impls/triton/route_align.py`): the same gates and experts as the Router's
top-k kernel, its probabilities to fp32 rounding, and the same padded rows as
`align_to_blocks`, on each
preset's router convention; which calls it serves; and the layer taking it only when
asked (`$MOEBENCH_ROUTE_ALIGN=1`), with the same output bits. In Triton's interpreter on
a CPU, and on a card."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the kernel is Triton's")

from moebench.impls.triton import route_align
from moebench.presets import PRESETS
from tests.conftest import KERNEL_DEVICE, needs_kernels

# Rows past the last token (the kernel routes 16 at a time) hold no logits: their
# softmax is NaN and never stored, but the interpreter's numpy says so.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _same_routing(got, want) -> None:
    """The same gates and experts bit for bit; the same probabilities to fp32's rounding
    of a sum over experts: one program of 8 warps adds a row's terms in another order
    than the Router's one-warp programs (4e-6 is about 32 units in the last place; a
    wrong token's or expert's probability is off by far more)."""
    (gates, ids, probs), (want_gates, want_ids, want_probs) = got, want
    assert torch.equal(gates, want_gates) and torch.equal(ids, want_ids)
    torch.testing.assert_close(probs, want_probs, rtol=4e-6, atol=0.0)


def _same_alignment(got, want, num_experts: int) -> None:
    """The same padded runs (ends, length, each block's expert) and the same assignments
    in each expert's run; the order inside a run comes from atomics, and no row's result
    depends on it."""
    assert int(got.num_padded_1) == int(want.num_padded_1)
    assert torch.equal(got.padded_ends_E, want.padded_ends_E)
    assert torch.equal(got.block_expert_B, want.block_expert_B)
    ends = [0, *want.padded_ends_E.tolist()]
    for e in range(num_experts):
        rows = slice(ends[e], ends[e + 1])
        assert torch.equal(
            got.sorted_ids_P[rows].sort().values, want.sorted_ids_P[rows].sort().values
        )
    assert torch.equal(got.sorted_ids_P[got.row_of_assign_A.long()], torch.arange(
        got.num_assign, dtype=torch.int32, device=got.sorted_ids_P.device
    ))  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("preset", ["olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v3", "mixtral-8x7b"])
@pytest.mark.parametrize("tokens", [2, 13, 64])
def test_one_launch_routes_and_aligns_as_the_two_kernels(preset, tokens):
    """Softmax with and without renormalisation, sigmoid with groups and a correction
    bias (DeepSeek-V3), tokens not a multiple of the kernel's rows."""
    from moebench.impls.triton.align import align_to_blocks
    from moebench.route_kernel import route_top_k

    shape = PRESETS[preset]
    E, dev = shape.num_experts, KERNEL_DEVICE
    generator = torch.Generator().manual_seed(tokens)
    parts = 3
    parts_TSE = torch.randn(tokens, parts * E, generator=generator).to(dev)
    bias_E = (torch.randn(E, generator=generator) / 10).to(dev)
    correction_E = (torch.randn(E, generator=generator) / 10).to(dev)
    block_m = 16
    with torch.no_grad():
        want = route_top_k(parts_TSE, parts, bias_E, shape, torch.float16, correction_E)
        got = route_align.route_and_align(
            parts_TSE, parts, bias_E, shape, torch.float16, correction_E, block_m, False
        )
    _same_routing(got[:3], want)
    _same_alignment(got[3], align_to_blocks(want[1], E, block_m), E)


def test_takes_calls_of_2_to_64_tokens_within_one_program():
    assert route_align.takes(2, 8, 64) and route_align.takes(64, 8, 256)
    assert not route_align.takes(1, 8, 64)  # one token: no alignment at all
    assert not route_align.takes(65, 2, 8)  # past the dependent-launch chain
    assert not route_align.takes(64, 8, 257)  # more experts than one program counts
    assert not route_align.takes(64, 17, 512)  # more assignments than one program aligns


@needs_kernels
def test_the_layer_takes_it_only_when_asked_with_the_same_bits(monkeypatch, tmp_path):
    """The same output and routing with the switch as without; the one launch taken only
    with it, at inference (not where a gradient is recorded)."""
    from moebench import routing
    from moebench.env import ROUTE_ALIGN_SWITCH
    from moebench.impls.triton import layer
    from tests.test_triton import _gpu_case, built_layer

    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    # on a CPU the Router routes with torch ops: here with its Triton kernel, as on a card
    for module in (layer, routing):
        monkeypatch.setattr(module, "kernel_route_applies", lambda shape, x: True)
    taken = []
    launch = route_align.route_and_align
    monkeypatch.setattr(route_align, "route_and_align", lambda *a: (taken.append(a), launch(*a))[1])
    dtype = "float16" if KERNEL_DEVICE == "cpu" else "bfloat16"
    case = _gpu_case((200, 128, 8, 2, 40), dtype, device=KERNEL_DEVICE)
    _, built, x_TD = built_layer(case)
    runs = {}
    for asked in (False, True):
        monkeypatch.setenv(ROUTE_ALIGN_SWITCH, "1" if asked else "0")
        with torch.no_grad():
            y_TD = built(x_TD)
        runs[asked] = (y_TD, *built._last)
        assert bool(taken) is asked
    (y_off, ids_off, probs_off), (y_on, ids_on, probs_on) = runs[False], runs[True]
    assert torch.equal(y_off, y_on) and torch.equal(ids_off, ids_on)
    torch.testing.assert_close(probs_on, probs_off, rtol=4e-6, atol=0.0)  # (_same_routing)
    taken.clear()
    built(x_TD)  # a gradient recorded: the Router's own kernels
    assert not taken


def check_it_compiles_for_hopper() -> None:
    """The body of `test_it_compiles_for_hopper` (in a process without Triton's
    interpreter): each preset's convention at 64 tokens, with the logits' 3 parts and
    dependent launch, compiled for sm_90 without spills."""
    from moebench import offline_compile

    with offline_compile.compiling_for() as record:
        for preset in ("olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v3", "mixtral-8x7b"):
            shape = PRESETS[preset]
            E = shape.num_experts
            meta = {"device": "meta", "dtype": torch.float32}
            route_align.route_and_align(
                torch.empty(64, 3 * E, **meta), 3, torch.empty(E, **meta), shape,
                torch.bfloat16, torch.empty(E, **meta), 16, True,
            )  # fmt: skip
    assert len(record) == 4, [r.describe() for r in record]
    for compiled in record:
        assert compiled.error is None, compiled.describe()
        assert compiled.stack_bytes == 0, compiled.describe()  # no spills


def test_it_compiles_for_hopper():
    from tests.conftest import in_a_fresh_process

    in_a_fresh_process("tests.test_route_align", "check_it_compiles_for_hopper()")
