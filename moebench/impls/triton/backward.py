"""The fused layer's backward: torch grouped GEMMs over the forward's padded row layout,
with the SwiGLU backward as one Triton kernel between them.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
A = T x K assignments, P padded rows (the forward's `Alignment`).

The training forward keeps the gate and up pre-activations and the SwiGLU output per
padded row, so nothing is recomputed. With y_t = sum_a w_a o_a, o_a = h_a W_down:
  dh~_a = dy_t W_down^T            (one grouped GEMM; dh = w_a dh~_a)
  dw_a  = dy_t . o_a = dh~_a . h_a (no need for o)
  dW_down = h^T (w dy)             (grouped over rows)
  dg, du from dh through SwiGLU; dx_t = sum_a dg_a W_gate^T + du_a W_up^T;
  dW_gate = x^T dg, dW_up = x^T du (grouped over rows)
`swiglu_backward_kernel` reads dh~, h and the pre-activations once (bfloat16 in, float32
math) and writes dg, du, w h (so dW_down = (w h)^T dy needs no scaled copy of dy) and
dw per row: no float32 copies of P x F tensors. dx and dw come back to tokens by gathering
each assignment's row (`Alignment.row_of_assign_A`); `token_sum_kernel` gathers both dx
GEMMs' rows of a token and sums them and its K slots in one pass: no atomic scatter, no
P x D sum or gathered copy.
Padding rows hold the sentinel assignment A (token T, a zero row): the kernel writes
zeros there. Rows past the real padded length (which only the device knows) lie beyond
the last group offset: grouped GEMMs neither read them for weight gradients nor count
them, and no assignment's row is there, so the gathers never read them.

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
from moebench.impls.triton.align import Alignment


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
def swiglu_backward_kernel(
    dh_unscaled_ptr,
    h_ptr,
    gate_pre_ptr,
    up_pre_ptr,
    sorted_ids_ptr,
    gate_weight_ptr,
    dgate_ptr,
    dup_ptr,
    h_weighted_ptr,
    dweight_ptr,
    F,
    num_assign,
    stride_p,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Rows BLOCK_R of the padded layout: with w the row's routing weight and dh~ the
    unscaled gradient of h, dw = sum_f dh~ h, and through SwiGLU (g, u pre-activations,
    dh = w dh~) dg = dh u s (1 + g (1 - s)) with s = sigmoid(g), du = dh g s; also w h.
    All P x F inputs and outputs share the row stride; padding rows get zeros."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ids = tl.load(sorted_ids_ptr + offs_r)
    row_ok = ids < num_assign
    weight = tl.load(gate_weight_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)
    dweight = tl.zeros((BLOCK_R,), dtype=tl.float32)
    row_offsets = offs_r.to(tl.int64)[:, None] * stride_p
    for first in range(0, F, BLOCK_F):
        offs_f = first + tl.arange(0, BLOCK_F)
        offsets = row_offsets + offs_f[None, :]
        mask = row_ok[:, None] & (offs_f[None, :] < F)
        dh_unscaled = tl.load(dh_unscaled_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_pre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_pre_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dweight += tl.sum(dh_unscaled * h, 1)
        dh = dh_unscaled * weight[:, None]
        sig = tl.sigmoid(gate)
        dgate = dh * up * sig * (1 + gate * (1 - sig))
        dup = dh * gate * sig
        store = offs_f[None, :] < F  # padding rows too: their zeros
        dtype = dgate_ptr.dtype.element_ty
        tl.store(dgate_ptr + offsets, dgate.to(dtype), mask=store)
        tl.store(dup_ptr + offsets, dup.to(dtype), mask=store)
        tl.store(h_weighted_ptr + offsets, (h * weight[:, None]).to(dtype), mask=store)
    tl.store(dweight_ptr + offs_r, dweight)


def swiglu_backward(
    dh_unscaled_PF: torch.Tensor, saved: Saved, gate_weight_A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgate_PF, dup_PF, weighted h_PF, dweight_P float32) of `swiglu_backward_kernel`."""
    alignment = saved.alignment
    rows, F = saved.h_PF.shape
    tensors = (dh_unscaled_PF, saved.h_PF, saved.gate_pre_PF, saved.up_pre_PF)
    assert all(t.stride() == (F, 1) for t in tensors), "P x F inputs must be contiguous"
    dgate_PF, dup_PF, h_weighted_PF = (torch.empty_like(saved.h_PF) for _ in range(3))
    dweight_P = torch.empty(rows, device=dh_unscaled_PF.device, dtype=torch.float32)
    block_r = 16  # P is a multiple of BLOCK_M >= 16
    swiglu_backward_kernel[(rows // block_r,)](
        *tensors, alignment.sorted_ids_P, gate_weight_A, dgate_PF, dup_PF, h_weighted_PF,
        dweight_P, F, alignment.num_assign, F,
        BLOCK_R=block_r, BLOCK_F=min(256, triton.next_power_of_2(F)), num_warps=4,
    )  # fmt: skip
    return dgate_PF, dup_PF, h_weighted_PF, dweight_P


@triton.jit
def token_sum_kernel(
    a_ptr,
    b_ptr,
    row_of_assign_ptr,
    out_ptr,
    D,
    top_k,
    stride_rows,
    stride_out,
    BLOCK_D: tl.constexpr,
):
    """out[t] = sum over t's K assignments a of (a_rows[row(a)] + b_rows[row(a)]), summed
    in float32: the gather, the add of the two GEMMs' outputs and the sum over slots in
    one pass over the rows."""
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for slot in range(top_k):
        row = tl.load(row_of_assign_ptr + token * top_k + slot).to(tl.int64)
        acc += tl.load(a_ptr + row * stride_rows + offs_d, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(b_ptr + row * stride_rows + offs_d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask)


def token_sum(a_PD: torch.Tensor, b_PD: torch.Tensor, alignment: Alignment, top_k: int):
    """T x D: each token's sum over its K rows of a_PD + b_PD (`token_sum_kernel`)."""
    D = a_PD.shape[1]
    assert a_PD.stride() == b_PD.stride() == (D, 1), "row blocks must be contiguous"
    T = alignment.num_assign // top_k
    out_TD = torch.empty(T, D, device=a_PD.device, dtype=a_PD.dtype)
    block_d = min(1024, triton.next_power_of_2(D))
    token_sum_kernel[(T, triton.cdiv(D, block_d))](
        a_PD, b_PD, alignment.row_of_assign_A, out_TD, D, top_k, D, D,
        BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out_TD


def fused_backward(
    saved: Saved,
    grad_y_TD: torch.Tensor,
    x_TD: torch.Tensor,
    gate_weights_TK: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    w_down_EFD: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx_TD, dgate_weights_TK, dW_gate, dW_up, dW_down), each in its input's dtype."""
    alignment, K = saved.alignment, saved.top_k
    T, D = x_TD.shape
    ends_E = alignment.padded_ends_E
    token_P = alignment.sorted_ids_P // K  # padding (id A) -> token T, a zero row
    zero_row = torch.zeros(1, D, device=x_TD.device, dtype=x_TD.dtype)
    x_rows_PD = torch.cat([x_TD, zero_row])[token_P]
    dy_rows_PD = torch.cat([grad_y_TD.to(x_TD.dtype), zero_row])[token_P]
    gate_weight_A = gate_weights_TK.reshape(-1).to(x_TD.dtype)

    dh_unscaled_PF = rows_times_weights(dy_rows_PD, w_down_EFD.transpose(1, 2), ends_E)
    dgate_PF, dup_PF, h_weighted_PF, dweight_P = swiglu_backward(
        dh_unscaled_PF, saved, gate_weight_A
    )
    dW_down = weight_grad(h_weighted_PF, dy_rows_PD, ends_E)
    dW_gate = weight_grad(x_rows_PD, dgate_PF, ends_E)
    dW_up = weight_grad(x_rows_PD, dup_PF, ends_E)
    dx_gate_rows_PD = rows_times_weights(dgate_PF, w_gate_EDF.transpose(1, 2), ends_E)
    dx_up_rows_PD = rows_times_weights(dup_PF, w_up_EDF.transpose(1, 2), ends_E)
    dx_TD = token_sum(dx_gate_rows_PD, dx_up_rows_PD, alignment, K)
    return (
        dx_TD,
        dweight_P[alignment.row_of_assign_A].view(T, K).to(gate_weights_TK.dtype),
        dW_gate.to(w_gate_EDF.dtype),
        dW_up.to(w_up_EDF.dtype),
        dW_down.to(w_down_EFD.dtype),
    )
