"""Reading the first experts' gate|up weights into L2 while the router runs.

Shape legend: E routed experts, F expert width, D hidden, T tokens, K top_k.

Before gate_up can start, the layer runs the router and the alignment: about 15 us of
small kernels at 64 tokens on an H200 (NOTES.md, version 9), during which the GPU's
memory bandwidth idles. Where (nearly) every expert is touched, which experts gate_up will
read is known before routing: all of them, expert 0 first (its row blocks come first in
the sorted list, and programs run in that order). So a kernel on a side stream reads the
first experts' gate|up weights while the router runs, and gate_up finds them in L2. Each
weight byte is still read from memory once.

Only for inference captured in a CUDA graph (un-graphed, and in a training step, the host
bounds these token counts: the GPU idles between launches anyway), and only where each
expert sees `MIN_ROWS_PER_EXPERT` rows on average: there an expert is untouched with
probability about exp(-4), 2%, and a needless read of one expert costs a few
microseconds at most.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows per expert on average from which every expert is taken to be touched.
MIN_ROWS_PER_EXPERT = 4
# How many bytes of weights to read ahead. The H200's L2 is 50 MB, in two halves; the
# router's and alignment's own traffic is small.
BUDGET_BYTES = 24 * 1024 * 1024
WORDS_PER_BLOCK = 8192  # int32 words a program reads per step: 32 KB
WARPS = 8


@triton.jit
def l2_prefetch_kernel(words_ptr, xors_ptr, num_words, WORDS: tl.constexpr):
    """Read num_words int32 words from words_ptr, program p taking blocks p, p + P, ...
    (so the first bytes are read first) with an evict-last hint, and store the XOR of
    what it read to xors_ptr[p]: a result the compiler must compute, and one a test can
    check."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    acc = tl.zeros((WORDS,), dtype=tl.int32)
    for start in range(pid * WORDS, num_words, programs * WORDS):
        offs = start + tl.arange(0, WORDS)
        acc ^= tl.load(
            words_ptr + offs, mask=offs < num_words, other=0, eviction_policy="evict_last"
        )
    tl.store(xors_ptr + pid, tl.xor_sum(acc, axis=0))


def experts_to_prefetch(
    tokens: int, top_k: int, num_experts: int, expert_bytes: int, budget_bytes: int
) -> int:
    """How many experts' gate|up weights (expert_bytes each) to read ahead: as many whole
    experts as fit in budget_bytes, where each expert sees MIN_ROWS_PER_EXPERT rows or
    more on average, else none."""
    if tokens * top_k < MIN_ROWS_PER_EXPERT * num_experts or expert_bytes <= 0:
        return 0
    return min(num_experts, budget_bytes // expert_bytes)


class L2Prefetch:
    """Reads the first experts of an E x 2F x D gate|up tensor into L2 on a side stream:
    `start()` before the router, `join()` once the layer's kernels are launched."""

    def __init__(self, w_gate_up_E2FD: torch.Tensor):
        self.device = w_gate_up_E2FD.device
        self.side = torch.cuda.Stream(self.device)
        self.programs = 2 * torch.cuda.get_device_properties(self.device).multi_processor_count
        self.xors = torch.empty(self.programs, dtype=torch.int32, device=self.device)

    def start(self, w_gate_up_E2FD: torch.Tensor, num_experts: int) -> bool:
        """Launch the read of the first `num_experts` experts on the side stream (after
        what the current stream has queued); False if there is nothing to read."""
        if num_experts <= 0 or not w_gate_up_E2FD.is_contiguous():
            return False
        words = w_gate_up_E2FD[:num_experts].view(-1).view(torch.int32)
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            l2_prefetch_kernel[(self.programs,)](
                words, self.xors, words.numel(), WORDS=WORDS_PER_BLOCK, num_warps=WARPS
            )
        return True

    def join(self) -> None:
        """The current stream waits for the read (a CUDA graph's capture must end with
        its side streams joined; by then the read has long finished)."""
        torch.cuda.current_stream(self.device).wait_stream(self.side)
