"""The fused layer's backward: GEMMs over the forward's padded row layout, each the
faster of a Triton kernel and torch's grouped GEMM, with the SwiGLU backward as one
Triton kernel between them.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
A = T x K assignments, P padded rows (the forward's `Alignment`).

The training forward keeps the gate and up pre-activations and the SwiGLU output per
padded row, so nothing is recomputed.
With y_t = sum_a w_a o_a, o_a = h_a W_down:
  dh~_a = dy_t W_down^T            (one grouped GEMM; dh = w_a dh~_a)
  dw_a  = dy_t . o_a = dh~_a . h_a (no need for o)
  dW_down = (w h)^T dy             (grouped over rows)
  dg, du from dh through SwiGLU, side by side as dgu = [dg du] (P x 2F);
  dx_t = sum_a dgu_a [W_gate W_up]^T   (one grouped GEMM over K = 2F)
  [dW_gate dW_up]^T = dgu^T x          (one grouped GEMM, E x 2F x D: the layer's layout)
The layer stores [W_gate W_up]^T (E x 2F x D, K-major) and W_down (E x F x D).
`swiglu_backward_kernel` reads dh~, h and the pre-activations once (bfloat16 in, float32
math) and writes dgu, w h (so dW_down needs no scaled copy of dy) and dw per
row (dw stored at the row's assignment): no float32 copies of P x F tensors. dx comes
back to tokens by gathering each assignment's row (`Alignment.row_of_assign_A`);
`token_sum_kernel` gathers a token's K rows and sums them in one pass: no atomic
scatter. `token_rows_kernel` gathers each padded row's x and dy in one launch.
Padding rows hold the sentinel assignment A: they gather token T - 1's x and dy (finite
numbers), and the SwiGLU backward writes zeros into their dgu and w h, so they add
exactly nothing to any weight gradient. (Copying the gathered x out of the forward's
gate_up kernel instead cost that kernel more than this gather takes: 0.17 against 0.14
ms on an H200, Qwen3-30B-A3B at 8192 tokens.) Rows past the real padded length (which
only the device knows) lie beyond the last group offset: grouped GEMMs neither read them
for weight gradients nor count them, and no assignment's row is there, so the gathers
never read them.

The two weight gradients go through `weight_grad.expert_weight_grad`: where experts see
a few rows each (the forward's row blocks at most FEW_ROWS_BLOCK_M) they are a streaming
write rather than FLOPs, and a Triton kernel that writes each tile once, from each
expert's real rows alone (`Alignment.rows_E`), races the grouped GEMM in the tuner.

dh~ and dx go through `rows_times_weights`: the forward's down kernel without its
scatter (`kernels.launch_rows`: each padded row times its block's expert's weights, in
place) raced against the grouped GEMM. Where experts see a few rows each it reads the
weights faster than the grouped GEMM (DeepSeek-V3 at 64 tokens: dx 3.03 against 4.23 ms
on an H200, NOTES.md version 8).

torch's grouped GEMM needs 16-byte aligned strides and, in some builds, bfloat16; where
the widths or the dtype do not allow it, every GEMM of the backward is the Triton kernel
alone: no per-expert loop, no host sync.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moebench.dependent_launch import release_dependents, wait_for_predecessor
from moebench.fast_launch import ceil_div, launch, next_power_of_2
from moebench.impls.grouped import GROUPED_MM, grouped_mm_works
from moebench.impls.triton import kernels, tuning
from moebench.impls.triton.align import Alignment
from moebench.impls.triton.weight_grad import GROUPED_GEMM, expert_weight_grad


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


def rows_times_weights(
    a_PK: torch.Tensor, w_EKN: torch.Tensor, alignment: Alignment, tuning_key: str
) -> torch.Tensor:
    """Every real padded row of expert e times w_EKN[e] (P x N; rows past the real padded
    length are left unset), by the forward's down kernel without its scatter
    (`kernels.launch_rows`) or torch's grouped GEMM, whichever the tuner found faster for
    `tuning_key`; the kernel alone where the grouped GEMM cannot run."""
    grouped = _grouped_ok(a_PK, w_EKN) and w_EKN.shape[1] * w_EKN.element_size() % 16 == 0

    def run(config: dict) -> torch.Tensor:
        if config == GROUPED_GEMM:
            return GROUPED_MM(a_PK, w_EKN, offs=alignment.padded_ends_E)
        out_PN = a_PK.new_empty(a_PK.shape[0], w_EKN.shape[2])
        kernels.launch_rows(a_PK, w_EKN, out_PN, alignment, config)
        return out_PN

    def configs() -> list[dict]:
        # the grouped GEMM last: Triton's interpreter (tests) takes the first untimed
        return tuning.candidates("down", alignment.block_m) + ([GROUPED_GEMM] if grouped else [])

    config = tuning.TUNER.choose(
        a_PK.device, tuning_key, configs, run, code=(kernels.down_kernel,), precompile=True
    )
    return run(config)


def weight_grad(a_PK: torch.Tensor, b_PN: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """Per expert e: a_PK[rows of e]^T @ b_PN[rows of e], as E x K x N, by torch's grouped
    GEMM (`_grouped_ok` says where it runs; elsewhere `expert_weight_grad` takes only the
    Triton kernel)."""
    return GROUPED_MM(a_PK.t(), b_PN, offs=ends_E)


@triton.jit
def swiglu_backward_kernel(
    dh_unscaled_ptr,
    h_ptr,
    gate_pre_ptr,
    up_pre_ptr,
    sorted_ids_ptr,
    gate_weight_ptr,
    dgate_up_ptr,
    h_weighted_ptr,
    dweight_ptr,
    F,
    num_assign,
    stride_p,
    stride_dgu_p,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Rows BLOCK_R of the padded layout: with w the row's routing weight and dh~ the
    unscaled gradient of h, dw = sum_f dh~ h (stored at the row's assignment, in
    dweight's dtype), and through SwiGLU (g, u pre-activations, dh = w dh~) dg = dh u s
    (1 + g (1 - s)) with s = sigmoid(g), du = dh g s, written side by side as [dg du];
    also w h. The P x F tensors share the row stride stride_p, dgu has its own; padding
    rows get zeros."""
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
        dtype = dgate_up_ptr.dtype.element_ty
        dgu_offsets = offs_r.to(tl.int64)[:, None] * stride_dgu_p + offs_f[None, :]
        tl.store(dgate_up_ptr + dgu_offsets, dgate.to(dtype), mask=store)
        tl.store(dgate_up_ptr + dgu_offsets + F, dup.to(dtype), mask=store)
        tl.store(h_weighted_ptr + offsets, (h * weight[:, None]).to(dtype), mask=store)
    tl.store(dweight_ptr + ids, dweight.to(dweight_ptr.dtype.element_ty), mask=row_ok)


