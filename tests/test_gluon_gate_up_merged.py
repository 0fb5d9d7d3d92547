"""Inference's gate_up GEMM in Gluon with an expert's short tail merged into the block
before it (`moebench/impls/triton/gluon_gate_up_merged.py`): which configs are offered,
that every one compiles for Hopper on this host (CI's too: Gluon has no interpreter), and,
on a Hopper card only, that it writes what `gluon_gate_up.py` writes: the same bits on
every row but a merged tail's, those within two roundings of the float32 sum, on odd
shapes whose experts end in tails of every kind."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="Gluon is Triton 3.4's and later")

from moebench.impls.triton import gluon_common, gluon_gate_up, gluon_gate_up_merged, tma
from tests.conftest import in_a_fresh_process
from tests.test_gluon_down import (
    RACE_SHAPE,
    _meta,
    _meta_alignment,
    forward_launches,
    needs_hopper,
)


def test_candidates_at_128_rows_only_each_fitting_shared_memory():
    """128-row blocks: every tile of TILES (at 64 rows a tail is half a block already);
    none taking more shared memory than a block may use; a fourth stage would not fit."""
    assert gluon_gate_up_merged.candidates(64, 2048, 768, 2) == []
    configs = gluon_gate_up_merged.candidates(128, 2048, 768, 2)
    assert len(configs) == len(gluon_gate_up_merged.TILES)
    assert {c["TAIL"] for c in configs} == {32, 64}
    for config in configs:
        assert config["GLUON_WS"] and config["MERGE_TAIL"] and config["BLOCK_N"] == 128
        assert gluon_gate_up_merged.shared_bytes(config, 2) <= gluon_common.SHARED_BYTES
        assert not gluon_gate_up_merged.fits({**config, "STAGES": 4}, 2048, 768, 2)
    # the rules of gluon_gate_up.fits: an N tile from gate into up, a row not 16-aligned
    assert not gluon_gate_up_merged.candidates(128, 2048, 320, 2)
    assert not gluon_gate_up_merged.candidates(128, 260, 384, 2)


def check_every_candidate_compiles() -> None:
    """The body of `test_every_candidate_compiles_for_hopper` (in a process without
    Triton's interpreter): each config at D = 264 (no multiple of a tile) and F = 384,
    compiled for sm_90 without spills (four accumulators in the consumer's registers),
    after the gather of x's rows."""
    from moebench import offline_compile

    D, F, E, K, tokens = 264, 384, 8, 2, 1024
    alignment = _meta_alignment(tokens, K, E, 128)
    configs = gluon_gate_up_merged.candidates(128, D, F, 2)
    with offline_compile.compiling_for() as record:
        for config in configs:
            gluon_gate_up_merged.launch_gate_up(
                _meta(tokens, D), _meta(E, 2 * F, D), _meta(alignment.max_rows, F),
                alignment, K, config, 132,
            )  # fmt: skip
    gemms = [r for r in record if r.describe().startswith("gate_up_merged_ws_kernel")]
    assert len(configs) == 2 and len(record) == 2 * len(gemms) == 4
    for compiled, config in zip(gemms, configs):
        assert compiled.error is None, compiled.describe()
        assert compiled.stack_bytes == 0, compiled.describe()  # no spills
        assert compiled.warps == 12, compiled.describe()  # two consumer groups, the loader's
        bound = gluon_gate_up_merged.shared_bytes(config, 2) + 1024  # the barriers apart
        assert compiled.shared_bytes <= bound, compiled.describe()


def test_every_candidate_compiles_for_hopper():
    in_a_fresh_process("tests.test_gluon_gate_up_merged", "check_every_candidate_compiles()")


def check_the_layer_races_them(setting: str | None) -> None:
    """The body of `test_the_layer_races_them_only_when_turned_on`: with the switch on,
    both GEMMs' merged-tail configs at 128-row blocks, in order, beside their plain Gluon
    kernels; else none."""
    from moebench.env import GLUON_MERGE_TAIL_SWITCH
    from moebench.impls.triton import gluon_down_merged

    launched, heights = forward_launches(GLUON_MERGE_TAIL_SWITCH, setting)
    D, F = RACE_SHAPE["D"], RACE_SHAPE["F"]
    for kernel, module in (
        ("gate_up_merged_ws_kernel", gluon_gate_up_merged),
        ("down_merged_ws_kernel", gluon_down_merged),
    ):
        got = [kwargs for name, kwargs in launched if name == kernel]
        if setting != "1":
            assert got == [], kernel
            continue
        wanted = [c for b in heights for c in module.candidates(b, D, F, 2)]
        assert wanted and len(got) == len(wanted), kernel
        for kwargs, config in zip(got, wanted):
            assert (kwargs["BLOCK_N"], kwargs["TAIL"]) == (config["BLOCK_N"], config["TAIL"])
    names = {name for name, _ in launched}
    assert {"gate_up_ws_kernel", "down_ws_kernel"} <= names  # the plain ones race beside


@pytest.mark.parametrize("setting", [None, "0", "1"])
def test_the_layer_races_them_only_when_turned_on(setting):
    in_a_fresh_process(
        "tests.test_gluon_gate_up_merged", f"check_the_layer_races_them({setting!r})"
    )


def test_training_and_a_layer_without_gluon_race_none():
    """Training's gate_up stores the pre-activations (no Gluon kernel does); without
    the Gluon race (turned off, or no Hopper card) the merged kernels race nowhere."""
    from moebench.impls.triton import layer

    assert not layer.gemm_race("gate_up_train", True, True, True, False, True)[4]
    assert layer.gemm_race("gate_up", True, True, True, False, True)[4]
    assert layer.gemm_race("down", True, True, True, False, True)[4]
    assert not layer.gemm_race("down", True, False, True, False, True)[4]
    assert not layer.races_gluon_merged(False)


# rows an expert: none, a lone short block, a lone full block, a full block and tails of
# 1, 32, 33 (past a 32-row TAIL), 64 and 65 rows, two full blocks and a tail of 20
ROWS_PER_EXPERT = (0, 17, 128, 129, 160, 161, 192, 193, 276)


def merged_rows(
    sorted_ids_P: torch.Tensor, experts_P: torch.Tensor, num_assign: int, tail: int
) -> torch.Tensor:
    """Which padded rows lie in a merged tail's block: its expert's last block but not its
    first (the block before it of the same expert), row `tail` on padding."""
    merged = torch.zeros(len(sorted_ids_P), dtype=torch.bool)
    for first in range(128, len(sorted_ids_P), 128):
        same = experts_P[first] == experts_P[first - 1]
        real = sorted_ids_P[first] < num_assign
        if same and real and sorted_ids_P[first + tail] >= num_assign:
            merged[first : first + 128] = True
    return merged


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_writes_gluon_gate_ups_rows_and_the_tails_within_two_roundings(dtype):
    """Each config's h against gluon_gate_up's of the same tile, NaN-filled buffers: the
    rows of every block it computes as a tile, the same bits; the rows of a merged tail
    within two roundings of the float32 SwiGLU (its products summed in another order);
    a merged tail's rows past TAIL not written; D = 264, no multiple of a tile."""
    from moebench.impls.triton.align import align_to_blocks

    generator = torch.Generator().manual_seed(0)
    D, F, top_k = 264, 384, 1
    experts = len(ROWS_PER_EXPERT)
    ids = torch.cat([torch.full((n,), e) for e, n in enumerate(ROWS_PER_EXPERT)])
    ids_TK = ids[torch.randperm(len(ids), generator=generator)][:, None]
    alignment = align_to_blocks(ids_TK.to(torch.int32).cuda(), experts, 128)
    x_TD = torch.randn(len(ids), D, generator=generator).to("cuda", dtype)
    w_E2FD = (torch.randn(experts, 2 * F, D, generator=generator) / D**0.5).to("cuda", dtype)
    sorted_ids = alignment.sorted_ids_P.cpu()
    real = sorted_ids < alignment.num_assign
    rows = torch.arange(len(sorted_ids))
    # the float32 SwiGLU of every real row, from x's row through its expert's weights
    # (blocks past the padded length hold the sentinel expert E)
    experts_P = alignment.block_expert_B.cpu().repeat_interleave(128)[: len(rows)]
    experts_P = experts_P.clamp(max=experts - 1)
    x_P = x_TD.float().cpu()[sorted_ids.clamp(max=len(ids) - 1)]
    pre = torch.einsum("pd,pfd->pf", x_P, w_E2FD.float().cpu()[experts_P])
    exact = torch.nn.functional.silu(pre[:, :F]) * pre[:, F:]
    configs = gluon_gate_up_merged.candidates(128, D, F, 2)
    assert configs
    for config in configs:
        tail = config["TAIL"]
        got = torch.full((alignment.max_rows, F), float("nan"), device="cuda", dtype=dtype)
        gluon_gate_up_merged.launch_gate_up(
            x_TD, w_E2FD, got, alignment, top_k, config, tma.multiprocessors(x_TD.device)
        )
        want = torch.full_like(got, float("nan"))
        plain = {k: v for k, v in config.items() if k not in ("TAIL", "MERGE_TAIL")}
        gluon_gate_up.launch_gate_up(
            x_TD, w_E2FD, want, alignment, top_k, {**plain, "STAGES": 4},
            tma.multiprocessors(x_TD.device),
        )  # fmt: skip
        torch.cuda.synchronize()
        got, want = got.cpu()[: len(rows)], want.cpu()[: len(rows)]
        merged = merged_rows(sorted_ids, experts_P, alignment.num_assign, tail)
        assert merged.any(), config  # the shape holds merged tails
        kept = ~merged
        assert torch.equal(got[kept].nan_to_num(7.0), want[kept].nan_to_num(7.0)), config
        tail_rows = merged & (rows % 128 < tail)
        assert not got[tail_rows].isnan().any(), config
        assert got[merged & ~(rows % 128 < tail)].isnan().all(), config  # past TAIL: unwritten
        on_real = tail_rows & real
        unit = torch.finfo(dtype).eps
        bound = 2 * unit * exact[on_real].abs() + 1e-3
        assert ((got[on_real].float() - exact[on_real]).abs() <= bound).all(), config
