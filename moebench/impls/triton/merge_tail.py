"""The fused layer's two GEMMs with an expert's short tail merged into its last full row
block: tiles raced beside `tma.py`'s and `kernels.py`'s (`layer.races_merged_tails`;
`$MOEBENCH_MERGE_TAIL=0` leaves them out), built in version 28, raced by default since
version 31 (triton/NOTES.md).

Shape legend as in `kernels.py`. Why: every expert's run is padded to whole row blocks,
and its last block's program reads the expert's whole weight tile however few of its
rows are real. `scripts/tail_probe.py` measured it on an H200 (NOTES.md, version 18):
DeepSeek-V3's 256 experts given 288 rows each (two full 128-row blocks and a tail of 32)
took 9.77 ms in gate_up's TMA tile, 256 rows 6.73 and 384 rows 9.68: a tail of 32 rows
cost a full block, with HALF_TAIL's half-height path or without. At about 256 rows an
expert (Mixtral-8x7B at 1024 tokens, DeepSeek-V3 at 8192: two points issue 14 misses)
half the experts end in such a tail.

Here a program whose next row block is its own expert's last, with that block's second
half padding alone, computes its block and the tail's first half together: each K step
one weight tile, two products (BLOCK_M and BLOCK_M / 2 rows). The tail's own program
exits at once. Otherwise a program computes its block as `tma.py`'s tiles do: whole, or,
where it is its expert's only block and its second half padding, its first half alone
(HALF_TAIL's path). Each row's K steps are the same as in `tma.py`'s tile of the same
BLOCK_N and BLOCK_K, so the results are the same bits; the padding rows of a tail's
second half are not written (as HALF_TAIL leaves them). gate_up also has a pointer tile
so merged (`gate_up_pointer_merged_kernel`, `kernels.py`'s tile): the pointer tiles win
its keys at 8192 tokens on Qwen3-30B-A3B and OLMoE-1B-7B.

The two accumulators take half as many registers again as one: gate_up merges only with
ONE_DOT (one product of gate and up rows, 2 BLOCK_N wide), at widths its warps hold
(`TILES`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moebench.dependent_launch import release_dependents, wait_for_predecessor
from moebench.impls.triton import kernels, tma
from moebench.impls.triton.kernels import _block_coords, _block_rows, _second_half_is_padding

# (BLOCK_N, BLOCK_K, warps, stages) per GEMM: accumulators of 128 + 64 rows within a
# thread's registers (gate_up: 2 BLOCK_N columns, ONE_DOT's product; its 256-wide tile on
# 16 warps: on 8 it took 255 registers, and spilled with GATHER_A), the stages within
# shared memory (A boxes of 128 and 64 rows beside the weight box, every stage). Compiled
# for sm_90 without spills (tests/test_merge_tail.py).
TILES = {
    "gate_up": ((64, 64, 8, 3), (64, 64, 8, 4), (64, 64, 8, 5), (128, 64, 16, 3)),
    "down": ((128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (256, 64, 16, 3)),
}
# gate_up's pointer tiles (gate and up as two products, four accumulators with the tail's)
POINTER_TILES = ((64, 64, 8, 3), (64, 64, 8, 4), (128, 64, 16, 3))


@triton.jit
def _program_roles(
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr, num_blocks_m, num_blocks_n, num_assign,
    BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr, HALF_TAIL: tl.constexpr,
):  # fmt: skip
    """This program's (row block, column block) as `kernels._block_coords` orders them, the
    rows of its block it computes (0: a block past the padded length, or a tail the block
    before computes; BLOCK_M / 2: with HALF_TAIL, a tail that is its expert's only block;
    else BLOCK_M), and whether it computes the next block's first half too (that block
    its expert's tail, its second half padding)."""
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, num_blocks_n, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    tail = _second_half_is_padding(sorted_ids_ptr, pid_m, num_assign, BLOCK_M)
    has_before = pid_m > 0
    before = tl.load(block_expert_ptr + pid_m - 1, mask=has_before, other=-1)
    has_next = pid_m + 1 < num_blocks_m
    after = tl.load(block_expert_ptr + pid_m + 1, mask=has_next, other=-1)
    next_first_padding = tl.load(
        sorted_ids_ptr + (pid_m + 1) * BLOCK_M + BLOCK_M // 2, mask=has_next, other=0
    )
    # (blocks past the padded length hold the sentinel expert E: none merges into them)
    computes = (pid_m * BLOCK_M < tl.load(num_padded_ptr)) & ~(tail & (before == expert))
    rows = tl.where(computes, tl.where(tail & HALF_TAIL, BLOCK_M // 2, BLOCK_M), 0)
    merges_next = computes & (after == expert) & (next_first_padding >= num_assign)
    return pid_m, pid_n, rows, merges_next


@triton.jit
def gate_up_merged_kernel(
    a_desc, a_half_desc, w_desc, x_ptr, h_ptr, gate_pre_ptr, up_pre_ptr, sorted_ids_ptr,
    block_expert_ptr, num_padded_ptr, D, F, num_assign, top_k, num_blocks_m, stride_x_t,
    stride_h_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, STORE_PRE: tl.constexpr, HALF_TAIL: tl.constexpr,
    ONE_DOT: tl.constexpr, GATHER_A: tl.constexpr,
):  # fmt: skip
    """`tma.gate_up_tma_kernel` (its arguments, ONE_DOT only), an expert's short tail
    computed with the block before it (module docstring); with HALF_TAIL, a tail that is
    its expert's only block computes its first half alone."""
    tl.static_assert(ONE_DOT, "two products and a tail's two more spill")
    pid_m, pid_n, rows, merges_next = _program_roles(
        sorted_ids_ptr, block_expert_ptr, num_padded_ptr, num_blocks_m, tl.cdiv(F, BLOCK_N),
        num_assign, BLOCK_M, GROUP_M, HALF_TAIL,
    )  # fmt: skip
    if merges_next:
        # (the tail's rows stored first: the other order spilled the 256-wide tile on 16
        # warps, its epilogue's temporaries beside the tail's product)
        acc, acc_tail = _gate_up_merged_products(
            a_desc, a_half_desc, w_desc, x_ptr, sorted_ids_ptr, block_expert_ptr, D,
            num_assign, top_k, stride_x_t, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, GATHER_A,
        )  # fmt: skip
        _one_dot_swiglu_store(
            acc_tail, h_ptr, gate_pre_ptr, up_pre_ptr, stride_h_p, pid_m + 1, pid_n, BLOCK_M,
            BLOCK_M // 2, BLOCK_N, STORE_PRE,
        )  # fmt: skip
        _one_dot_swiglu_store(
            acc, h_ptr, gate_pre_ptr, up_pre_ptr, stride_h_p, pid_m, pid_n, BLOCK_M, BLOCK_M,
            BLOCK_N, STORE_PRE,
        )  # fmt: skip
    elif rows == BLOCK_M // 2:  # its expert's only block: the first half alone
        tma._gate_up_tma_tile(
            a_half_desc, w_desc, x_ptr, sorted_ids_ptr, h_ptr, gate_pre_ptr, up_pre_ptr,
            block_expert_ptr, D, F, num_assign, top_k, stride_x_t, stride_h_p, pid_m, pid_n,
            BLOCK_M, BLOCK_M // 2, BLOCK_N, BLOCK_K, STORE_PRE, True, GATHER_A,
        )  # fmt: skip
    elif rows == BLOCK_M:
        tma._gate_up_tma_tile(
            a_desc, w_desc, x_ptr, sorted_ids_ptr, h_ptr, gate_pre_ptr, up_pre_ptr,
            block_expert_ptr, D, F, num_assign, top_k, stride_x_t, stride_h_p, pid_m, pid_n,
            BLOCK_M, BLOCK_M, BLOCK_N, BLOCK_K, STORE_PRE, True, GATHER_A,
        )  # fmt: skip


@triton.jit
def _gathered_rows(
    x_ptr, sorted_ids_ptr, first_row, num_assign, top_k, stride_x_t, ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """GATHER_A's A operand for rows [first_row, first_row + ROWS): pointers to the first
    K step of each row's token in x, and which rows are real (padding loads zeros)."""
    ids = tl.load(sorted_ids_ptr + first_row + tl.arange(0, ROWS))
    token = (ids // top_k).to(tl.int64)
    return x_ptr + token[:, None] * stride_x_t + tl.arange(0, BLOCK_K)[None, :], ids < num_assign


@triton.jit
def _gate_up_merged_products(
    a_desc, a_half_desc, w_desc, x_ptr, sorted_ids_ptr, block_expert_ptr, D, num_assign,
    top_k, stride_x_t, pid_m, pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GATHER_A: tl.constexpr,
):  # fmt: skip
    """ONE_DOT's products (BLOCK_M and BLOCK_M / 2 rows x 2 BLOCK_N, float32) of row block
    pid_m and of the next block's first half, both against column block pid_n of pid_m's
    expert, one weight box a K step."""
    HALF: tl.constexpr = BLOCK_M // 2
    expert = tl.load(block_expert_ptr + pid_m)
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    acc_tail = tl.zeros((HALF, 2 * BLOCK_N), dtype=tl.float32)
    if GATHER_A:  # A by pointers from x's rows (padding rows load zeros)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs, a_real = _gathered_rows(
            x_ptr, sorted_ids_ptr, pid_m * BLOCK_M, num_assign, top_k, stride_x_t, BLOCK_M,
            BLOCK_K,
        )  # fmt: skip
        tail_ptrs, tail_real = _gathered_rows(
            x_ptr, sorted_ids_ptr, (pid_m + 1) * BLOCK_M, num_assign, top_k, stride_x_t, HALF,
            BLOCK_K,
        )  # fmt: skip
        for k in range(0, tl.cdiv(D, BLOCK_K)):
            k_ok = offs_k[None, :] < D - k * BLOCK_K
            a = tl.load(a_ptrs, mask=a_real[:, None] & k_ok, other=0.0)
            a_tail = tl.load(tail_ptrs, mask=tail_real[:, None] & k_ok, other=0.0)
            w = w_desc.load([expert, 0, pid_n * BLOCK_N, k * BLOCK_K])
            w = w.reshape(2 * BLOCK_N, BLOCK_K).T
            acc = tl.dot(a, w, acc)
            acc_tail = tl.dot(a_tail, w, acc_tail)
            a_ptrs += BLOCK_K
            tail_ptrs += BLOCK_K
    else:
        for k in range(0, tl.cdiv(D, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            a_tail = a_half_desc.load([(pid_m + 1) * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([expert, 0, pid_n * BLOCK_N, k * BLOCK_K])
            w = w.reshape(2 * BLOCK_N, BLOCK_K).T
            acc = tl.dot(a, w, acc)
            acc_tail = tl.dot(a_tail, w, acc_tail)
    return acc, acc_tail


@triton.jit
def _one_dot_swiglu_store(
    acc, h_ptr, gate_pre_ptr, up_pre_ptr, stride_h_p, pid_m, pid_n, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, STORE_PRE: tl.constexpr,
):  # fmt: skip
    """ONE_DOT's product (ROWS x 2 BLOCK_N: gate's columns, then up's) split into gate and
    up, then `tma._swiglu_store` of the first ROWS rows of row block pid_m."""
    acc_gate, acc_up = tl.split(tl.permute(acc.reshape(ROWS, 2, BLOCK_N), (0, 2, 1)))
    tma._swiglu_store(
        acc_gate, acc_up, h_ptr, gate_pre_ptr, up_pre_ptr, stride_h_p, pid_m, pid_n, BLOCK_M,
        ROWS, BLOCK_N, STORE_PRE,
    )  # fmt: skip


@triton.jit
def down_merged_kernel(
    h_desc, h_half_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_padded_ptr, D, F, num_assign, num_blocks_m, stride_out_a,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, HALF_TAIL: tl.constexpr,
):  # fmt: skip
    """`tma.down_tma_kernel` (its arguments), an expert's short tail computed with the
    block before it (module docstring); with HALF_TAIL, a tail that is its expert's only
    block computes its first half alone."""
    pid_m, pid_n, rows, merges_next = _program_roles(
        sorted_ids_ptr, block_expert_ptr, num_padded_ptr, num_blocks_m, tl.cdiv(D, BLOCK_N),
        num_assign, BLOCK_M, GROUP_M, HALF_TAIL,
    )  # fmt: skip
    if merges_next:
        first_w_row = tl.load(block_expert_ptr + pid_m) * F
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_tail = tl.zeros((BLOCK_M // 2, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(F, BLOCK_K)):
            w = w_desc.load([first_w_row + k * BLOCK_K, pid_n * BLOCK_N])
            acc = tl.dot(h_desc.load([pid_m * BLOCK_M, k * BLOCK_K]), w, acc)
            acc_tail = tl.dot(h_half_desc.load([(pid_m + 1) * BLOCK_M, k * BLOCK_K]), w, acc_tail)
        tma._weighted_scatter(
            acc_tail, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign, stride_out_a,
            pid_m + 1, pid_n, BLOCK_M, BLOCK_M // 2, BLOCK_N,
        )  # fmt: skip
        tma._weighted_scatter(
            acc, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign, stride_out_a, pid_m,
            pid_n, BLOCK_M, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    elif rows == BLOCK_M // 2:  # its expert's only block: the first half alone
        tma._down_tma_tile(
            h_half_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
            D, F, num_assign, stride_out_a, pid_m, pid_n, BLOCK_M, BLOCK_M // 2, BLOCK_N,
            BLOCK_K,
        )  # fmt: skip
    elif rows == BLOCK_M:
        tma._down_tma_tile(
            h_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, D, F,
            num_assign, stride_out_a, pid_m, pid_n, BLOCK_M, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


@triton.jit
def gate_up_pointer_merged_kernel(
    x_ptr, w_gate_ptr, w_up_ptr, h_ptr, gate_pre_ptr, up_pre_ptr, sorted_ids_ptr,
    block_expert_ptr, num_padded_ptr, D, F, num_assign, top_k, num_blocks_m, stride_x_t,
    stride_w_e, stride_w_d, stride_w_f, stride_h_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, STORE_PRE: tl.constexpr, PER_ASSIGNMENT: tl.constexpr,
    HALF_TAIL: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """`kernels.gate_up_kernel` (its arguments; a row list, not PER_ASSIGNMENT), an
    expert's short tail computed with the block before it (module docstring); with
    HALF_TAIL, a tail that is its expert's only block computes its first half alone. The
    pointer tiles win gate_up at 8192 tokens on the fine-grained shapes (Qwen3-30B-A3B,
    OLMoE-1B-7B), where an expert spans four to eight blocks and a tail."""
    tl.static_assert(not PER_ASSIGNMENT, "one assignment a block has no tail")
    wait_for_predecessor(PDL)
    pid_m, pid_n, rows, merges_next = _program_roles(
        sorted_ids_ptr, block_expert_ptr, num_padded_ptr, num_blocks_m, tl.cdiv(F, BLOCK_N),
        num_assign, BLOCK_M, GROUP_M, HALF_TAIL,
    )  # fmt: skip
    if merges_next:
        _gate_up_pointer_merged_tile(
            x_ptr, w_gate_ptr, w_up_ptr, h_ptr, gate_pre_ptr, up_pre_ptr, sorted_ids_ptr,
            block_expert_ptr, D, F, num_assign, top_k, stride_x_t, stride_w_e, stride_w_d,
            stride_w_f, stride_h_p, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, STORE_PRE, PDL,
        )  # fmt: skip
    elif rows == BLOCK_M // 2:  # its expert's only block: the first half alone
        kernels._gate_up_tile(
            x_ptr, w_gate_ptr, w_up_ptr, h_ptr, gate_pre_ptr, up_pre_ptr, sorted_ids_ptr,
            block_expert_ptr, D, F, num_assign, top_k, stride_x_t, stride_w_e, stride_w_d,
            stride_w_f, stride_h_p, pid_m, pid_n,
            BLOCK_M, BLOCK_M // 2, BLOCK_N, BLOCK_K, STORE_PRE, False, PDL,
        )  # fmt: skip
    elif rows == BLOCK_M:
        kernels._gate_up_tile(
            x_ptr, w_gate_ptr, w_up_ptr, h_ptr, gate_pre_ptr, up_pre_ptr, sorted_ids_ptr,
            block_expert_ptr, D, F, num_assign, top_k, stride_x_t, stride_w_e, stride_w_d,
            stride_w_f, stride_h_p, pid_m, pid_n,
            BLOCK_M, BLOCK_M, BLOCK_N, BLOCK_K, STORE_PRE, False, PDL,
        )  # fmt: skip


@triton.jit
def _gate_up_pointer_merged_tile(
    x_ptr, w_gate_ptr, w_up_ptr, h_ptr, gate_pre_ptr, up_pre_ptr, sorted_ids_ptr,
    block_expert_ptr, D, F, num_assign, top_k, stride_x_t, stride_w_e, stride_w_d,
    stride_w_f, stride_h_p, pid_m, pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, STORE_PRE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """`kernels._gate_up_tile` of row block pid_m and, from the same weight tiles each K
    step, of the next block's first half (its expert's tail)."""
    HALF: tl.constexpr = BLOCK_M // 2
    expert, offs_m, ids, row_ok, offs_n, offs_n_wrapped = _block_rows(
        sorted_ids_ptr, block_expert_ptr, pid_m, pid_n, num_assign, F, BLOCK_M, BLOCK_M,
        BLOCK_N, False,
    )  # fmt: skip
    _, tail_m, tail_ids, tail_ok, _, _ = _block_rows(
        sorted_ids_ptr, block_expert_ptr, pid_m + 1, pid_n, num_assign, F, BLOCK_M, HALF,
        BLOCK_N, False,
    )  # fmt: skip
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + (ids // top_k).to(tl.int64)[:, None] * stride_x_t + offs_k[None, :]
    tail_ptrs = x_ptr + (tail_ids // top_k).to(tl.int64)[:, None] * stride_x_t + offs_k[None, :]
    w_offsets = (
        expert * stride_w_e + offs_k[:, None] * stride_w_d + offs_n_wrapped[None, :] * stride_w_f
    )
    g_ptrs = w_gate_ptr + w_offsets
    u_ptrs = w_up_ptr + w_offsets
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tail_gate = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
    tail_up = tl.zeros((HALF, BLOCK_N), dtype=tl.float32)
    for k in range(0, (D + BLOCK_K - 1) // BLOCK_K):
        k_left = D - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k[None, :] < k_left), other=0.0)
        a_tail = tl.load(tail_ptrs, mask=tail_ok[:, None] & (offs_k[None, :] < k_left), other=0.0)
        k_ok = offs_k[:, None] < k_left
        w_g = tl.load(g_ptrs, mask=k_ok, other=0.0)
        w_u = tl.load(u_ptrs, mask=k_ok, other=0.0)
        acc_gate = tl.dot(a, w_g, acc_gate)
        acc_up = tl.dot(a, w_u, acc_up)
        tail_gate = tl.dot(a_tail, w_g, tail_gate)
        tail_up = tl.dot(a_tail, w_u, tail_up)
        a_ptrs += BLOCK_K
        tail_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_w_d
        u_ptrs += BLOCK_K * stride_w_d
    release_dependents(PDL)
    # (the tail's rows first, as the TMA tiles store them)
    _swiglu_rows_store(
        tail_gate, tail_up, h_ptr, gate_pre_ptr, up_pre_ptr, tail_m, offs_n, F, stride_h_p,
        STORE_PRE,
    )  # fmt: skip
    _swiglu_rows_store(
        acc_gate, acc_up, h_ptr, gate_pre_ptr, up_pre_ptr, offs_m, offs_n, F, stride_h_p,
        STORE_PRE,
    )  # fmt: skip


@triton.jit
def _swiglu_rows_store(
    acc_gate, acc_up, h_ptr, gate_pre_ptr, up_pre_ptr, offs_m, offs_n, F, stride_h_p,
    STORE_PRE: tl.constexpr,
):  # fmt: skip
    """`kernels._gate_up_tile`'s epilogue (rows offs_m, columns offs_n below F), apart:
    made a function there, it would change the code of every pointer gate_up choice moebench
    ships (`tuning.code_fingerprint`)."""
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    row_offsets = offs_m[:, None].to(tl.int64) * stride_h_p + offs_n[None, :]
    tl.store(h_ptr + row_offsets, h.to(h_ptr.dtype.element_ty), mask=offs_n[None, :] < F)
    if STORE_PRE:  # training: the backward needs the pre-activations
        dtype = h_ptr.dtype.element_ty
        tl.store(gate_pre_ptr + row_offsets, acc_gate.to(dtype), mask=offs_n[None, :] < F)
        tl.store(up_pre_ptr + row_offsets, acc_up.to(dtype), mask=offs_n[None, :] < F)


# per GEMM, the kernels of its merged-tail tiles (`tile_kernel`, `layer.launch_gate_up`
# and `layer.launch_down` pass them), which its choices' fingerprints then hold
KERNELS = {
    "gate_up": (gate_up_merged_kernel, gate_up_pointer_merged_kernel),
    "down": (down_merged_kernel,),
}


def candidates(kernel: str, block_m: int, D: int, F: int, element_bytes: int) -> list[dict]:
    """The configs (`"MERGE_TAIL": True`, and `"TMA"`, `"HALF_TAIL"`) the tuner races for
    `kernel` ("gate_up" or "down") at `block_m` (64 or 128 rows; none below) beside
    `tma.candidates`: each tile of TILES that `tma.fits` these widths; gate_up's with
    ONE_DOT, without and, where D is a multiple of 16, with GATHER_A (at D = 264 its
    128-row tiles took 255 registers and spilled, at 272 they take 176); and gate_up's
    pointer tiles of POINTER_TILES (`"MERGE_TAIL"` without `"TMA"`). `tma.py`'s and
    `kernels.py`'s launchers launch them (their `tile_kernel`)."""
    if block_m < 64:
        return []
    configs = [
        {"BLOCK_M": block_m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "num_warps": warps,
         "num_stages": stages, "TMA": True, "HALF_TAIL": True, "MERGE_TAIL": True}
        for n, k, warps, stages in TILES[kernel]
    ]  # fmt: skip
    if kernel == "gate_up":
        configs = [{**config, "ONE_DOT": True} for config in configs]
        if D % 16 == 0:
            configs += [{**config, "GATHER_A": True} for config in configs]
    configs = [config for config in configs if tma.fits(kernel, config, D, F, element_bytes)]
    if kernel == "gate_up":
        configs += [
            {"BLOCK_M": block_m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "num_warps": warps,
             "num_stages": stages, "HALF_TAIL": True, "MERGE_TAIL": True}
            for n, k, warps, stages in POINTER_TILES
        ]  # fmt: skip
    return configs
