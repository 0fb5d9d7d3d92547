"""The persistent decode down tiles (`moebench/impls/triton/decode_down.py`): which configs
are offered, that every one gives `kernels.py`'s down tile of the same BLOCK_N and BLOCK_K
the same bits (in Triton's interpreter on a CPU, three programs walking the tiles, or on
a card) on a routing with an expert without rows, that each compiles for Hopper without
spills, that the layer races them only when asked (`$MOEBENCH_DECODE_PERSISTENT=1`), and
the layer on these tiles alone against `reference`, forward and gradients."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the persistent decode tiles are Triton kernels")

from moebench.impls.triton import decode_down
from tests.conftest import KERNEL_DEVICE, in_a_fresh_process, needs_kernels


def _pointer(config: dict) -> dict:
    """`kernels.py`'s down tile of the same block sizes, warps and stages."""
    assert config["PERSISTENT"] and "TMA" not in config
    return {k: v for k, v in config.items() if k not in ("PERSISTENT", "PROGRAMS_PER_SM")}


def test_candidates_at_decode_blocks_and_aligned_widths_only():
    assert decode_down.candidates(64, 2048, 768, 2) == []
    assert decode_down.candidates(128, 2048, 768, 2) == []
    assert decode_down.candidates(16, 264, 768, 2) == []  # D no multiple of 16
    assert decode_down.candidates(16, 2048, 136, 2) == []  # F no multiple of 16
    for block_m in (16, 32):
        configs = decode_down.candidates(block_m, 272, 400, 2)
        assert all(c["PERSISTENT"] and "TMA" not in c for c in configs)
        assert {c["BLOCK_M"] for c in configs} == {block_m}
        tiles = {(c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"]) for c in configs}
        assert tiles == set(decode_down.TILES)  # each tile, one program an SM at least
        for config in configs:  # two programs only where both fit an SM's shared memory
            tile = (config["BLOCK_N"], config["BLOCK_K"], config["num_warps"], config["num_stages"])
            taken = decode_down.shared_bytes(block_m, tile, 2) + decode_down.BLOCK_RESERVED_BYTES
            assert config["PROGRAMS_PER_SM"] * taken <= decode_down.SM_SHARED_BYTES
        assert {c["PROGRAMS_PER_SM"] for c in configs} == set(decode_down.PROGRAMS_PER_SM)
    # 64 x 128 on 6 stages: 125 KB at 32-row blocks, one program an SM
    deep = [c for c in decode_down.candidates(32, 272, 400, 2) if c["num_stages"] == 6]
    assert [c["PROGRAMS_PER_SM"] for c in deep] == [1]


@needs_kernels
@pytest.mark.parametrize("block_m", [16, 32])
def test_persistent_tiles_give_the_pointer_tiles_bits(block_m):
    """Every config's out equals, bit for bit, the pointer tile's of the same BLOCK_N and
    BLOCK_K, every assignment's row written. D = 208: no multiple of BLOCK_N (the last
    column block wraps); F = 144: no multiple of BLOCK_K; expert 3 gets no rows, so the
    row list ends in fewer blocks than its bound and the tiles past it are never walked."""
    from moebench.impls.triton.align import align_to_blocks
    from moebench.impls.triton.layer import launch_down

    dev, dtype = KERNEL_DEVICE, torch.float16
    tokens, top_k, E, D, F = 40, 2, 6, 208, 144
    generator = torch.Generator().manual_seed(block_m)
    ids_TK = torch.stack(
        [torch.randperm(E - 1, generator=generator)[:top_k] for _ in range(tokens)]
    )
    ids_TK = torch.where(ids_TK >= 3, ids_TK + 1, ids_TK).to(torch.int32).to(dev)
    h = torch.randn(tokens * top_k * 2 + E * block_m, F, generator=generator)
    w_down_EFD = (torch.randn(E, F, D, generator=generator) / 8).to(dtype).to(dev)
    gate_A = torch.rand(tokens * top_k, generator=generator).to(dtype).to(dev)
    alignment = align_to_blocks(ids_TK, E, block_m)
    assert int(alignment.num_padded_1) < alignment.max_rows  # tiles past the row list
    h_PF = h[: alignment.max_rows].to(dtype).to(dev)
    for config in decode_down.candidates(block_m, D, F, 2):
        got_AD, want_AD = (
            torch.full((tokens * top_k, D), float("nan"), device=dev, dtype=dtype) for _ in range(2)
        )
        launch_down(config, h_PF, w_down_EFD, gate_A, got_AD, alignment)
        launch_down(_pointer(config), h_PF, w_down_EFD, gate_A, want_AD, alignment)
        assert not got_AD.isnan().any(), config  # every assignment's row written
        assert torch.equal(got_AD, want_AD), config


def check_every_candidate_compiles() -> None:
    """The body of `test_every_candidate_compiles_for_hopper` (in a process without
    Triton's interpreter): each config at both heights, with and without dependent
    launch, D = 272 and F = 400 (multiples of 16, of no tile), compiled for sm_90 without spills;
    two programs of a config that asks for two fit an SM's shared memory."""
    from moebench import offline_compile
    from moebench.impls.triton.layer import launch_down
    from tests.test_gluon_down import _meta, _meta_alignment

    D, F, E, K, tokens = 272, 400, 8, 2, 64
    configs = []
    with offline_compile.compiling_for() as record:
        for block_m in (16, 32):
            alignment = _meta_alignment(tokens, K, E, block_m)
            for config in decode_down.candidates(block_m, D, F, 2):
                for pdl in (False, True):
                    configs.append(config)
                    launch_down(
                        config, _meta(alignment.max_rows, F), _meta(E, F, D),
                        _meta(tokens * K), _meta(tokens * K, D), alignment, pdl,
                    )  # fmt: skip
    assert (
        len(record)
        == len(configs)
        == 2 * sum(len(decode_down.candidates(m, D, F, 2)) for m in (16, 32))
    )
    for compiled, config in zip(record, configs):
        assert compiled.kernel == "down_decode_persistent_kernel", compiled.describe()
        assert compiled.error is None, compiled.describe()
        assert compiled.stack_bytes == 0, compiled.describe()  # no spills
        # as `shared_bytes` estimates it, so that PROGRAMS_PER_SM programs fit an SM
        tile = (config["BLOCK_N"], config["BLOCK_K"], config["num_warps"], config["num_stages"])
        estimate = decode_down.shared_bytes(config["BLOCK_M"], tile, 2)
        assert compiled.shared_bytes <= estimate, (estimate, compiled.describe())


def test_every_candidate_compiles_for_hopper():
    pytest.importorskip("triton.experimental.gluon", reason="tests/test_gluon_down's helpers")
    in_a_fresh_process("tests.test_decode_down", "check_every_candidate_compiles()")


def check_the_layer_races_them(setting: str | None) -> None:
    """The body of `test_the_layer_races_them_only_when_asked`: 64-token forwards on meta
    tensors at 16- and 32-row blocks, launches recorded (`test_gluon_down.forward_launches`), with
    `$MOEBENCH_DECODE_PERSISTENT` set to `setting` (unset where None): every persistent
    config raced beside the pointer tiles when on, none otherwise."""
    from moebench.env import DECODE_PERSISTENT_SWITCH
    from tests.test_gluon_down import forward_launches

    shape = {"D": 272, "F": 400, "E": 8, "K": 2, "tokens": 64}
    launched, _ = forward_launches(DECODE_PERSISTENT_SWITCH, setting, shape, [16, 32])
    D, F = shape["D"], shape["F"]
    persistent = [kwargs for name, kwargs in launched if name == "down_decode_persistent_kernel"]
    assert any(name == "down_kernel" for name, _ in launched)  # the pointer tiles race too
    if setting != "1":
        assert persistent == []
        return
    for block_m in (16, 32):
        got = [kwargs for kwargs in persistent if kwargs["BLOCK_M"] == block_m]
        assert len(got) == len(decode_down.candidates(block_m, D, F, 2)), (block_m, got)


@pytest.mark.parametrize("setting", [None, "1", "0"])
def test_the_layer_races_them_only_when_asked(setting):
    pytest.importorskip("triton.experimental.gluon", reason="tests/test_gluon_down's helpers")
    in_a_fresh_process("tests.test_decode_down", f"check_the_layer_races_them({setting!r})")


@needs_kernels
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_layer_on_persistent_tiles_alone_matches_reference(dtype, monkeypatch, tmp_path):
    """Forward and gradients of a 40-token training step and its forward at inference
    with only the persistent tiles for the down GEMM (the training step's forward runs
    them too; its backward is the usual one)."""
    from moebench.env import DECODE_PERSISTENT_SWITCH
    from moebench.impls.reference import reference_output
    from moebench.impls.triton import layer, tuning
    from moebench.measure.check import check_gradients
    from tests.test_triton import TOLERANCE, _gpu_case, _relative, built_layer

    if KERNEL_DEVICE == "cpu" and dtype == "bfloat16":
        pytest.skip("Triton's interpreter computes in numpy, which has no bfloat16")
    monkeypatch.setenv(DECODE_PERSISTENT_SWITCH, "1")
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning.TUNER, "_chosen", {})
    every = layer.gemm_candidates

    def persistent_down(name: str, *args) -> list[dict]:
        configs = every(name, *args)
        return [c for c in configs if c.get("PERSISTENT")] if name == "down" else configs

    monkeypatch.setattr(layer, "gemm_candidates", persistent_down)
    ran = []
    launch = decode_down.launch_down

    def recorded(*args):  # (h, w_down, gate weights, out, alignment, config, pdl)
        ran.append(args[5])
        launch(*args)

    monkeypatch.setattr(decode_down, "launch_down", recorded)
    case = _gpu_case((208, 144, 6, 2, 40), dtype, mode="train", device=KERNEL_DEVICE)
    weights, built, x_TD = built_layer(case)
    tolerance = TOLERANCE[dtype]
    with torch.no_grad():
        y_TD = built(x_TD)
    assert ran and all(config["PERSISTENT"] for config in ran), ran
    assert _relative(y_TD, reference_output(weights, x_TD)) <= tolerance
    result = check_gradients(built, [weights], x_TD, dtype, 0)
    assert max(result.errors.values()) <= tolerance, result.errors
