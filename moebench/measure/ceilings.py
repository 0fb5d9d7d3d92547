"""The device's own ceilings, measured once per run, so `roofline_frac` is against what
this card does rather than a datasheet: copy bandwidth (bytes read + written) and the
matrix-product rate per dtype; and the host's own speed (`host_op_us`).

The matrix rate is the rate the card sustains. A large layer is timed as the median of
back-to-back calls, and under back-to-back tensor-core work a card lowers its clock to
stay inside its power limit. On an H200 (700 W) an 8192^3 bfloat16 product ran at 819
TFLOP/s for its first ~50 ms and 686 after that, at 1534 MHz against 1980, with NVML
naming the software power cap (`scripts/power_probe.py`). Against the first figure, a
compute-bound layer timed under that cap is held to a rate the card does not keep. So on
CUDA the product runs back to back for `SUSTAINED_MS`, and `matmul_tflops_<dtype>` (the
floor's rate) is its median over the last half; `matmul_burst_tflops_<dtype>`, the
fastest of the first products (the figure moebench recorded before), is kept beside it.
The copy bandwidth is not power-bound (4242 GB/s at first, 4234 sustained): the fastest
of a short burst.

An un-graphed call of a few tokens is bound by its host (Python, torch's dispatch, the
launches), whatever its device: on the lent H200 machines the same code's one-token
forwards took 0.15 ms in one run and 0.36 in another (triton/NOTES.md, version 23).
`host_op_us` is that host's time to dispatch one small torch op from Python, on CPU
tensors so that no device takes part, and `moebench compare` names two runs whose hosts
differ by a quarter or more (`compare.drift.HOST_SPEED_NOTE`).
"""

from __future__ import annotations

import statistics
import time

import torch

from moebench.measure.timing import TimingPlan, time_back_to_back, time_repeats
from moebench.weights import torch_dtype

SUSTAINED_MS = 1000.0  # the H200 settles at its power cap within ~100 ms
BURST_CALLS = 30  # the first products, before the clock drops: the burst rate
HOST_OP_CALLS = 1000  # a round of `host_op_us`: 3 ops each, a few ms
HOST_OP_ROUNDS = 7


def measure_ceilings(device: str, dtypes: list[str]) -> dict[str, float]:
    """{"copy_gbps": ..., "matmul_tflops_<dtype>": sustained rate,
    "matmul_burst_tflops_<dtype>": burst rate} for `device` (module docstring)."""
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
        product = lambda _, a=a, b=b: a @ b  # noqa: E731
        if cuda:
            samples_ms = time_back_to_back(product, dev, SUSTAINED_MS, BURST_CALLS)
        else:  # no power cap to wait for: the short plan, its later half as the sustained
            samples_ms = time_repeats(product, dev, plan)
        sustained, burst = sustained_and_burst(2 * n**3 / 1e12, samples_ms)
        ceilings[f"matmul_tflops_{name}"] = sustained
        ceilings[f"matmul_burst_tflops_{name}"] = burst
    ceilings["host_op_us"] = host_op_us()
    return ceilings


def host_op_us() -> float:
    """Microseconds the host takes to dispatch one small torch op from Python: an empty
    16-element CPU tensor, a view of it and an in-place add, HOST_OP_CALLS times a round,
    the median of HOST_OP_ROUNDS rounds (module docstring)."""
    rounds = []
    for _ in range(HOST_OP_ROUNDS):
        started = time.perf_counter()
        for _ in range(HOST_OP_CALLS):
            torch.empty(16).view(4, 4).add_(1.0)
        rounds.append((time.perf_counter() - started) / (3 * HOST_OP_CALLS) * 1e6)
    return statistics.median(rounds)


def sustained_and_burst(work: float, samples_ms: list[float]) -> tuple[float, float]:
    """(work per second at the median of the later half of `samples_ms`, the calls' times
    in order; at the fastest of the first BURST_CALLS)."""
    sustained_ms = statistics.median(samples_ms[len(samples_ms) // 2 :])
    return work / (sustained_ms * 1e-3), work / (min(samples_ms[:BURST_CALLS]) * 1e-3)
