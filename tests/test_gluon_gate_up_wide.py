"""Inference's gate_up GEMM in Gluon as one product twice as wide
(`moebench/impls/triton/gluon_gate_up_wide.py`): which configs are offered, that every one
compiles for Hopper on this host (CI's too: Gluon has no interpreter) as one 256-column
wgmma a step, and, on a Hopper card only, that it gives `gluon_gate_up.py`'s bits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="Gluon is Triton 3.4's and later")

from moebench.impls.triton import gluon_gate_up, gluon_gate_up_wide, tma
from tests.conftest import in_a_fresh_process
from tests.test_gluon_down import _meta, _meta_alignment, needs_hopper


def test_candidates_at_128_rows_only_within_gluon_gate_ups_rules():
    assert gluon_gate_up_wide.candidates(64, 2048, 768, 2) == []
    configs = gluon_gate_up_wide.candidates(128, 2048, 768, 2)
    assert len(configs) == len(gluon_gate_up_wide.TILES)
    assert all(c["GLUON_WS"] and c["ONE_DOT"] and c["BLOCK_M"] == 128 for c in configs)
    # 320 columns: no 128-wide tile (it would run from gate into up)
    assert {c["BLOCK_N"] for c in gluon_gate_up_wide.candidates(128, 2048, 320, 2)} == {64}
    assert gluon_gate_up_wide.candidates(128, 260, 384, 2) == []  # rows not 16-aligned


def check_every_candidate_compiles() -> None:
    """The body of `test_every_candidate_compiles_for_hopper` (in a process without
    Triton's interpreter): each config at D = 264 and F = 384 compiled for sm_90 without
    spills, its K loop one wgmma of 2 BLOCK_N columns (the SASS's HGMMA shape)."""
    from moebench import offline_compile

    D, F, E, K, tokens = 264, 384, 8, 2, 1024
    alignment = _meta_alignment(tokens, K, E, 128)
    configs = gluon_gate_up_wide.candidates(128, D, F, 2)
    with offline_compile.compiling_for() as record:
        for config in configs:
            gluon_gate_up_wide.launch_gate_up(
                _meta(tokens, D), _meta(E, 2 * F, D), _meta(alignment.max_rows, F),
                alignment, K, config, 132,
            )  # fmt: skip
    gemms = [r for r in record if r.describe().startswith("gate_up_wide_ws_kernel")]
    assert len(gemms) == len(configs) == 4
    for compiled, config in zip(gemms, configs):
        assert compiled.error is None, compiled.describe()
        assert compiled.stack_bytes == 0, compiled.describe()  # no spills
        assert compiled.warps == 12, compiled.describe()
        assert f"wgmma.mma_async.sync.aligned.m64n{2 * config['BLOCK_N']}k16" in compiled.ptx


def test_every_candidate_compiles_for_hopper():
    in_a_fresh_process("tests.test_gluon_gate_up_wide", "check_every_candidate_compiles()")


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(300, 5, 2), (500, 6, 1), (200, 4, 4)])
def test_every_candidate_gives_gluon_gate_ups_bits(tokens, experts, top_k, dtype):
    """On odd shapes (D = 264: no multiple of a tile; an expert without tokens; top_k 1
    and = the experts), each config's h equals, bit for bit, gluon_gate_up.py's of the
    same tile, padding rows included (NaN-filled buffers)."""
    from moebench.impls.triton.align import align_to_blocks

    generator = torch.Generator().manual_seed(tokens)
    D, F = 264, 384
    ids_TK = torch.stack(
        [torch.randperm(experts - 1, generator=generator)[:top_k] for _ in range(tokens)]
    ) if top_k < experts else torch.arange(experts).repeat(tokens, 1)  # fmt: skip
    alignment = align_to_blocks(ids_TK.to(torch.int32).cuda(), experts, 128)
    x_TD = torch.randn(tokens, D, generator=generator).to("cuda", dtype)
    w_E2FD = (torch.randn(experts, 2 * F, D, generator=generator) / D**0.5).to("cuda", dtype)
    programs = tma.multiprocessors(x_TD.device)
    configs = gluon_gate_up_wide.candidates(128, D, F, 2)
    assert configs
    for config in configs:
        got_PF = torch.full((alignment.max_rows, F), float("nan"), device="cuda", dtype=dtype)
        gluon_gate_up_wide.launch_gate_up(x_TD, w_E2FD, got_PF, alignment, top_k, config, programs)
        want_PF = torch.full_like(got_PF, float("nan"))
        plain = {k: v for k, v in config.items() if k != "ONE_DOT"}
        gluon_gate_up.launch_gate_up(x_TD, w_E2FD, want_PF, alignment, top_k, plain, programs)
        torch.cuda.synchronize()
        assert not got_PF[: int(alignment.num_padded_1)].isnan().any(), config
        assert torch.equal(got_PF.nan_to_num(7.0), want_PF.nan_to_num(7.0)), config
