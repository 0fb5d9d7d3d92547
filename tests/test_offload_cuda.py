"""The offloading layer's copies on CUDA: a forward never reads a slot before the copy
into it has landed. Skipped without a GPU; run on the GPU machine with
`python -m pytest -q tests/test_offload_cuda.py -s`."""

from __future__ import annotations

import pytest
import torch

from moebench.case import Case, LayerShape, Workload
from moebench.impls.offload import OffloadMoE
from moebench.impls.reference import reference_output
from moebench.measure.case_run import WeightCache, measure_case
from moebench.measure.check import TOKEN_TOLERANCE, TOLERANCE, max_token_error, relative_error
from moebench.measure.timing import TimingPlan
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Experts of 48 MiB each in bfloat16: a copy takes milliseconds, long enough for a forward
# that does not wait for it to read the slot first.
SHAPE = LayerShape(hidden=2048, ffn=4096, num_experts=8, top_k=1)


def _case(tokens: int, cache: int | float, seed: int = 0) -> Case:
    return Case(
        SHAPE,
        Workload(tokens, 1, "forward"),
        "offload",
        device="cuda",
        dtype="bfloat16",
        seed=seed,
        options=(("cache_experts", cache),),
    )


@pytest.mark.parametrize("trial", range(5))
def test_slots_filled_at_the_end_of_a_forward_are_waited_for(trial):
    """One token first (one miss; the other 7 experts are copied in at the end of that
    forward, the warm-up fill), then back to back, with no synchronisation, forwards
    whose tokens hit the filled slots. Slots start as NaN: a read before its copy lands
    shows as NaN or as a wrong token."""
    case = _case(1, 1.0, seed=trial)
    weights = make_weights(case)
    layer = OffloadMoE(weights, case)
    for cache in (layer.cache_gate_CDF, layer.cache_up_CDF, layer.cache_down_CFD):
        cache.fill_(float("nan"))
    big = case.with_(workload=Workload(512, 1, "forward"))
    x1 = make_inputs(case, 1)[0]
    xs = make_inputs(big, 4)
    torch.cuda.synchronize()
    with torch.inference_mode():
        outputs = [layer(x1)] + [layer(x) for x in xs]  # no sync in between
    torch.cuda.synchronize()
    for x, y in zip([x1, *xs], outputs):
        ref = reference_output(weights, x)
        assert relative_error(y, ref) <= TOLERANCE["bfloat16"]
        assert max_token_error(y, ref)[0] <= TOKEN_TOLERANCE["bfloat16"]
    assert layer.extra_metrics()["offload_hit_rate"] == 1.0  # every later forward hit


def test_offload_case_passes_the_drift_check_and_reports_its_slots():
    """The harness checks the last timed output too: a race shows as 'drifted'."""
    case = _case(256, 0.5)
    row = measure_case(case, TimingPlan(budget_ms=200), WeightCache(), None)
    assert row["status"] == "ok", row.get("error")
    slot_bytes = 4 * 3 * SHAPE.hidden * SHAPE.ffn * 2
    assert row["offload_device_bytes"] >= slot_bytes
    assert row["weight_bytes"] >= slot_bytes
    print(
        f"\noffload cache 4/8, 256 tokens: {row['latency_ms']:.3f} ms, "
        f"max_token_err {row['max_token_err']:.3g}, device bytes {row['offload_device_bytes']}"
    )
