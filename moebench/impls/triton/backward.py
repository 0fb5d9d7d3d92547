"""The fused layer's backward: one Triton GEMM with the SwiGLU backward in its epilogue,
then torch grouped GEMMs over the forward's padded row layout.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
A = T x K assignments, P padded rows (the forward's `Alignment`).

The training forward keeps the gate and up pre-activations and the SwiGLU output per
padded row, so nothing is recomputed.
With y_t = sum_a w_a o_a, o_a = h_a W_down:
  dh~_a = dy_t W_down^T            (dh = w_a dh~_a)
  dw_a  = dy_t . o_a = dh~_a . h_a (no need for o)
  dW_down = h^T (w dy)             (grouped over rows)
  dg, du from dh through SwiGLU, side by side as dgu = [dg du] (P x 2F);
  dx_t = sum_a dgu_a [W_gate W_up]^T   (one grouped GEMM over K = 2F)
  [dW_gate dW_up] = x^T dgu            (one grouped GEMM, the layer's gate|up layout)
`dh_swiglu_kernel` computes dh~ (its A operand gathered from dy by token, like the
forward's gate_up) and, in its epilogue on the float32 accumulator, the SwiGLU backward:
it reads h and the pre-activations once and writes dgu, w h (so dW_down = (w h)^T dy
needs no scaled copy of dy) and dw in parts per column block. dh~ itself never reaches
memory: a separate GEMM and SwiGLU kernel wrote and read it back (P x F, twice), and
launched once more. dx and dw come back to tokens by gathering each assignment's row
(`Alignment.row_of_assign_A`); `token_sum_kernel` gathers a token's K rows and sums them
in one pass: no atomic scatter.
Padding rows hold the sentinel assignment A: `dh_swiglu_kernel` reads no dy for them and
writes zeros into their dgu and w h; the dW GEMMs' gathered copies read token T - 1's x
and dy there (finite numbers), so padding adds exactly nothing to any weight gradient.
(Copying the gathered x out of the forward's gate_up kernel instead cost that kernel more
than this gather takes: 0.17 against 0.14 ms on an H200, Qwen3-30B-A3B at 8192 tokens.)
Rows past the real padded length (which only the device knows) lie beyond the last group
offset: `dh_swiglu_kernel` skips them, grouped GEMMs neither read them for weight
gradients nor count them, and no assignment's row is there, so the gathers never
read them.

torch's grouped GEMM needs 16-byte aligned strides and, in some builds, bfloat16; where
the widths or the dtype do not allow it, a per-expert loop over the same layout stands in
(it reads the offsets on the host: a sync, in the backward only).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moebench.impls.grouped import GROUPED_MM, grouped_mm_works
from moebench.impls.triton import tuning
from moebench.impls.triton.align import Alignment
from moebench.impls.triton.kernels import _block_coords, _block_rows
from moebench.pdl import after_previous_kernel, use_pdl


@dataclass
class Saved:
    """What the training forward keeps for the backward."""

    alignment: Alignment
    gate_pre_PF: torch.Tensor
    up_pre_PF: torch.Tensor
    h_PF: torch.Tensor
    top_k: int


@functools.cache
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this build has a grouped GEMM kernel for `dtype` here (some have bfloat16
    only); probed once per device and dtype."""
    return grouped_mm_works(device, dtype, backward=False)


def _grouped_ok(*tensors: torch.Tensor) -> bool:
    if GROUPED_MM is None or not _grouped_mm_runs(tensors[0].device, tensors[0].dtype):
        return False
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


def _per_expert_bounds(ends_E: torch.Tensor) -> list[tuple[int, int]]:
    return list(itertools.pairwise([0, *ends_E.tolist()]))


def rows_times_weights(a_PK: torch.Tensor, w_EKN: torch.Tensor, ends_E: torch.Tensor):
    """Row block of expert e times w_EKN[e], for every expert's run of rows (P x N; rows
    past the last end are left unset)."""
    if _grouped_ok(a_PK, w_EKN) and w_EKN.shape[1] * w_EKN.element_size() % 16 == 0:
        return GROUPED_MM(a_PK, w_EKN, offs=ends_E)
    out_PN = torch.zeros(a_PK.shape[0], w_EKN.shape[2], device=a_PK.device, dtype=a_PK.dtype)
    for expert, (start, end) in enumerate(_per_expert_bounds(ends_E)):
        out_PN[start:end] = a_PK[start:end] @ w_EKN[expert]
    return out_PN


