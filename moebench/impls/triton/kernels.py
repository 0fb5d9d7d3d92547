"""The two grouped GEMMs of the fused layer, as Triton kernels, and their launchers.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
A = T x K (token, slot) assignments, P padded sorted rows (see `align.py`).

Both kernels walk the padded, expert-sorted row list of `align.Alignment`: row block b
belongs to expert `block_expert[b]`, and each row holds an assignment index a (token
a // K) or the sentinel A for padding. Blocks past the real padded length exit at once,
so the grid is sized from a bound known on the host and nothing waits on the device.

- `gate_up`: h_PF = silu(x[token] @ W_gate[e]) * (x[token] @ W_up[e]). The A-operand
  load gathers the permuted tokens straight from x_TD (no permuted copy of x), the gate
  and up products share that A tile, and SwiGLU is the epilogue. In training it also
  keeps the pre-activations.
- `down`: out_AD[a] = gate_weight[a] * (h_PF[row] @ W_down[e]); the routing weight is
  the epilogue and the store scatters each row back to its assignment, so summing over
  the K slots of a token (one cheap reduction) un-permutes. Without the scatter
  (`launch_rows`) it is any padded rows times their experts' weights, in place: the
  backward's dh and dx.

An expert's run is padded to whole blocks, so its last block is partly padding (DeepSeek-V3
at 8192 tokens: 1.25x the real rows at BLOCK_M = 128). With HALF_TAIL (a tuner candidate)
a block whose second half is padding alone computes half its rows, through the same tile
code at BLOCK_M / 2 rows. The padding rows it skips are left unwritten: a later kernel
may multiply them, but the scatter and the backward drop every padding row's result.

Small token counts use BLOCK_M = 16 and narrow BLOCK_N, so that many programs share one
expert's weights and the weight read (the whole cost at decode) runs at full bandwidth.

One token (`align.per_assignment_blocks`, PER_ASSIGNMENT): block a is assignment a alone,
in its first row, its expert read from the token's ids: no alignment kernel runs first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebench.dependent_launch import release_dependents, wait_for_predecessor
from moebench.fast_launch import ceil_div, launch


@triton.jit
def _block_coords(pid, num_blocks_m, num_blocks_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), GROUP_M row blocks at a time so that the
    weight tiles of one expert stay in L2 while its row blocks pass."""
    per_group = GROUP_M * num_blocks_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = min(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % group_size)
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _block_rows(
    sorted_ids_ptr,
    block_expert_ptr,
    pid_m,
    pid_n,
    num_assign,
    N,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PER_ASSIGNMENT: tl.constexpr,
):
    """The first ROWS rows of a row block: its expert, the rows, their assignment ids and
    validity, and its columns (wrapped into [0, N) so weight loads need no mask)."""
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, ROWS)
    if PER_ASSIGNMENT:  # block a: assignment a in its first row, padding in the rest
        ids = tl.where(tl.arange(0, ROWS) == 0, pid_m, num_assign)
    else:
        ids = tl.load(sorted_ids_ptr + offs_m)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, offs_m, ids, ids < num_assign, offs_n, offs_n % N


