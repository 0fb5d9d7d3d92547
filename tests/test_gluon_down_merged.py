"""The down GEMM in Gluon with an expert's short tail merged into the block before it
(`moebench/impls/triton/gluon_down_merged.py`): which configs are offered, that every one
compiles for Hopper on this host (CI's too: Gluon has no interpreter), and, on a Hopper
card only, that it writes what `gluon_down.py` writes: the same bits for every assignment
but a merged tail's, those within two roundings of the float32 product."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="Gluon is Triton 3.4's and later")

from moebench.impls.triton import gluon_common, gluon_down, gluon_down_merged, tma
from tests.conftest import in_a_fresh_process
from tests.test_gluon_down import _meta, _meta_alignment, needs_hopper
from tests.test_gluon_gate_up_merged import ROWS_PER_EXPERT, merged_rows


def test_candidates_at_128_rows_only_each_fitting_shared_memory():
    """128-row blocks: every tile of TILES; none taking more shared memory than a block
    may use (six stages would not); F's K steps whole (as gluon_down.fits)."""
    assert gluon_down_merged.candidates(64, 2048, 768, 2) == []
    configs = gluon_down_merged.candidates(128, 2048, 768, 2)
    assert len(configs) == len(gluon_down_merged.TILES)
    assert {c["TAIL"] for c in configs} == {32, 64}
    for config in configs:
        assert config["GLUON_WS"] and config["MERGE_TAIL"]
        assert gluon_down_merged.shared_bytes(config, 2) <= gluon_common.SHARED_BYTES
        assert not gluon_down_merged.fits({**config, "STAGES": 6}, 2048, 768, 2)
    assert not gluon_down_merged.candidates(128, 2048, 736, 2)  # 11.5 K steps of 64


def check_every_candidate_compiles() -> None:
    """The body of `test_every_candidate_compiles_for_hopper` (in a process without
    Triton's interpreter): each config at D = 264 (no multiple of a tile) and F = 384,
    compiled for sm_90 without spills."""
    from moebench import offline_compile

    D, F, E, K, tokens = 264, 384, 8, 2, 1024
    alignment = _meta_alignment(tokens, K, E, 128)
    configs = gluon_down_merged.candidates(128, D, F, 2)
    with offline_compile.compiling_for() as record:
        for config in configs:
            gluon_down_merged.launch_down(
                _meta(alignment.max_rows, F), _meta(E, F, D), _meta(tokens * K),
                _meta(tokens * K, D), alignment, config, 132,
            )  # fmt: skip
    assert len(record) == len(configs) == 4
    for compiled, config in zip(record, configs):
        assert compiled.describe().startswith("down_merged_ws_kernel"), compiled.describe()
        assert compiled.error is None, compiled.describe()
        assert compiled.stack_bytes == 0, compiled.describe()  # no spills
        assert compiled.warps == 12, compiled.describe()
        bound = gluon_down_merged.shared_bytes(config, 2) + 1024  # the barriers apart
        assert compiled.shared_bytes <= bound, compiled.describe()


def test_every_candidate_compiles_for_hopper():
    in_a_fresh_process("tests.test_gluon_down_merged", "check_every_candidate_compiles()")


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_writes_gluon_downs_rows_and_the_tails_within_two_roundings(dtype):
    """Each config's out against gluon_down's of the same tile, NaN-filled buffers, on
    experts ending in tails of every kind (`ROWS_PER_EXPERT`): every assignment in a block
    computed as a tile, the same bits; a merged tail's within two roundings of the
    float32 weighted product; D = 264, no multiple of a tile."""
    from moebench.impls.triton.align import align_to_blocks

    generator = torch.Generator().manual_seed(1)
    D, F = 264, 384
    experts = len(ROWS_PER_EXPERT)
    ids = torch.cat([torch.full((n,), e) for e, n in enumerate(ROWS_PER_EXPERT)])
    ids_TK = ids[torch.randperm(len(ids), generator=generator)][:, None]
    alignment = align_to_blocks(ids_TK.to(torch.int32).cuda(), experts, 128)
    h_PF = torch.randn(alignment.max_rows, F, generator=generator).to("cuda", dtype)
    w_EFD = (torch.randn(experts, F, D, generator=generator) / F**0.5).to("cuda", dtype)
    gate_A = torch.rand(len(ids), generator=generator).to("cuda", dtype)
    sorted_ids = alignment.sorted_ids_P.cpu()
    experts_P = alignment.block_expert_B.cpu().repeat_interleave(128)[: len(sorted_ids)]
    configs = gluon_down_merged.candidates(128, D, F, 2)
    assert configs
    for config in configs:
        got = torch.full((len(ids), D), float("nan"), device="cuda", dtype=dtype)
        gluon_down_merged.launch_down(
            h_PF, w_EFD, gate_A, got, alignment, config, tma.multiprocessors(h_PF.device)
        )
        want = torch.full_like(got, float("nan"))
        plain = {k: v for k, v in config.items() if k not in ("TAIL", "MERGE_TAIL")}
        gluon_down.launch_down(
            h_PF, w_EFD, gate_A, want, alignment, plain, tma.multiprocessors(h_PF.device)
        )
        torch.cuda.synchronize()
        got, want = got.cpu(), want.cpu()
        merged = merged_rows(sorted_ids, experts_P, len(ids), config["TAIL"])
        in_tails = sorted_ids[merged & (sorted_ids < len(ids))].long()
        assert len(in_tails), config  # the shape holds merged tails
        kept = torch.ones(len(ids), dtype=torch.bool)
        kept[in_tails] = False
        assert not got.isnan().any(), config  # every assignment written
        assert torch.equal(got[kept], want[kept]), config
        rows = merged.nonzero().squeeze(1)[sorted_ids[merged] < len(ids)]
        product = torch.einsum(
            "pf,pfd->pd", h_PF.float().cpu()[rows], w_EFD.float().cpu()[experts_P[rows]]
        )
        exact = product * gate_A.float().cpu()[in_tails][:, None]
        bound = 2 * torch.finfo(dtype).eps * exact.abs() + 1e-3
        assert ((got[in_tails].float() - exact).abs() <= bound).all(), config
