"""The device's own ceilings, measured once per run, so `roofline_frac` is against what
this card does rather than a datasheet: copy bandwidth (bytes read + written) and the
matrix-product rate per dtype."""

from __future__ import annotations

import torch

from moebench.measure.timing import TimingPlan, time_repeats
from moebench.weights import torch_dtype


def measure_ceilings(device: str, dtypes: list[str]) -> dict[str, float]:
    """{"copy_gbps": ..., "matmul_tflops_<dtype>": ...} for `device`."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    plan = TimingPlan(budget_ms=300, warmup=2, min_repeats=5, max_repeats=30, flush_l2=False)
    copy_elems = (1 << 28) if cuda else (1 << 23)  # 1 GiB / 32 MiB of float32
    src = torch.randn(copy_elems, device=dev)
    dst = torch.empty_like(src)
    copy_ms = min(time_repeats(lambda _, s=src, d=dst: d.copy_(s), dev, plan))
    ceilings = {"copy_gbps": 2 * copy_elems * 4 / (copy_ms * 1e-3) / 1e9}
    src = dst = None  # free the copy buffers before the matrices
    n = 8192 if cuda else 512
    for name in dtypes:
        dtype = torch_dtype(name)
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        mm_ms = min(time_repeats(lambda _, a=a, b=b: a @ b, dev, plan))
        ceilings[f"matmul_tflops_{name}"] = 2 * n**3 / (mm_ms * 1e-3) / 1e12
    return ceilings
