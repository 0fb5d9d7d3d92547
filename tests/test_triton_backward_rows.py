"""The fused layer's backward between its GEMMs, kernel by kernel: the gather of each
padded row's x and dy (`token_rows`) and the SwiGLU backward's routing-weight gradient,
stored by assignment. Runs on CUDA, or on CPU in Triton's interpreter
(TRITON_INTERPRET=1, float16); skipped without either. The whole backward against
`reference` is in test_triton.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import KERNEL_DEVICE, needs_kernels


def _alignment(tokens: int, experts: int, top_k: int, block_m: int, seed: int = 0):
    from moebench.impls.triton.align import align_to_blocks

    generator = torch.Generator().manual_seed(seed)
    ids_TK = torch.stack(
        [torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)]
    )
    return align_to_blocks(ids_TK.to(KERNEL_DEVICE), experts, block_m)


@needs_kernels
@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden"), [(5, 6, 2, 40), (70, 16, 4, 1100)]
)
def test_token_rows_gathers_each_rows_token(tokens, experts, top_k, hidden):
    """Every padded row, those past the real padded length too, gets its token's x and
    dy (dy cast to x's dtype); padding rows get the last token's (finite numbers). The
    widths are not powers of two, and 1100 spans two column blocks."""
    from moebench.impls.triton.backward import token_rows

    alignment = _alignment(tokens, experts, top_k, block_m=16)
    generator = torch.Generator().manual_seed(1)
    x_TD = torch.randn(tokens, hidden, generator=generator).half().to(KERNEL_DEVICE)
    dy_TD = torch.randn(tokens, hidden, generator=generator).to(KERNEL_DEVICE)  # float32
    x_rows_PD, dy_rows_PD = token_rows(x_TD, dy_TD, alignment, top_k)

    sorted_ids_P = alignment.sorted_ids_P.long().cpu()
    assert (sorted_ids_P == alignment.num_assign).any(), "the case must hold padding rows"
    token_P = (sorted_ids_P // top_k).clamp(max=tokens - 1)
    assert x_rows_PD.dtype == dy_rows_PD.dtype == torch.float16
    assert x_rows_PD.shape == dy_rows_PD.shape == (alignment.max_rows, hidden)
    assert torch.equal(x_rows_PD.cpu(), x_TD.cpu()[token_P])
    assert torch.equal(dy_rows_PD.cpu(), dy_TD.cpu().half()[token_P])


@needs_kernels
def test_swiglu_backward_stores_each_assignments_weight_gradient():
    """dw of assignment a = sum_f dh~ h over a's row, in the gates' dtype, wherever the
    alignment put that row; padding rows write none (every assignment's slot is set)."""
    from moebench.impls.triton.backward import Saved, swiglu_backward

    tokens, experts, top_k, width = 19, 5, 2, 48
    alignment = _alignment(tokens, experts, top_k, block_m=16, seed=2)
    rows = alignment.max_rows
    generator = torch.Generator().manual_seed(3)

    def rows_of(scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(rows, width, generator=generator) * scale).half().to(KERNEL_DEVICE)

    h_PF, gate_PF, up_PF, dh_PF = rows_of(), rows_of(), rows_of(), rows_of(0.5)
    gate_weight_A = torch.rand(tokens * top_k, generator=generator).half().to(KERNEL_DEVICE)
    saved = Saved(alignment, gate_PF, up_PF, h_PF, top_k)
    _, _, dweight_A = swiglu_backward(dh_PF, saved, gate_weight_A, torch.float32)

    row_A = alignment.row_of_assign_A.long().cpu()
    expected_A = (dh_PF.float().cpu()[row_A] * h_PF.float().cpu()[row_A]).sum(dim=1)
    assert dweight_A.dtype == torch.float32 and dweight_A.shape == (tokens * top_k,)
    torch.testing.assert_close(dweight_A.cpu(), expected_A, rtol=1e-4, atol=1e-4)
