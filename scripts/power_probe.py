"""Whether the card keeps its matrix rate under sustained load, on a CUDA device:

    python scripts/power_probe.py [--seconds 4] [--out probe.json]

moebench's ceilings (`measure.ceilings`) take the fastest of a few products, about 40 ms
of work, while a large layer is timed as the median of back-to-back calls. If the card
lowers its clock under sustained tensor-core load (power cap), the two are measured in
different conditions. This script times, each for `--seconds`, back to back under CUDA
events, while a thread samples the SM clock, the power draw and the throttle reasons:

1. an 8192^3 bf16 product on N(0, 1) data (the ceiling's own product);
2. the same with one operand at the scale of moebench's random weights;
3. a 1 GiB float32 copy (the bandwidth ceiling);
4. the fused `triton` layer, un-graphed, on Mixtral-8x7B at 8192 and 1024 tokens.

Prints, per phase, the rate over its first 40 ms, its median over the last half, and the
SM clock and power over both; writes every sample to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from moebench import registry
from moebench.case import Case, Workload
from moebench.presets import PRESETS
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs


class Sampler(threading.Thread):
    """(host seconds, SM MHz, watts, throttle-reason bits) every `period_s`, via NVML."""

    def __init__(self, period_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.period_s = period_s
        self.samples: list[tuple[float, int, float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        nvml, handle = self.nvml, self.handle
        while not self.stopped.is_set():
            self.samples.append(
                (
                    time.perf_counter(),
                    nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                    nvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                    nvml.nvmlDeviceGetCurrentClocksEventReasons(handle),
                )
            )
            time.sleep(self.period_s)

    def between(self, start: float, end: float) -> list[tuple[float, int, float, int]]:
        return [s for s in self.samples if start <= s[0] <= end]


def sustained(call, seconds: float) -> list[tuple[float, float]]:
    """(host time at launch, device ms) of `call()` repeated back to back for `seconds`."""
    events = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        launched = time.perf_counter()
        start.record()
        call()
        end.record()
        events.append((launched, start, end))
        if len(events) % 16 == 0:
            end.synchronize()  # keep the host near the device, so host times mean something
    torch.cuda.synchronize()
    return [(t, s.elapsed_time(e)) for t, s, e in events]


def summary(name: str, work: float, unit: str, timed, sampler: Sampler) -> dict:
    """The phase's rate over its first 40 ms and its median over its last half."""
    first, elapsed, early = [], 0.0, []
    for t, ms in timed:
        if elapsed >= 40:
            break
        first.append(ms)
        early.append(t)
        elapsed += ms
    late = timed[len(timed) // 2 :]
    early_nvml = sampler.between(timed[0][0], timed[0][0] + 0.05)
    late_nvml = sampler.between(late[0][0], late[-1][0])

    def mean(values):
        return statistics.fmean(values) if values else float("nan")

    row = {
        "phase": name,
        "calls": len(timed),
        f"first_40ms_best_{unit}": work / min(first),
        f"first_40ms_median_{unit}": work / statistics.median(first),
        f"late_median_{unit}": work / statistics.median(ms for _, ms in late),
        "early_sm_mhz": mean([s[1] for s in early_nvml]),
        "late_sm_mhz": mean([s[1] for s in late_nvml]),
        "late_watts": mean([s[2] for s in late_nvml]),
        "late_throttle_bits": sorted({s[3] for s in late_nvml}),
        "ms": [ms for _, ms in timed],
    }
    print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items() if k != "ms"})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rest", type=float, default=3.0, help="idle seconds between phases")
    parser.add_argument("--out", default="power_probe.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    sampler = Sampler()
    sampler.start()
    rows = []

    def phase(name: str, call, work: float, unit: str) -> None:
        call()
        torch.cuda.synchronize()
        time.sleep(args.rest)
        rows.append(summary(name, work, unit, sustained(call, args.seconds), sampler))

    n = 8192
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    phase("mm 8192^3 bf16, N(0,1)", lambda a=a, b=b: a @ b, 2 * n**3 / 1e9, "tflops")
    b_small = (0.02 * torch.randn(n, n, device=device)).to(torch.bfloat16)
    phase("mm 8192^3 bf16, weights 0.02", lambda a=a, b=b_small: a @ b, 2 * n**3 / 1e9, "tflops")
    a = b = b_small = None  # free them before the copy buffers
    src = torch.randn(1 << 28, device=device)
    dst = torch.empty_like(src)
    phase("copy 1 GiB", lambda s=src, d=dst: d.copy_(s), 2 * src.numel() * 4 / 1e6, "gbps")
    src = dst = None
    torch.cuda.empty_cache()

    with torch.no_grad():
        for tokens in (8192, 1024):
            case = Case(PRESETS["mixtral-8x7b"], Workload(tokens, 1, "forward"), "triton",
                        device="cuda", dtype="bfloat16")  # fmt: skip
            layer = registry.get("triton").build(make_weights(case), case)
            x_TD = make_inputs(case, 1)[0]
            flops = 6 * tokens * case.shape.top_k * case.shape.hidden * case.shape.ffn
            layer(x_TD)  # tunes outside the timing
            phase(f"triton mixtral {tokens}", lambda f=layer, x=x_TD: f(x), flops / 1e9, "tflops")
            layer = None
            torch.cuda.empty_cache()
    sampler.stopped.set()
    with open(args.out, "w") as f:
        json.dump({"phases": rows, "nvml": sampler.samples}, f)


if __name__ == "__main__":
    main()
