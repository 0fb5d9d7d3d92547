"""The down GEMM warp-specialised in Gluon (`moebench/impls/triton/gluon_down.py`): which
configs are offered and what they take, that every one compiles for Hopper on this host
(CI's too: Gluon has no interpreter), that the layer races them unless turned off
(`$MOEBENCH_GLUON_WS=0`), and, on a Hopper card only, that every config gives the TMA
tiles' exact bits on odd shapes and the layer's forward matches `reference`."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="Gluon is Triton 3.4's and later")

from moebench.impls.triton import gluon_common, gluon_down, tma, tuning
from tests.conftest import in_a_fresh_process

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="Gluon's wgmma kernels need a Hopper card")


def test_candidates_by_block_height_each_fitting_shared_memory():
    """128-row blocks: every tile of TILES, the 128-wide ones also PINGPONG; 64-row
    blocks: TILES[64]; no other height; none taking more shared memory than a block may
    use."""
    assert gluon_down.candidates(32, 2048, 768, 2) == []
    tall = gluon_down.candidates(128, 2048, 768, 2)
    pingpong = [c for c in tall if c.get("PINGPONG")]
    assert len(tall) == len(gluon_down.TILES[128]) + len(pingpong)
    assert pingpong and all(c["BLOCK_N"] == 128 for c in pingpong)
    assert len(gluon_down.candidates(64, 2048, 768, 2)) == len(gluon_down.TILES[64])
    for config in tall:
        assert config["GLUON_WS"] and config["BLOCK_M"] == 128
        assert gluon_down.shared_bytes(config, 2) <= gluon_common.SHARED_BYTES
    # N256 with 4 stages: 192 KB of ring and the scratch fit; 5 stages would not
    deep = next(c for c in tall if c["BLOCK_N"] == 256 and c["STAGES"] == 4)
    assert not gluon_down.fits({**deep, "STAGES": 5}, 2048, 768, 2)


def test_fits_refuses_what_the_tma_tiles_refuse():
    config = gluon_down.candidates(128, 2048, 768, 2)[0]
    assert gluon_down.fits(config, 264, 384, 2)  # D no multiple of a tile: zero fill
    assert not gluon_down.fits(config, 264, 400, 2)  # a K tile into the next expert
    assert not gluon_down.fits(config, 260, 384, 2)  # a row of 520 bytes: not 16-aligned
    assert not gluon_down.fits({**config, "STAGES": 8}, 264, 384, 2)  # shared memory
    assert gluon_common.takes(torch.bfloat16) and gluon_common.takes(torch.float16)
    assert not gluon_common.takes(torch.float32)


def test_registers_move_from_the_loader_to_the_consumers():
    """`maxnreg` spreads the 64K registers over the warp groups: three at 128-row blocks
    (two consumer groups or PINGPONG's two consumers, and the loader's), two at 64."""
    tall, pingpong = (c for c in gluon_down.candidates(128, 2048, 768, 2) if c["STAGES"] == 4
                      and c["BLOCK_N"] == 128)  # fmt: skip
    assert gluon_common.consumer_warps(tall) == 8 and gluon_common.consumer_warps(pingpong) == 4
    assert gluon_common.max_registers(tall) == gluon_common.max_registers(pingpong) == 168
    short = gluon_down.candidates(64, 2048, 768, 2)[0]
    assert gluon_common.consumer_warps(short) == 4 and gluon_common.max_registers(short) == 248


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A tensor with no data: compiling for a card needs only shapes and dtypes."""
    return torch.empty(*shape, device="meta", dtype=dtype)


