"""Parameter, FLOP and byte counts against hand-computed values for the presets."""

from __future__ import annotations

import pytest
import torch

from moebench.case import Case, Workload
from moebench.layer import LayerStats
from moebench.measure import counters
from moebench.presets import PRESETS


def _case(preset: str, tokens: int = 1, mode: str = "forward") -> Case:
    return Case(PRESETS[preset], Workload(tokens, 1, mode), "grouped", preset=preset)


def test_mixtral_parameters():
    counts = counters.param_counts(_case("mixtral-8x7b"), torch.nn.Module(), None)
    assert counts.router == 32_768
    assert counts.total - counts.router == 1_409_286_144
    assert counts.active - counts.router == 352_321_536


@pytest.mark.parametrize(
    "preset, expert_total, active_experts",
    [
        # 128 x 3 x 2048 x 768, top-8
        ("qwen3-30b-a3b", 603_979_776, 8),
        # 256 routed + 1 shared, each 3 x 7168 x 2048; top-8 + the shared one
        ("deepseek-v3", 257 * 44_040_192, 9),
        ("olmoe-1b-7b", 64 * 3 * 2048 * 1024, 8),
        ("switch-base-8", 8 * 3 * 768 * 3072, 1),
    ],
)
def test_preset_parameters(preset, expert_total, active_experts):
    shape = PRESETS[preset]
    counts = counters.param_counts(_case(preset), torch.nn.Module(), None)
    assert counts.total - counts.router == expert_total
    assert counts.active - counts.router == active_experts * shape.expert_params
    assert counts.router == shape.hidden * shape.num_experts


def test_touched_counts_only_used_experts():
    case = _case("mixtral-8x7b", tokens=1)
    stats = LayerStats([1, 0, 0, 1, 0, 0, 0, 0], dropped_slots=0, total_slots=2, aux_loss=1.0)
    counts = counters.param_counts(case, torch.nn.Module(), stats)
    assert counts.touched == 2 * case.shape.expert_params + counts.router


def test_flops_and_bytes():
    case = _case("mixtral-8x7b", tokens=4)
    counts = counters.param_counts(case, torch.nn.Module(), None)
    # tokens x top_k x 3 matmuls x 2 x D x F, plus the router's 2 x D x E per token
    assert counters.flops(case, counts) == 4 * (2 * 3 * 2 * 4096 * 14336 + 2 * 4096 * 8)
    train = _case("mixtral-8x7b", tokens=4, mode="train")
    assert counters.flops(train, counts) == 3 * counters.flops(case, counts)
    bf16 = counters.min_bytes(case, counts, torch.bfloat16)
    assert bf16 == 8 * 3 * 4096 * 14336 * 2 + 32_768 * 4 + 2 * 4 * 4096 * 2
