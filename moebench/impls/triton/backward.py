"""The fused layer's backward: torch grouped GEMMs over the forward's padded row layout.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
A = T x K assignments, P padded rows (the forward's `Alignment`).

The training forward keeps the gate and up pre-activations and the SwiGLU output per
padded row, so nothing is recomputed. With y_t = sum_a w_a o_a, o_a = h_a W_down:
  dh~_a = dy_t W_down^T            (one grouped GEMM; dh = w_a dh~_a)
  dw_a  = dy_t . o_a = dh~_a . h_a (no need for o)
  dW_down = h^T (w dy)             (grouped over rows)
  dg, du from dh through SwiGLU; dx_t = sum_a dg_a W_gate^T + du_a W_up^T;
  dW_gate = x^T dg, dW_up = x^T du (grouped over rows)
Padding rows hold the sentinel assignment A (token T): they carry zeros, and every
scatter goes to a throw-away row A (or T) that is cut off. Rows past the real padded
length (which only the device knows) lie beyond the last group offset: grouped GEMMs
neither read them for weight gradients nor count them, and the scatters send them to
the throw-away row too.

torch's grouped GEMM needs 16-byte aligned strides and, in some builds, bfloat16; where
the widths or the dtype do not allow it, a per-expert loop over the same layout stands in
(it reads the offsets on the host: a sync, in the backward only).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

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
    A = alignment.num_assign
    ends_E = alignment.padded_ends_E
    ids_P = alignment.sorted_ids_P.long()
    valid_P1 = (ids_P < A)[:, None]
    token_P = ids_P // K  # padding (id A) -> token T, a throw-away row
    zero_row = torch.zeros(1, D, device=x_TD.device, dtype=x_TD.dtype)
    x_rows_PD = torch.cat([x_TD, zero_row])[token_P]
    dy_rows_PD = torch.cat([grad_y_TD.to(x_TD.dtype), zero_row])[token_P]
    weight_P1 = torch.cat([gate_weights_TK.reshape(-1).to(x_TD.dtype), zero_row[0, :1]])[ids_P]
    weight_P1 = weight_P1[:, None]

    dh_unscaled_PF = rows_times_weights(dy_rows_PD, w_down_EFD.transpose(1, 2), ends_E)
    h_PF, gate_PF, up_PF = saved.h_PF, saved.gate_pre_PF.float(), saved.up_pre_PF.float()
    # dw_a = dh~_a . h_a; rows past the padded length may hold garbage: masked, then
    # scattered to the throw-away slot A.
    dweight_P = torch.where(valid_P1, dh_unscaled_PF.float() * h_PF.float(), 0.0).sum(1)
    dweight_A = torch.zeros(A + 1, device=x_TD.device, dtype=torch.float32)
    dweight_A.index_put_((ids_P,), dweight_P)  # padding rows all write slot A: discarded
    dW_down = weight_grad(h_PF, dy_rows_PD * weight_P1, ends_E)

    dh_PF = dh_unscaled_PF.float() * weight_P1.float()
    sig_PF = torch.sigmoid(gate_PF)
    silu_PF = gate_PF * sig_PF
    dgate_PF = (dh_PF * up_PF * sig_PF * (1 + gate_PF * (1 - sig_PF))).to(x_TD.dtype)
    dup_PF = (dh_PF * silu_PF).to(x_TD.dtype)
    dW_gate = weight_grad(x_rows_PD, dgate_PF, ends_E)
    dW_up = weight_grad(x_rows_PD, dup_PF, ends_E)
    dx_rows_PD = rows_times_weights(dgate_PF, w_gate_EDF.transpose(1, 2), ends_E)
    dx_rows_PD = dx_rows_PD + rows_times_weights(dup_PF, w_up_EDF.transpose(1, 2), ends_E)
    dx_rows_PD = torch.where(valid_P1, dx_rows_PD, 0.0)
    dx_TD = torch.zeros(T + 1, D, device=x_TD.device, dtype=torch.float32)
    dx_TD.index_add_(0, token_P, dx_rows_PD.float())
    return (
        dx_TD[:T].to(x_TD.dtype),
        dweight_A[:A].view(T, K).to(gate_weights_TK.dtype),
        dW_gate.to(w_gate_EDF.dtype),
        dW_up.to(w_up_EDF.dtype),
        dW_down.to(w_down_EFD.dtype),
    )