def _meta_alignment(tokens: int, top_k: int, experts: int, block_m: int):
    from moebench.impls.triton.align import Alignment, max_padded_rows

    rows = max_padded_rows(tokens * top_k, experts, block_m)
    ids = torch.int32
    return Alignment(_meta(rows, dtype=ids), _meta(rows // block_m, dtype=ids),
                     _meta(1, dtype=ids), None, None, tokens * top_k, block_m)  # fmt: skip


def check_every_candidate_compiles() -> None:
    """The body of `test_every_candidate_compiles_for_hopper` (in a process without
    Triton's interpreter): each config at both heights, D = 264 (no multiple of a tile)
    and F = 384, compiled for sm_90 without spills."""
    from moebench import offline_compile

    D, F, E, K, tokens = 264, 384, 8, 2, 1024
    configs = []
    with offline_compile.compiling_for() as record:
        for block_m in (64, 128):
            alignment = _meta_alignment(tokens, K, E, block_m)
            rows = alignment.max_rows
            for config in gluon_down.candidates(block_m, D, F, 2):
                configs.append(config)
                gluon_down.launch_down(
                    _meta(rows, F), _meta(E, F, D), _meta(tokens * K), _meta(tokens * K, D),
                    alignment, config, 132,
                )  # fmt: skip
    assert len(record) == len(configs) == 8, [r.describe() for r in record]
    for compiled, config in zip(record, configs):
        assert compiled.error is None, compiled.describe()
        assert compiled.stack_bytes == 0, compiled.describe()  # no spills
        # the consumers' warps and the loader's warp group
        assert compiled.warps == (12 if config["BLOCK_M"] == 128 else 8), compiled.describe()
        # within the bound `fits` takes (the barriers apart)
        bound = gluon_down.shared_bytes(config, 2) + 1024
        assert compiled.shared_bytes <= bound, compiled.describe()


# The shape of the race tests' forwards: D no multiple of a tile, both row-block heights.
RACE_SHAPE = {"D": 264, "F": 384, "E": 8, "K": 2, "tokens": 1024}


def forward_launches(switch: str, setting: str | None) -> tuple[list[tuple[str, dict]], list[int]]:
    """(each launch's kernel name and keyword arguments, the row-block heights) of a
    forward of RACE_SHAPE at each height it may take, with the environment variable
    `switch` set to `setting` (unset where None), on meta tensors, launches recorded, not
    compiled (`fast_launch.compile_only`: the tuner then launches every candidate of each
    key once). For a process of its own: the switch stays as set."""
    import os

    from moebench import fast_launch
    from moebench.impls.triton import layer

    if setting is None:
        os.environ.pop(switch, None)
    else:
        os.environ[switch] = setting
    launched: list[tuple[str, dict]] = []

    def record(kernel, grid, args, kwargs) -> None:
        launched.append((kernel.fn.__name__, kwargs))

    D, F, E, K, tokens = RACE_SHAPE.values()
    heights = tuning.block_m_choices(tokens, K, E)
    with fast_launch.compile_only(record):
        for block_m in heights:
            layer.fused_experts(
                _meta(tokens, D), _meta(tokens, K), _meta(tokens, K, dtype=torch.int64),
                _meta(E, 2 * F, D), _meta(E, F, D), block_m=block_m,
            )  # fmt: skip
    return launched, heights


def check_the_layer_races_them(setting: str | None, gemm: str = "down") -> None:
    """The body of `test_the_layer_races_them_unless_turned_off` (`forward_launches`,
    `$MOEBENCH_GLUON_WS` set to `setting`, unset where None) for the `gemm` ("down" or
    "gate_up") GEMM's Gluon kernels: every config of each block height they race at, in
    order, beside the TMA tiles; none when turned off ("0")."""
    from moebench.env import GLUON_WS_SWITCH
    from moebench.impls.triton import gluon_gate_up

    module = {"down": gluon_down, "gate_up": gluon_gate_up}[gemm]
    launched, heights = forward_launches(GLUON_WS_SWITCH, setting)
    D, F = RACE_SHAPE["D"], RACE_SHAPE["F"]
    gluon = [kwargs for name, kwargs in launched if name == f"{gemm}_ws_kernel"]
    if setting == "0":
        assert gluon == []
        return
    heights = [b for b in heights if module.candidates(b, D, F, 2)]
    assert heights, "no block height the Gluon kernels race at"
    for block_m in heights:
        wanted = module.candidates(block_m, D, F, 2)
        got = [kwargs for kwargs in gluon if kwargs["BLOCK_M"] == block_m]
        assert len(got) == len(wanted), (block_m, got)
        for kwargs, config in zip(got, wanted):
            assert (kwargs["BLOCK_N"], kwargs["STAGES"]) == (config["BLOCK_N"], config["STAGES"])
            assert kwargs["PINGPONG"] == bool(config.get("PINGPONG"))
    # the TMA tiles still race beside them
    assert any(name == f"{gemm}_tma_kernel" for name, _ in launched)


def test_every_candidate_compiles_for_hopper():
    in_a_fresh_process("tests.test_gluon_down", "check_every_candidate_compiles()")


@pytest.mark.parametrize("setting", [None, "1", "0"])
def test_the_layer_races_them_unless_turned_off(setting):
    in_a_fresh_process("tests.test_gluon_down", f"check_the_layer_races_them({setting!r})")


# Odd shapes for the bits tests on a card: (tokens, experts, top_k, row-block height).
ODD_SHAPES = [(300, 5, 2, 128), (70, 5, 2, 64), (500, 6, 1, 128), (200, 4, 4, 128)]


def odd_down_inputs(tokens: int, experts: int, top_k: int, block_m: int, dtype: torch.dtype):
    """(alignment, h_PF, w_down_EFD, gate_A) on the card for a down GEMM of D = 264 (no
    multiple of a tile) and F = 384: one expert without tokens where top_k < experts,
    else every token on every expert."""
    from moebench.impls.triton.align import align_to_blocks

    generator = torch.Generator().manual_seed(tokens)
    D, F = 264, 384
    ids_TK = torch.stack(
        [torch.randperm(experts - 1, generator=generator)[:top_k] for _ in range(tokens)]
    ) if top_k < experts else torch.arange(experts).repeat(tokens, 1)  # fmt: skip
    alignment = align_to_blocks(ids_TK.to(torch.int32).cuda(), experts, block_m)
    h_PF = torch.randn(alignment.max_rows, F, generator=generator).to("cuda", dtype)
    w_down_EFD = (torch.randn(experts, F, D, generator=generator) / F**0.5).to("cuda", dtype)
    gate_A = torch.rand(tokens * top_k, generator=generator).to("cuda", dtype)
    return alignment, h_PF, w_down_EFD, gate_A


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "experts", "top_k", "block_m"), ODD_SHAPES)
def test_every_candidate_gives_the_tma_tiles_bits(tokens, experts, top_k, block_m, dtype):
    """On odd shapes (D = 264: no multiple of a tile; an expert without tokens; top_k 1
    and = the experts), each config's out equals, bit for bit, the TMA tile's of the
    same BLOCK_N and BLOCK_K (the same K steps in the same order)."""
    D, F = 264, 384
    alignment, h_PF, w_down_EFD, gate_A = odd_down_inputs(tokens, experts, top_k, block_m, dtype)
    configs = gluon_down.candidates(block_m, D, F, 2)
    assert configs
    for config in configs:
        got_AD = torch.full((tokens * top_k, D), float("nan"), device="cuda", dtype=dtype)
        gluon_down.launch_down(
            h_PF, w_down_EFD, gate_A, got_AD, alignment, config,
            tma.multiprocessors(got_AD.device),
        )  # fmt: skip
        want_AD = torch.full_like(got_AD, float("nan"))
        tile = {"BLOCK_M": block_m, "BLOCK_N": config["BLOCK_N"], "BLOCK_K": config["BLOCK_K"],
                "GROUP_M": 8, "num_warps": 8, "num_stages": 3, "TMA": True}  # fmt: skip
        tma.launch_down(h_PF, w_down_EFD, gate_A, want_AD, alignment, tile)
        torch.cuda.synchronize()
        assert not got_AD.isnan().any(), config  # every assignment's row written
        assert torch.equal(got_AD, want_AD), config