def swiglu_backward(
    dh_unscaled_PF: torch.Tensor,
    saved: Saved,
    gate_weight_A: torch.Tensor,
    dweight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgate_up_P2F = [dg du], weighted h_PF, dweight_A in `dweight_dtype`, by
    assignment) of `swiglu_backward_kernel`."""
    alignment = saved.alignment
    rows, F = saved.h_PF.shape
    tensors = (dh_unscaled_PF, saved.h_PF, saved.gate_pre_PF, saved.up_pre_PF)
    assert all(t.stride() == (F, 1) for t in tensors), "P x F inputs must be contiguous"
    h_weighted_PF = torch.empty_like(saved.h_PF)
    dgate_up_P2F = saved.h_PF.new_empty(rows, 2 * F)
    dweight_A = torch.empty(alignment.num_assign, device=saved.h_PF.device, dtype=dweight_dtype)
    block_r = 16  # P is a multiple of BLOCK_M >= 16
    launch(
        swiglu_backward_kernel, (rows // block_r,),
        *tensors, alignment.sorted_ids_P, gate_weight_A, dgate_up_P2F, h_weighted_PF,
        dweight_A, F, alignment.num_assign, F, 2 * F,
        BLOCK_R=block_r, BLOCK_F=min(256, next_power_of_2(F)), num_warps=4,
    )  # fmt: skip
    return dgate_up_P2F, h_weighted_PF, dweight_A


@triton.jit
def token_rows_kernel(
    x_ptr,
    dy_ptr,
    sorted_ids_ptr,
    x_rows_ptr,
    dy_rows_ptr,
    D,
    top_k,
    last_token,
    stride_x,
    stride_dy,
    BLOCK_D: tl.constexpr,
):
    """Padded row program_id(0), columns block program_id(1): the row's token's x and dy
    (token = assignment // top_k, at most last_token: padding's sentinel reads the last
    token), in the rows' dtype."""
    row = tl.program_id(0).to(tl.int64)
    token = tl.minimum(tl.load(sorted_ids_ptr + row) // top_k, last_token).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs_d < D
    x = tl.load(x_ptr + token * stride_x + offs_d, mask=mask)
    dy = tl.load(dy_ptr + token * stride_dy + offs_d, mask=mask)
    tl.store(x_rows_ptr + row * D + offs_d, x.to(x_rows_ptr.dtype.element_ty), mask=mask)
    tl.store(dy_rows_ptr + row * D + offs_d, dy.to(dy_rows_ptr.dtype.element_ty), mask=mask)


def token_rows(
    x_TD: torch.Tensor, dy_TD: torch.Tensor, alignment: Alignment, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_PD, dy_PD): each padded row's token's x and output gradient, in x's dtype, in
    one launch (`token_rows_kernel`; padding rows read the last token: finite numbers
    that the SwiGLU backward's zeros cancel)."""
    rows, (T, D) = alignment.max_rows, x_TD.shape
    x_TD, dy_TD = x_TD.contiguous(), dy_TD.contiguous()
    x_rows_PD = x_TD.new_empty(rows, D)
    dy_rows_PD = x_TD.new_empty(rows, D)
    block_d = min(1024, next_power_of_2(D))
    launch(
        token_rows_kernel, (rows, ceil_div(D, block_d)),
        x_TD, dy_TD, alignment.sorted_ids_P, x_rows_PD, dy_rows_PD,
        D, top_k, T - 1, x_TD.stride(0), dy_TD.stride(0),
        BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return x_rows_PD, dy_rows_PD


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
    PDL: tl.constexpr,
):
    """out[t] = sum over t's K assignments a of rows[row(a)], summed in float32: row(a)
    = row_of_assign[a] if GATHER, else a (rows in assignment order)."""
    wait_for_predecessor(PDL)
    release_dependents(PDL)
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
    rows_RD: torch.Tensor,
    top_k: int,
    row_of_assign_A: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """T x D: each token's sum over its K rows of rows_RD (`token_sum_kernel`): the rows
    of assignment a = t K + k are rows_RD[row_of_assign_A[a]], or rows_RD[a] without it;
    `pdl`: launched with programmatic dependent launch (`moebench.dependent_launch`)."""
    D = rows_RD.shape[1]
    assert rows_RD.stride() == (D, 1), "rows must be contiguous"
    T = (rows_RD.shape[0] if row_of_assign_A is None else row_of_assign_A.numel()) // top_k
    out_TD = rows_RD.new_empty(T, D)
    block_d = min(1024, next_power_of_2(D))
    launch(
        token_sum_kernel, (T, ceil_div(D, block_d)),
        rows_RD, rows_RD if row_of_assign_A is None else row_of_assign_A, out_TD,
        D, top_k, D, D,
        GATHER=row_of_assign_A is not None, BLOCK_D=block_d, PDL=pdl, num_warps=4,
        launch_pdl=pdl,
    )  # fmt: skip
    return out_TD


def fused_backward(
    saved: Saved,
    grad_y_TD: torch.Tensor,
    x_TD: torch.Tensor,
    gate_weights_TK: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    w_down_EFD: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx_TD, dgate_weights_TK, dW_gate_up, dW_down), each in its input's dtype and
    the weights' gradients in the layer's layouts."""
    alignment, K = saved.alignment, saved.top_k
    T = x_TD.shape[0]
    ends_E = alignment.padded_ends_E
    # Padding rows (assignment A, token T) read token T - 1: see the module docstring.
    x_rows_PD, dy_rows_PD = token_rows(x_TD, grad_y_TD, alignment, K)
    gate_weight_A = gate_weights_TK.reshape(-1).to(x_TD.dtype)

    def key(name: str, w_EKN: torch.Tensor) -> str:
        return tuning.key(name, x_TD, w_down_EFD, K, tuning.weight_layout(w_EKN))

    w_down_EDF = w_down_EFD.transpose(1, 2)
    dh_unscaled_PF = rows_times_weights(dy_rows_PD, w_down_EDF, alignment, key("dh", w_down_EDF))
    dgate_up_P2F, h_weighted_PF, dweight_A = swiglu_backward(
        dh_unscaled_PF, saved, gate_weight_A, gate_weights_TK.dtype
    )

    def expert_grads(name: str, a_PM: torch.Tensor, b_PD: torch.Tensor, w_EKN: torch.Tensor):
        grouped = weight_grad if _grouped_ok(a_PM, b_PD) else None
        return expert_weight_grad(
            a_PM, b_PD, ends_E, alignment.block_m, key(f"weight_grad_{name}", w_EKN), grouped,
            alignment.rows_E,
        )  # fmt: skip

    dW_down_EFD = expert_grads("down", h_weighted_PF, dy_rows_PD, w_down_EFD)
    dW_gate_up_E2FD = expert_grads(
        "gate_up", dgate_up_P2F, x_rows_PD, w_gate_up_E2FD.transpose(1, 2)
    )
    dx_rows_PD = rows_times_weights(
        dgate_up_P2F, w_gate_up_E2FD, alignment, key("dx", w_gate_up_E2FD)
    )
    dx_TD = token_sum(dx_rows_PD, K, alignment.row_of_assign_A)
    return (
        dx_TD,
        dweight_A.view(T, K),
        dW_gate_up_E2FD.to(w_gate_up_E2FD.dtype),
        dW_down_EFD.to(w_down_EFD.dtype),
    )
