"""The forward's down GEMM at decode (row blocks of at most 32 rows, 2 to 64 tokens) as a
few programs an SM walking tiles: raced beside `kernels.py`'s down tiles where
`$MOEBENCH_DECODE_PERSISTENT=1` (`layer.races_decode_persistent`; off until a card has
timed it), built in version 33 without a card (triton/NOTES.md).

Shape legend as in `kernels.py`. Why: at 64 tokens the layer is its weight read, and
its down GEMM reads slower than its gate_up. In version 33's H200 tuning of OLMoE-1B-7B
at 64 tokens, gate_up read its 537 MB at 4.21 TB/s and down its 268 MB at 3.88 (69.1 us,
where gate_up's rate gives 63.7: about 5 us of a 206 us call that is 1.08x its floor, the
target 1.05x); on an H100 (version 32's ncu) 2.97 against 2.86 TB/s. Down's K is the
expert width, 1024 there (768 on Qwen3-30B-A3B): 8 steps of 128 a tile against gate_up's
16, so each tile's pipeline fill (the first num_stages - 1 weight loads, issued before
any product) and its epilogue are twice the share of its time; and its launch holds a
program for each of `max_blocks` x D / BLOCK_N tiles, a bound on the host, of which a
third exit at once at 64 tokens. Here a program walks every num_programs-th tile of the
padded length the device wrote, in one loop nest that Triton flattens and pipelines, so
a tile's first weight loads are in flight during the previous tile's epilogue
(`tma.down_persistent_kernel` does so at 64 and 128 rows, where the TMA tiles race).

Each tile's K steps are `kernels._down_tile`'s (same BLOCK_K, same order) and its
epilogue the same product, so the results are the same bits. The K loop is written out
again rather than shared: a helper taken out of `kernels._down_tile` would change
`kernels.down_kernel`'s cache key, and with it every shipped choice of the down GEMM
(tests/test_shipped_tuning.py), which only a card can tune again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebench.dependent_launch import release_dependents, wait_for_predecessor
from moebench.fast_launch import ceil_div, launch
from moebench.impls.triton import tma
from moebench.impls.triton.kernels import _block_coords, _row_list
from moebench.impls.triton.tma import _weighted_scatter

# (BLOCK_N, BLOCK_K, warps, stages): the decode down tiles that won or came within 3% in
# version 33's H200 tunings (OLMoE-1B-7B at 64 tokens: 64 x 128 on 4 stages and 128 x 128
# on 3, 69.1 us; 64 x 256 and 128 x 64, 70.9), and 64 x 128 on 6 stages: a persistent
# program's pipeline spans its tiles, so it may keep more loads in flight.
TILES = ((64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (128, 64, 4, 5), (64, 128, 4, 6))
# Programs an SM: one keeps its pipeline's 3 to 5 weight tiles in flight (48-80 KB at 64 x
# 128), two keep twice that where both fit in shared memory (`shared_bytes`).
PROGRAMS_PER_SM = (1, 2)
# An H100's or H200's shared memory an SM, and what each resident block takes of it
SM_SHARED_BYTES, BLOCK_RESERVED_BYTES = 233472, 1024


def shared_bytes(block_m: int, tile: tuple[int, int, int, int], element_bytes: int) -> int:
    """A program's shared memory as Triton 3.6 compiled it for sm_90 (tests check the
    bound): num_stages - 1 buffers of an h tile and a weight tile, and 2 KB beside."""
    block_n, block_k, _, stages = tile
    return (stages - 1) * (block_m * block_k + block_k * block_n) * element_bytes + 2048


@triton.jit
def down_decode_persistent_kernel(
    h_ptr, w_down_ptr, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_padded_ptr, D, F, num_assign, stride_h_p, stride_w_e, stride_w_f, stride_w_d,
    stride_out_a, num_programs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """`kernels.down_kernel`'s forward (SCATTER) tiles, a program walking every
    num_programs-th tile of the padded length's in one flattened loop nest."""
    wait_for_predecessor(PDL)
    # The next kernel (the sum over slots) waits for this grid's end in its own
    # `wait_for_predecessor`; letting it launch now puts its launch under this grid.
    release_dependents(PDL)
    num_blocks_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = tl.cdiv(D, BLOCK_N)
    k_steps = tl.cdiv(F, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    # the epilogue's own tile counter: its coordinates do not wait on the next tile's
    epilogue_tile = tl.program_id(0) - num_programs
    for tile in tl.range(tl.program_id(0), num_blocks_m * num_blocks_n, num_programs, flatten=True):
        pid_m, pid_n = _block_coords(tile, num_blocks_m, num_blocks_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n_wrapped = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % D
        a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_h_p + offs_k[None, :]
        w_ptrs = (
            w_down_ptr
            + expert * stride_w_e
            + offs_k[:, None] * stride_w_f
            + offs_n_wrapped[None, :] * stride_w_d
        )
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, k_steps):
            k_left = F - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_w_f
        epilogue_tile += num_programs
        pid_m, pid_n = _block_coords(epilogue_tile, num_blocks_m, num_blocks_n, GROUP_M)
        _weighted_scatter(
            acc, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign, stride_out_a, pid_m,
            pid_n, BLOCK_M, BLOCK_M, BLOCK_N,
        )  # fmt: skip


KERNELS = (down_decode_persistent_kernel,)


def candidates(block_m: int, D: int, F: int, element_bytes: int) -> list[dict]:
    """The configs (`"PERSISTENT": True` without `"TMA"`, and `"PROGRAMS_PER_SM"`) the
    tuner races for the down GEMM at `block_m` beside `tuning.candidates`': each tile of
    TILES at each count of PROGRAMS_PER_SM whose programs fit an SM's shared memory
    together (`shared_bytes`), at decode's blocks (at most 32 rows; none above, where the
    TMA tiles' persistent kernel races), for hidden D and expert width F that are
    multiples of 16. (At D = 264, whose weight rows Triton cannot take as 16-byte
    aligned, the flattened loop compiled for sm_90 with 32 registers and 2.9 KB of
    spills, where `kernels.down_kernel` takes 255 registers and none.)"""
    if block_m > 32 or D % 16 or F % 16:
        return []
    return [
        {"BLOCK_M": block_m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "num_warps": warps,
         "num_stages": stages, "PERSISTENT": True, "PROGRAMS_PER_SM": programs}
        for n, k, warps, stages in TILES
        for programs in PROGRAMS_PER_SM
        if programs * (shared_bytes(block_m, (n, k, warps, stages), element_bytes)
                       + BLOCK_RESERVED_BYTES) <= SM_SHARED_BYTES
    ]  # fmt: skip


def launch_down(
    h_PF: torch.Tensor,
    w_down_EFD: torch.Tensor,
    gate_weight_A: torch.Tensor,
    out_AD: torch.Tensor,
    alignment,
    config: dict,
    pdl: bool = False,
) -> None:
    """`kernels.launch_down`'s result through `down_decode_persistent_kernel`: at most
    PROGRAMS_PER_SM programs a streaming multiprocessor, and no more than the tiles of
    the padded length's bound. Takes a row list (not the one-token layout); `pdl` as
    there."""
    assert not alignment.per_assignment, "the persistent tiles walk a row list"
    F, D = w_down_EFD.shape[1], w_down_EFD.shape[2]
    block_n = config["BLOCK_N"]
    tiles = alignment.max_blocks * ceil_div(D, block_n)
    programs = min(tiles, config["PROGRAMS_PER_SM"] * tma.multiprocessors(h_PF.device))
    launch(
        down_decode_persistent_kernel, (programs,), h_PF, w_down_EFD, gate_weight_A, out_AD,
        *_row_list(alignment), D, F, alignment.num_assign,
        h_PF.stride(0), w_down_EFD.stride(0), w_down_EFD.stride(1), w_down_EFD.stride(2),
        out_AD.stride(0), programs,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"],
        GROUP_M=config["GROUP_M"], PDL=pdl,
        num_warps=config["num_warps"], num_stages=config["num_stages"], launch_pdl=pdl,
    )  # fmt: skip
