"""Inference's gate_up GEMM warp-specialised in Gluon
(`moebench/impls/triton/gluon_gate_up.py`): which configs are offered and what they
take, that every one compiles for Hopper on this host (CI's too: Gluon has no
interpreter), that the layer races them unless turned off (`$MOEBENCH_GLUON_WS=0`) and
never for training's gate_up, and, on a Hopper card only, that every config gives the
TMA tile's exact bits on odd shapes and the layer's forward matches `reference`."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="Gluon is Triton 3.4's and later")

from moebench.impls.triton import gluon_common, gluon_gate_up, tma
from tests.conftest import in_a_fresh_process
from tests.test_gluon_down import (
    RACE_SHAPE,
    _meta,
    _meta_alignment,
    layer_on_gluon_alone_matches_reference,
    needs_hopper,
)


def test_candidates_by_block_height_each_fitting_shared_memory():
    """128-row blocks: every tile of TILES, the 64-wide ones also PINGPONG; 64-row
    blocks: TILES[64]; no other height; none taking more shared memory than a block may
    use (128 columns, 4 stages: 192 KB of ring and the scratch; 5 would not fit)."""
    assert gluon_gate_up.candidates(32, 2048, 768, 2) == []
    tall = gluon_gate_up.candidates(128, 2048, 768, 2)
    pingpong = [c for c in tall if c.get("PINGPONG")]
    assert len(tall) == len(gluon_gate_up.TILES[128]) + len(pingpong)
    assert pingpong and all(c["BLOCK_N"] == 64 for c in pingpong)
    assert len(gluon_gate_up.candidates(64, 2048, 768, 2)) == len(gluon_gate_up.TILES[64])
    for config in tall:
        assert config["GLUON_WS"] and config["BLOCK_M"] == 128
        assert gluon_gate_up.shared_bytes(config, 2) <= gluon_common.SHARED_BYTES
    deep = next(c for c in tall if c["BLOCK_N"] == 128 and c["STAGES"] == 4)
    assert not gluon_gate_up.fits({**deep, "STAGES": 5}, 2048, 768, 2)


def test_fits_refuses_what_the_tma_tiles_refuse():
    config = gluon_gate_up.candidates(128, 2048, 768, 2)[0]
    assert config["BLOCK_N"] == 128
    assert gluon_gate_up.fits(config, 264, 384, 2)  # D no multiple of a tile: zero fill
    assert not gluon_gate_up.fits(config, 264, 320, 2)  # an N tile from gate into up
    assert not gluon_gate_up.fits(config, 260, 384, 2)  # a row of 520 bytes: not 16-aligned
    assert not gluon_gate_up.fits({**config, "STAGES": 8}, 264, 384, 2)  # shared memory


def check_every_candidate_compiles() -> None:
    """The body of `test_every_candidate_compiles_for_hopper` (in a process without
    Triton's interpreter): each config at both heights, D = 264 (no multiple of a tile)
    and F = 384, compiled for sm_90 without spills, after the gather of x's rows."""
    from moebench import offline_compile

    D, F, E, K, tokens = 264, 384, 8, 2, 1024
    configs = []
    with offline_compile.compiling_for() as record:
        for block_m in (64, 128):
            alignment = _meta_alignment(tokens, K, E, block_m)
            for config in gluon_gate_up.candidates(block_m, D, F, 2):
                configs.append(config)
                gluon_gate_up.launch_gate_up(
                    _meta(tokens, D), _meta(E, 2 * F, D), _meta(alignment.max_rows, F),
                    alignment, K, config, 132,
                )  # fmt: skip
    gemms = [r for r in record if r.describe().startswith("gate_up_ws_kernel")]
    assert len(configs) == 8 and len(record) == 2 * len(gemms) == 16
    for compiled, config in zip(gemms, configs):
        assert compiled.error is None, compiled.describe()
        assert compiled.stack_bytes == 0, compiled.describe()  # no spills
        # the consumers' warps and the loader's warp group
        assert compiled.warps == (12 if config["BLOCK_M"] == 128 else 8), compiled.describe()
        bound = gluon_gate_up.shared_bytes(config, 2) + 1024  # the barriers apart
        assert compiled.shared_bytes <= bound, compiled.describe()


def check_training_never_races_them() -> None:
    """Training's gate_up (it stores the pre-activations) races the Triton tiles alone,
    with the switch on (asked for, not only by default)."""
    import os

    from moebench import fast_launch
    from moebench.env import GLUON_WS_SWITCH
    from moebench.impls.triton import layer

    os.environ[GLUON_WS_SWITCH] = "1"
    launched = []
    D, F, E, K, tokens = RACE_SHAPE.values()
    with fast_launch.compile_only(lambda kernel, *_: launched.append(kernel.fn.__name__)):
        layer.fused_experts(
            _meta(tokens, D), _meta(tokens, K), _meta(tokens, K, dtype=torch.int64),
            _meta(E, 2 * F, D), _meta(E, F, D), keep_for_backward=True, block_m=128,
        )  # fmt: skip
    assert "gate_up_tma_kernel" in launched and "down_ws_kernel" in launched
    assert "gate_up_ws_kernel" not in launched


def test_every_candidate_compiles_for_hopper():
    in_a_fresh_process("tests.test_gluon_gate_up", "check_every_candidate_compiles()")


@pytest.mark.parametrize("setting", [None, "1", "0"])
def test_the_layer_races_them_unless_turned_off(setting):
    in_a_fresh_process(
        "tests.test_gluon_down", f"check_the_layer_races_them({setting!r}, 'gate_up')"
    )


def test_training_never_races_them():
    in_a_fresh_process("tests.test_gluon_gate_up", "check_training_never_races_them()")


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "block_m"),
    [(300, 5, 2, 128), (70, 5, 2, 64), (500, 6, 1, 128), (200, 4, 4, 128)],
)
def test_every_candidate_gives_the_tma_tiles_bits(tokens, experts, top_k, block_m, dtype):
    """On odd shapes (D = 264: no multiple of a tile; an expert without tokens; top_k 1
    and = the experts), each config's h equals, bit for bit, the two-product TMA tile's
    of the same BLOCK_N and BLOCK_K, padding rows included (NaN-filled buffers)."""
    from moebench.impls.triton.align import align_to_blocks

    generator = torch.Generator().manual_seed(tokens)
    D, F = 264, 384
    ids_TK = torch.stack(
        [torch.randperm(experts - 1, generator=generator)[:top_k] for _ in range(tokens)]
    ) if top_k < experts else torch.arange(experts).repeat(tokens, 1)  # fmt: skip
    alignment = align_to_blocks(ids_TK.to(torch.int32).cuda(), experts, block_m)
    x_TD = torch.randn(tokens, D, generator=generator).to("cuda", dtype)
    w_E2FD = (torch.randn(experts, 2 * F, D, generator=generator) / D**0.5).to("cuda", dtype)
    configs = gluon_gate_up.candidates(block_m, D, F, 2)
    assert configs
    for config in configs:
        got_PF = torch.full((alignment.max_rows, F), float("nan"), device="cuda", dtype=dtype)
        gluon_gate_up.launch_gate_up(
            x_TD, w_E2FD, got_PF, alignment, top_k, config, tma.multiprocessors(x_TD.device)
        )
        want_PF = torch.full_like(got_PF, float("nan"))
        tile = {"BLOCK_M": block_m, "BLOCK_N": config["BLOCK_N"], "BLOCK_K": config["BLOCK_K"],
                "GROUP_M": 8, "num_warps": 8, "num_stages": 3, "TMA": True}  # fmt: skip
        tma.launch_gate_up(x_TD, w_E2FD, want_PF, alignment, top_k, tile)
        torch.cuda.synchronize()
        written = int(alignment.num_padded_1)
        assert not got_PF[:written].isnan().any(), config  # every row of a block written
        assert torch.equal(got_PF.nan_to_num(7.0), want_PF.nan_to_num(7.0)), config


@needs_hopper
def test_layer_on_gluon_gate_up_alone_matches_reference(monkeypatch, tmp_path):
    layer_on_gluon_alone_matches_reference(
        monkeypatch, tmp_path, "gate_up", gluon_gate_up, "launch_gate_up"
    )
