"""`triton`: moebench's own fused MoE layer on Triton kernels (CUDA only).

Files: `align.py` (token -> expert alignment on the device), `kernels.py` (the two fused
grouped GEMMs), `tma.py` (their TMA-load tiles, raced beside them on Hopper),
`gluon_down.py` and `gluon_gate_up.py` (the down GEMM and inference's gate_up
warp-specialised in Gluon, raced unless `$MOEBENCH_GLUON_WS=0`; `gluon_common.py` what
the two share), `merge_tail.py` (tiles of both GEMMs that compute an expert's short last
block with the block before it, raced unless `$MOEBENCH_MERGE_TAIL=0`), `tuning.py`
(block sizes, tuned once per device, shape and token bucket, cached on disk; `tuned/`
holds the choices moebench ships per device), `layer.py` (the module and its autograd
function), `backward.py` (the backward: each GEMM the down kernel or torch's grouped
GEMM, whichever the tuner timed faster, and two Triton kernels), `weight_grad.py` (the
weight gradients of experts with few rows: a write-bound Triton kernel raced against the
grouped GEMM), `NOTES.md` (each version measured on the H200, and what is left). Triton
is imported only when a layer is built, so moebench runs where Triton is not installed.
"""

from __future__ import annotations

from torch import nn

from moebench.case import Case
from moebench.registry import register
from moebench.weights import ExpertWeights


@register(
    "triton",
    family="triton",
    description="dropless: fused Triton grouped GEMMs (gathered loads, SwiGLU and "
    "routing-weight epilogues), tuned block sizes cached per device",
    devices=("cuda",),
    dtypes=("bfloat16", "float16"),
)
def build(weights: ExpertWeights, case: Case) -> nn.Module:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "the 'triton' implementation needs the triton package: pip install triton"
        ) from exc
    from moebench.impls.triton.layer import TritonMoE

    return TritonMoE(weights, case)