@triton.jit
def _second_half_is_padding(sorted_ids_ptr, pid_m, num_assign, BLOCK_M: tl.constexpr):
    """Whether row block pid_m's second half holds padding alone: an expert's real rows
    come first in its run, so that is when the second half's first row is padding."""
    return tl.load(sorted_ids_ptr + pid_m * BLOCK_M + BLOCK_M // 2) >= num_assign


@triton.jit
def gate_up_kernel(
    x_ptr,
    w_gate_ptr,
    w_up_ptr,
    h_ptr,
    gate_pre_ptr,
    up_pre_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    D,
    F,
    num_assign,
    top_k,
    num_blocks_m,
    stride_x_t,
    stride_w_e,
    stride_w_d,
    stride_w_f,
    stride_h_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    STORE_PRE: tl.constexpr,
    PER_ASSIGNMENT: tl.constexpr,
    HALF_TAIL: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, tl.cdiv(F, BLOCK_N), GROUP_M)
    if not PER_ASSIGNMENT:  # noqa: SIM102 (a constexpr branch: no padded length to load)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
    if HALF_TAIL:  # noqa: SIM102 (an expert's last block, half of it padding: half the rows)
        if _second_half_is_padding(sorted_ids_ptr, pid_m, num_assign, BLOCK_M):
            _gate_up_tile(
                x_ptr, w_gate_ptr, w_up_ptr, h_ptr, gate_pre_ptr, up_pre_ptr, sorted_ids_ptr,
                block_expert_ptr, D, F, num_assign, top_k, stride_x_t, stride_w_e, stride_w_d,
                stride_w_f, stride_h_p, pid_m, pid_n,
                BLOCK_M, BLOCK_M // 2, BLOCK_N, BLOCK_K, STORE_PRE, PER_ASSIGNMENT, PDL,
            )  # fmt: skip
            return
    _gate_up_tile(
        x_ptr, w_gate_ptr, w_up_ptr, h_ptr, gate_pre_ptr, up_pre_ptr, sorted_ids_ptr,
        block_expert_ptr, D, F, num_assign, top_k, stride_x_t, stride_w_e, stride_w_d,
        stride_w_f, stride_h_p, pid_m, pid_n,
        BLOCK_M, BLOCK_M, BLOCK_N, BLOCK_K, STORE_PRE, PER_ASSIGNMENT, PDL,
    )  # fmt: skip


@triton.jit
def _gate_up_tile(
    x_ptr,
    w_gate_ptr,
    w_up_ptr,
    h_ptr,
    gate_pre_ptr,
    up_pre_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    D,
    F,
    num_assign,
    top_k,
    stride_x_t,
    stride_w_e,
    stride_w_d,
    stride_w_f,
    stride_h_p,
    pid_m,
    pid_n,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STORE_PRE: tl.constexpr,
    PER_ASSIGNMENT: tl.constexpr,
    PDL: tl.constexpr,
):
    """gate_up of the first ROWS rows of row block pid_m, columns block pid_n."""
    expert, offs_m, ids, row_ok, offs_n, offs_n_wrapped = _block_rows(
        sorted_ids_ptr, block_expert_ptr, pid_m, pid_n, num_assign, F, BLOCK_M, ROWS, BLOCK_N,
        PER_ASSIGNMENT,
    )  # fmt: skip
    token = (ids // top_k).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_x_t + offs_k[None, :]
    w_offsets = (
        expert * stride_w_e + offs_k[:, None] * stride_w_d + offs_n_wrapped[None, :] * stride_w_f
    )
    g_ptrs = w_gate_ptr + w_offsets
    u_ptrs = w_up_ptr + w_offsets
    acc_gate = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k in range(0, (D + BLOCK_K - 1) // BLOCK_K):
        k_left = D - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k[None, :] < k_left), other=0.0)
        k_ok = offs_k[:, None] < k_left
        w_g = tl.load(g_ptrs, mask=k_ok, other=0.0)
        w_u = tl.load(u_ptrs, mask=k_ok, other=0.0)
        acc_gate = tl.dot(a, w_g, acc_gate)
        acc_up = tl.dot(a, w_u, acc_up)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_w_d
        u_ptrs += BLOCK_K * stride_w_d
    release_dependents(PDL)  # the next kernel's launch under this one's epilogues
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    row_offsets = offs_m[:, None].to(tl.int64) * stride_h_p + offs_n[None, :]
    tl.store(h_ptr + row_offsets, h.to(h_ptr.dtype.element_ty), mask=offs_n[None, :] < F)
    if STORE_PRE:  # training: the backward needs the pre-activations
        dtype = h_ptr.dtype.element_ty
        tl.store(gate_pre_ptr + row_offsets, acc_gate.to(dtype), mask=offs_n[None, :] < F)
        tl.store(up_pre_ptr + row_offsets, acc_up.to(dtype), mask=offs_n[None, :] < F)


@triton.jit
def down_kernel(
    h_ptr,
    w_down_ptr,
    gate_weight_ptr,
    out_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    D,
    F,
    num_assign,
    num_blocks_m,
    stride_h_p,
    stride_w_e,
    stride_w_f,
    stride_w_d,
    stride_out_a,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PER_ASSIGNMENT: tl.constexpr,
    SCATTER: tl.constexpr,
    HALF_TAIL: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, tl.cdiv(D, BLOCK_N), GROUP_M)
    if not PER_ASSIGNMENT:  # noqa: SIM102 (a constexpr branch: no padded length to load)
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return
    if HALF_TAIL:  # noqa: SIM102 (an expert's last block, half of it padding: half the rows)
        if _second_half_is_padding(sorted_ids_ptr, pid_m, num_assign, BLOCK_M):
            _down_tile(
                h_ptr, w_down_ptr, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
                D, F, num_assign, stride_h_p, stride_w_e, stride_w_f, stride_w_d, stride_out_a,
                pid_m, pid_n,
                BLOCK_M, BLOCK_M // 2, BLOCK_N, BLOCK_K, PER_ASSIGNMENT, SCATTER, PDL,
            )  # fmt: skip
            return
    _down_tile(
        h_ptr, w_down_ptr, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
        D, F, num_assign, stride_h_p, stride_w_e, stride_w_f, stride_w_d, stride_out_a,
        pid_m, pid_n,
        BLOCK_M, BLOCK_M, BLOCK_N, BLOCK_K, PER_ASSIGNMENT, SCATTER, PDL,
    )  # fmt: skip


@triton.jit
def _down_tile(
    h_ptr,
    w_down_ptr,
    gate_weight_ptr,
    out_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    D,
    F,
    num_assign,
    stride_h_p,
    stride_w_e,
    stride_w_f,
    stride_w_d,
    stride_out_a,
    pid_m,
    pid_n,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_ASSIGNMENT: tl.constexpr,
    SCATTER: tl.constexpr,
    PDL: tl.constexpr,
):
    """down of the first ROWS rows of row block pid_m, columns block pid_n."""
    expert, offs_m, ids, row_ok, offs_n, offs_n_wrapped = _block_rows(
        sorted_ids_ptr, block_expert_ptr, pid_m, pid_n, num_assign, D, BLOCK_M, ROWS, BLOCK_N,
        PER_ASSIGNMENT,
    )  # fmt: skip
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_h_p + offs_k[None, :]
    w_ptrs = (
        w_down_ptr
        + expert * stride_w_e
        + offs_k[:, None] * stride_w_f
        + offs_n_wrapped[None, :] * stride_w_d
    )
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k in range(0, (F + BLOCK_K - 1) // BLOCK_K):
        k_left = F - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_w_f
    release_dependents(PDL)  # the next kernel's launch under this one's epilogues
    if SCATTER:  # the forward: weighted, each row to its assignment
        gate = tl.load(gate_weight_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * gate[:, None]
        out_ptrs = out_ptr + ids[:, None].to(tl.int64) * stride_out_a + offs_n[None, :]
        store_ok = row_ok[:, None] & (offs_n[None, :] < D)
    else:  # the backward: each padded row in place (a skipped half of padding excepted)
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_out_a + offs_n[None, :]
        store_ok = offs_n[None, :] < D
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=store_ok)


def _row_list(alignment) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted ids, block experts, padded length) for the kernels; a per-assignment
    layout has no row list nor padded length, which its kernels never read."""
    if alignment.per_assignment:
        return (alignment.block_expert_B,) * 3
    return alignment.sorted_ids_P, alignment.block_expert_B, alignment.num_padded_1


def _half_tail(alignment, config: dict) -> bool:
    """Whether a config's blocks compute half their rows where the second half is padding
    (config HALF_TAIL; only with a row list, whose real rows come first per expert)."""
    return bool(config.get("HALF_TAIL")) and not alignment.per_assignment


def launch_gate_up(
    x_TD: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    h_PF: torch.Tensor,
    alignment,
    top_k: int,
    config: dict,
    pre_activations: tuple[torch.Tensor, torch.Tensor] | None = None,
    pdl: bool = False,
    tile_kernel=None,
) -> None:
    """h_PF <- SwiGLU of the gathered tokens through their experts' gate and up weights;
    with `pre_activations` (two P x F buffers), the gate and up products too. `pdl`:
    launched with programmatic dependent launch (`moebench.dependent_launch`).
    `tile_kernel`: another kernel of `gate_up_kernel`'s arguments (merge_tail.py's)."""
    D, F = x_TD.shape[1], w_gate_EDF.shape[2]
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    num_blocks_m = alignment.max_blocks
    grid = (num_blocks_m * ceil_div(F, block_n),)
    launch(
        tile_kernel or gate_up_kernel, grid,
        x_TD, w_gate_EDF, w_up_EDF, h_PF,
        *(pre_activations or (h_PF, h_PF)),
        *_row_list(alignment),
        D, F, alignment.num_assign, top_k, num_blocks_m,
        x_TD.stride(0), w_gate_EDF.stride(0), w_gate_EDF.stride(1), w_gate_EDF.stride(2),
        h_PF.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"],
        GROUP_M=config["GROUP_M"], STORE_PRE=pre_activations is not None,
        PER_ASSIGNMENT=alignment.per_assignment, HALF_TAIL=_half_tail(alignment, config),
        PDL=pdl, num_warps=config["num_warps"], num_stages=config["num_stages"], launch_pdl=pdl,
    )  # fmt: skip


def launch_down(
    h_PF: torch.Tensor,
    w_down_EFD: torch.Tensor,
    gate_weight_A: torch.Tensor,
    out_AD: torch.Tensor,
    alignment,
    config: dict,
    pdl: bool = False,
) -> None:
    """out_AD[a] <- gate_weight_A[a] * (h of a's row) @ W_down[expert of a]; `pdl` as
    in `launch_gate_up`."""
    F, D = w_down_EFD.shape[1], w_down_EFD.shape[2]
    block_n = config["BLOCK_N"]
    num_blocks_m = alignment.max_blocks
    grid = (num_blocks_m * ceil_div(D, block_n),)
    launch(
        down_kernel, grid, h_PF, w_down_EFD, gate_weight_A, out_AD, *_row_list(alignment),
        D, F, alignment.num_assign, num_blocks_m,
        h_PF.stride(0), w_down_EFD.stride(0), w_down_EFD.stride(1), w_down_EFD.stride(2),
        out_AD.stride(0),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"],
        GROUP_M=config["GROUP_M"], PER_ASSIGNMENT=alignment.per_assignment, SCATTER=True,
        HALF_TAIL=_half_tail(alignment, config), PDL=pdl,
        num_warps=config["num_warps"], num_stages=config["num_stages"], launch_pdl=pdl,
    )  # fmt: skip


def launch_rows(
    a_PK: torch.Tensor, w_EKN: torch.Tensor, out_PN: torch.Tensor, alignment, config: dict
) -> None:
    """out_PN[row] <- a_PK[row] @ w_EKN[expert of row] for every real padded row
    (`down_kernel` without its scatter: the backward's dh and dx); w_EKN any strides."""
    K, N = w_EKN.shape[1], w_EKN.shape[2]
    assert a_PK.stride(1) == 1 and out_PN.stride(1) == 1
    num_blocks_m = alignment.max_blocks
    grid = (num_blocks_m * ceil_div(N, config["BLOCK_N"]),)
    launch(
        down_kernel, grid, a_PK, w_EKN, a_PK, out_PN, *_row_list(alignment),
        N, K, alignment.num_assign, num_blocks_m,
        a_PK.stride(0), w_EKN.stride(0), w_EKN.stride(1), w_EKN.stride(2), out_PN.stride(0),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        GROUP_M=config["GROUP_M"], PER_ASSIGNMENT=False, SCATTER=False,
        HALF_TAIL=_half_tail(alignment, config), PDL=False,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
