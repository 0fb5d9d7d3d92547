"""The fused layer's read-ahead of gate|up weights into L2 (moebench/impls/triton/prefetch.py).

CPU: which experts are read ahead; with TRITON_INTERPRET=1 also the read kernel's XORs.
CUDA (skipped without a GPU): captured in a CUDA graph, the layer reads exactly its first
experts on a side stream and gives the output it gives un-graphed, without reading ahead.
"""

from __future__ import annotations

import numpy
import pytest
import torch

from moebench import registry
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs
from tests.test_triton import HAS_TRITON, KERNEL_DEVICE, _gpu_case, needs_cuda, needs_kernels


def _xor(words: torch.Tensor) -> int:
    """The XOR of int32 words, as the read kernel reduces what it read."""
    return int(numpy.bitwise_xor.reduce(words.cpu().numpy()))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize(
    ("tokens", "top_k", "num_experts", "expected"),
    [
        (64, 8, 64, 3),  # 8 rows per expert: 3 experts of 8 MB fit 24 MB
        (64, 8, 128, 3),  # 4 rows per expert: the threshold itself
        (64, 8, 256, 0),  # 2 rows per expert: some experts are likely untouched
        (1, 8, 128, 0),  # decode: which experts is known only after routing
        (8192, 8, 2, 2),  # never more experts than there are
    ],
)
def test_experts_to_prefetch_follows_rows_per_expert(tokens, top_k, num_experts, expected):
    from moebench.impls.triton.prefetch import experts_to_prefetch

    expert_bytes = 8 * 1024 * 1024
    budget = 24 * 1024 * 1024 + 1
    assert experts_to_prefetch(tokens, top_k, num_experts, expert_bytes, budget) == expected
    assert experts_to_prefetch(tokens, top_k, num_experts, expert_bytes, 0) == 0


@needs_kernels
@pytest.mark.parametrize(("num_words", "programs"), [(1000, 3), (4096, 4), (37, 5)])
def test_prefetch_kernel_reads_the_first_words_once(num_words, programs):
    """Every one of the first num_words words is read once, by the program whose blocks
    cover it, and no word after them: the XOR of the programs' XORs is theirs alone."""
    from moebench.impls.triton.prefetch import l2_prefetch_kernel

    generator = torch.Generator().manual_seed(num_words)
    words = torch.randint(-(2**31), 2**31 - 1, (num_words + 100,), generator=generator)
    words = words.to(torch.int32).to(KERNEL_DEVICE)
    xors = torch.zeros(programs, dtype=torch.int32, device=KERNEL_DEVICE)
    l2_prefetch_kernel[(programs,)](words, xors, num_words, WORDS=64)
    assert _xor(xors) == _xor(words[:num_words])


@needs_cuda
@pytest.mark.parametrize("tokens", [64, 1])
def test_graphed_layer_reads_its_first_experts_ahead_without_changing_the_output(tokens):
    """64 tokens on 8 experts (16 rows each): captured in a CUDA graph, the forward reads
    the first experts' gate|up on its side stream (rejoined inside the capture) and gives
    the un-graphed output bit for bit; un-graphed, and at one token, it reads nothing
    ahead."""
    case = _gpu_case((256, 512, 8, 2, tokens), "bfloat16")
    weights = make_weights(case)
    layer = registry.get("triton").build(weights, case)
    x_TD = make_inputs(case, 1)[0]
    layer.l2_prefetch_bytes = 3 * layer.w_gate_up_E2FD[0].numel() * 2
    with torch.no_grad():
        plain_TD = layer(x_TD)  # tunes (outside the capture) and warms up
        assert layer._prefetch is None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_TD = layer(x_TD)
        out_TD.fill_(float("nan"))
        if layer._prefetch is not None:
            layer._prefetch.xors.zero_()
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out_TD, plain_TD, rtol=0, atol=0)
    if tokens == 1:
        assert layer._prefetch is None
        return
    first_words = layer.w_gate_up_E2FD[:3].reshape(-1).view(torch.int32)
    assert _xor(layer._prefetch.xors) == _xor(first_words)