def weight_grad(a_PK: torch.Tensor, b_PN: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """Per expert e: a_PK[rows of e]^T @ b_PN[rows of e], as E x K x N."""
    if _grouped_ok(a_PK, b_PN):
        return GROUPED_MM(a_PK.t(), b_PN, offs=ends_E)
    out = []
    for start, end in _per_expert_bounds(ends_E):
        out.append(a_PK[start:end].t() @ b_PN[start:end])
    return torch.stack(out)


@triton.jit
def dh_swiglu_kernel(
    dy_ptr,
    w_down_ptr,
    h_ptr,
    gate_pre_ptr,
    up_pre_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    gate_weight_ptr,
    dgate_up_ptr,
    h_weighted_ptr,
    dweight_parts_ptr,
    D,
    F,
    num_assign,
    top_k,
    num_blocks_m,
    stride_dy_t,
    stride_w_e,
    stride_w_f,
    stride_w_d,
    stride_p,
    stride_dgu_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One row block (one expert) x BLOCK_N columns of F: dh~ = dy[token] @ W_down^T
    (the A operand gathered from dy_TD, as gate_up gathers x), then the SwiGLU backward
    in the epilogue on the float32 accumulator: with w the row's routing weight, g and u
    the pre-activations, s = sigmoid(g) and dh = w dh~, writes dg = dh u s (1 + g (1 - s))
    and du = dh g s side by side as [dg du], w h, and this column block's part of
    dw = sum_f dh~ h into dweight_parts[row, column block]. The P x F tensors share the
    row stride stride_p; padding rows read no dy, so they write zeros."""
    num_blocks_n = tl.cdiv(F, BLOCK_N)
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, num_blocks_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, offs_m, ids, row_ok, offs_n, offs_n_wrapped = _block_rows(
        sorted_ids_ptr, block_expert_ptr, pid_m, pid_n, num_assign, F, BLOCK_M, BLOCK_N, False
    )
    token = (ids // top_k).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = dy_ptr + token[:, None] * stride_dy_t + offs_k[None, :]
    # B[d, f] = W_down[e, f, d]: the weight read transposed, no copy of it
    b_ptrs = (
        w_down_ptr
        + expert * stride_w_e
        + offs_k[:, None] * stride_w_d
        + offs_n_wrapped[None, :] * stride_w_f
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, (D + BLOCK_K - 1) // BLOCK_K):
        k_left = D - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_w_d

    weight = tl.load(gate_weight_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)
    col_ok = offs_n[None, :] < F
    mask = row_ok[:, None] & col_ok
    offsets = offs_m.to(tl.int64)[:, None] * stride_p + offs_n[None, :]
    dtype = dgate_up_ptr.dtype.element_ty
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dweight_parts_ptr + offs_m.to(tl.int64) * num_blocks_n + pid_n, tl.sum(acc * h, 1))
    tl.store(h_weighted_ptr + offsets, (h * weight[:, None]).to(dtype), mask=col_ok)
    gate = tl.load(gate_pre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_pre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dh = acc * weight[:, None]
    sig = tl.sigmoid(gate)
    dgu_offsets = offs_m.to(tl.int64)[:, None] * stride_dgu_p + offs_n[None, :]
    dgate = dh * up * sig * (1 + gate * (1 - sig))
    tl.store(dgate_up_ptr + dgu_offsets, dgate.to(dtype), mask=col_ok)
    tl.store(dgate_up_ptr + dgu_offsets + F, (dh * gate * sig).to(dtype), mask=col_ok)


def dh_swiglu(
    grad_y_TD: torch.Tensor, w_down_EFD: torch.Tensor, saved: Saved, gate_weight_A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgate_up_P2F = [dg du], weighted h_PF, dweight_P float32) of `dh_swiglu_kernel`,
    its block sizes from the tuner. Rows past the real padded length are left unset."""
    alignment = saved.alignment
    rows, F = saved.h_PF.shape
    D = w_down_EFD.shape[2]
    pre = (saved.h_PF, saved.gate_pre_PF, saved.up_pre_PF)
    assert all(t.stride() == (F, 1) for t in pre), "P x F activations must be contiguous"
    h_weighted_PF = torch.empty_like(saved.h_PF)
    dgate_up_P2F = saved.h_PF.new_empty(rows, 2 * F)
    out = {}

    def launch(config: dict) -> None:
        block_n = config["BLOCK_N"]
        num_blocks_n = triton.cdiv(F, block_n)
        num_blocks_m = alignment.max_blocks
        out["parts"] = parts = torch.empty(
            rows, num_blocks_n, device=grad_y_TD.device, dtype=torch.float32
        )
        dh_swiglu_kernel[(num_blocks_m * num_blocks_n,)](
            grad_y_TD, w_down_EFD, *pre,
            alignment.sorted_ids_P, alignment.block_expert_B, alignment.num_padded_1,
            gate_weight_A, dgate_up_P2F, h_weighted_PF, parts,
            D, F, alignment.num_assign, saved.top_k, num_blocks_m,
            grad_y_TD.stride(0), *w_down_EFD.stride(), F, 2 * F,
            BLOCK_M=config["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"],
            GROUP_M=config["GROUP_M"], num_warps=config["num_warps"],
            num_stages=config["num_stages"],
        )  # fmt: skip

    config = tuning.TUNER.choose(
        grad_y_TD.device,
        tuning.key("dh_swiglu", grad_y_TD, w_down_EFD, saved.top_k),
        lambda: tuning.candidates("dh_swiglu", alignment.block_m),
        launch,
    )
    launch(config)
    return dgate_up_P2F, h_weighted_PF, out["parts"].sum(1)


@triton.jit
def token_sum_kernel(
    rows_ptr,
    row_of_assign_ptr,
    out_ptr,
    D,
    top_k,
    stride_rows,
    stride_out,
    GATHER: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """out[t] = sum over t's K assignments a of rows[row(a)], summed in float32: row(a)
    = row_of_assign[a] if GATHER, else a (rows in assignment order)."""
    after_previous_kernel(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for slot in range(top_k):
        row = token * top_k + slot
        if GATHER:
            row = tl.load(row_of_assign_ptr + row).to(tl.int64)
        acc += tl.load(rows_ptr + row * stride_rows + offs_d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask)


def token_sum(
    rows_RD: torch.Tensor, top_k: int, row_of_assign_A: torch.Tensor | None = None
) -> torch.Tensor:
    """T x D: each token's sum over its K rows of rows_RD (`token_sum_kernel`): the rows
    of assignment a = t K + k are rows_RD[row_of_assign_A[a]], or rows_RD[a] without it."""
    D = rows_RD.shape[1]
    assert rows_RD.stride() == (D, 1), "rows must be contiguous"
    T = (rows_RD.shape[0] if row_of_assign_A is None else row_of_assign_A.numel()) // top_k
    out_TD = rows_RD.new_empty(T, D)
    block_d = min(1024, triton.next_power_of_2(D))
    pdl = use_pdl(rows_RD)
    token_sum_kernel[(T, triton.cdiv(D, block_d))](
        rows_RD, rows_RD if row_of_assign_A is None else row_of_assign_A, out_TD,
        D, top_k, D, D,
        GATHER=row_of_assign_A is not None, BLOCK_D=block_d, USE_PDL=pdl, num_warps=4,
        launch_pdl=pdl,
    )  # fmt: skip
    return out_TD


def fused_backward(
    saved: Saved,
    grad_y_TD: torch.Tensor,
    x_TD: torch.Tensor,
    gate_weights_TK: torch.Tensor,
    w_gate_up_ED2F: torch.Tensor,
    w_down_EFD: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx_TD, dgate_weights_TK, dW_gate_up, dW_down), each in its input's dtype."""
    alignment, K = saved.alignment, saved.top_k
    T = x_TD.shape[0]
    ends_E = alignment.padded_ends_E
    grad_y_TD = grad_y_TD.to(x_TD.dtype).contiguous()
    gate_weight_A = gate_weights_TK.reshape(-1).to(x_TD.dtype)
    dgate_up_P2F, h_weighted_PF, dweight_P = dh_swiglu(grad_y_TD, w_down_EFD, saved, gate_weight_A)
    # Padding rows (assignment A, token T) read token T - 1: see the module docstring.
    token_P = (alignment.sorted_ids_P // K).clamp_(max=T - 1)
    x_rows_PD = x_TD.index_select(0, token_P)
    dy_rows_PD = grad_y_TD.index_select(0, token_P)
    dW_down = weight_grad(h_weighted_PF, dy_rows_PD, ends_E)
    dW_gate_up = weight_grad(x_rows_PD, dgate_up_P2F, ends_E)
    dx_rows_PD = rows_times_weights(dgate_up_P2F, w_gate_up_ED2F.transpose(1, 2), ends_E)
    dx_TD = token_sum(dx_rows_PD, K, alignment.row_of_assign_A)
    return (
        dx_TD,
        dweight_P[alignment.row_of_assign_A].view(T, K).to(gate_weights_TK.dtype),
        dW_gate_up.to(w_gate_up_ED2F.dtype),
        dW_down.to(w_down_EFD.dtype),
    )