def layer_on_gluon_alone_matches_reference(monkeypatch, tmp_path, gemm, module, launcher):
    """The layer's forward with only Gluon kernels to choose from for `gemm` ("gate_up"
    or "down"), launched by `module`'s function `launcher`: the tuner picks one, and the
    output matches `reference`."""
    from moebench.env import GLUON_WS_SWITCH
    from moebench.impls.reference import reference_output
    from moebench.impls.triton import layer
    from tests.test_triton import TOLERANCE, _gpu_case, _relative, built_layer

    monkeypatch.setenv(GLUON_WS_SWITCH, "1")
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning.TUNER, "_chosen", {})
    every = layer.gemm_candidates

    def candidates(name, *args):
        configs = every(name, *args)
        return [c for c in configs if c.get("GLUON_WS")] if name == gemm else configs

    monkeypatch.setattr(layer, "gemm_candidates", candidates)
    ran = []
    launch = getattr(module, launcher)
    monkeypatch.setattr(module, launcher, lambda *a: (ran.append(a[5]), launch(*a)))
    case = _gpu_case((264, 384, 6, 2, 2048), "bfloat16", mode="forward", device="cuda")
    weights, built, x_TD = built_layer(case)
    with torch.no_grad():
        y_TD = built(x_TD)
    assert ran and all(config.get("GLUON_WS") for config in ran)
    assert _relative(y_TD, reference_output(weights, x_TD)) <= TOLERANCE["bfloat16"]


@needs_hopper
def test_layer_on_gluon_down_alone_matches_reference(monkeypatch, tmp_path):
    layer_on_gluon_alone_matches_reference(monkeypatch, tmp_path, "down", gluon_down, "launch_down")


def test_the_switch_without_gluon_says_what_to_install(monkeypatch):
    """Asked for (`=1`) with a Triton that has no Gluon: an error naming the switch and
    the Triton to install, not a bare ImportError from inside the layer; left at its
    default there, the race goes on without them."""

    from moebench.env import GLUON_WS_SWITCH
    from moebench.impls.triton import layer

    monkeypatch.setenv(GLUON_WS_SWITCH, "1")
    monkeypatch.setitem(sys.modules, "moebench.impls.triton.gluon_common", None)
    monkeypatch.delattr("moebench.impls.triton.gluon_common")  # (imported above)
    x_TD = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
    with pytest.raises(ImportError, match=r"MOEBENCH_GLUON_WS=1 races Gluon kernels.*triton>=3\.6"):
        layer.races_gluon(True, x_TD)
    assert layer.races_gluon(False, x_TD) is False  # no TMA tiles race: not asked
    monkeypatch.setenv(GLUON_WS_SWITCH, "0")
    assert layer.races_gluon(True, x_TD) is False
    monkeypatch.delenv(GLUON_WS_SWITCH)
    assert layer.races_gluon(True, x_TD) is False
