"""The merged-tail tiles (`moebench/impls/triton/merge_tail.py`): which configs are
offered, that every one gives `tma.py`'s or `kernels.py`'s tile of the same BLOCK_N and
BLOCK_K the same bits (in Triton's interpreter on a CPU at 64-row blocks, on a card at 128 too) on a
routing whose experts end in every kind of block, that each compiles for Hopper without
spills, that the layer races them unless turned off (`$MOEBENCH_MERGE_TAIL=0`), and the
layer on these tiles alone against `reference`, forward and gradients."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the merged-tail tiles are Triton kernels")

from moebench.impls.triton import merge_tail, tma, tuning
from tests.conftest import KERNEL_DEVICE, in_a_fresh_process, needs_kernels

# Rows per expert in units of half a block (64-row blocks: 32 rows): expert 0 ends in a
# tail of 3 rows after a full block (merged), expert 1 in one of 23 (more than half a
# block: a full block), expert 2 has only a block's first half (its half alone), expert 3
# no rows, expert 4 two full blocks and a tail of 11 (merged into the second), expert 5
# exactly one block.
HALF_BLOCKS = (2.1, 3.7, 0.6, 0, 4.35, 2)


def _routing(block_m: int, top_k: int = 2) -> torch.Tensor:
    """T x top_k expert ids giving each expert of HALF_BLOCKS its rows (whole tokens: a
    token's slots are the labels t and t + T of the experts' rows laid end to end)."""
    counts = [round(halves * block_m / 2) for halves in HALF_BLOCKS]
    counts[1] += sum(counts) % top_k  # a whole number of tokens
    labels = torch.cat([torch.full((count,), e) for e, count in enumerate(counts)])
    tokens = labels.numel() // top_k
    ids_TK = torch.stack([labels[t::tokens] for t in range(tokens)])
    assert all(len(set(row.tolist())) == top_k for row in ids_TK), "a token's slots repeat"
    return ids_TK.to(torch.int32)


def _block_roles(alignment) -> set[str]:
    """What the routing's blocks do under MERGE_TAIL, from the row list on the host."""
    block_m = alignment.block_m
    experts = alignment.block_expert_B.tolist()
    ids = alignment.sorted_ids_P.tolist()
    blocks = int(alignment.num_padded_1) // block_m
    tail = [ids[b * block_m + block_m // 2] >= alignment.num_assign for b in range(blocks)]
    roles = set()
    for b in range(blocks):
        if tail[b]:
            roles.add("merged" if b and experts[b - 1] == experts[b] else "half alone")
        elif ids[(b + 1) * block_m - 1] >= alignment.num_assign:
            roles.add("full with padding")
    return roles


def _unmerged(config: dict) -> dict:
    """The `tma.py` or `kernels.py` tile of the same BLOCK_N and BLOCK_K (and TMA,
    ONE_DOT, GATHER_A, HALF_TAIL: it skips the same padding rows)."""
    assert config["HALF_TAIL"]
    return {k: v for k, v in config.items() if k != "MERGE_TAIL"}


def test_candidates_from_64_row_blocks_marked_and_fitting():
    assert merge_tail.candidates("down", 32, 2048, 768, 2) == []
    gate_up = merge_tail.candidates("gate_up", 128, 2048, 768, 2)
    assert all(c["HALF_TAIL"] and c["MERGE_TAIL"] for c in gate_up)
    tma_tiles = [c for c in gate_up if c.get("TMA")]
    assert len(tma_tiles) == 2 * len(merge_tail.TILES["gate_up"])  # with and without GATHER_A
    assert all(c["ONE_DOT"] for c in tma_tiles)
    assert sum(bool(c.get("GATHER_A")) for c in gate_up) == len(merge_tail.TILES["gate_up"])
    pointer = [c for c in gate_up if not c.get("TMA")]
    assert len(pointer) == len(merge_tail.POINTER_TILES)
    assert not any(c.get("ONE_DOT") or c.get("GATHER_A") for c in pointer)
    down = merge_tail.candidates("down", 64, 2048, 768, 2)
    assert len(down) == len(merge_tail.TILES["down"]) and all(c["TMA"] for c in down)
    assert not any(c.get("ONE_DOT") or c.get("GATHER_A") for c in down)
    # D = 264, no multiple of 16: GATHER_A's 128-row tiles spill there (264 rows of
    # x, 528 bytes, are whole TMA boxes); F = 96: no 64-column TMA gate_up tile stays
    # inside gate (the pointer tiles take any F); 72 bytes a row: no TMA box
    odd = [c for c in merge_tail.candidates("gate_up", 128, 264, 768, 2) if c.get("TMA")]
    assert len(odd) == len(merge_tail.TILES["gate_up"]) and not any(c.get("GATHER_A") for c in odd)
    assert merge_tail.candidates("gate_up", 128, 2048, 96, 2) == pointer
    assert merge_tail.candidates("down", 128, 36, 768, 2) == []


@needs_kernels
@pytest.mark.parametrize("block_m", [64, 128])
def test_merged_tiles_give_the_unmerged_tiles_bits(block_m):
    """Every config's h (and pre-activations) and out equal, bit for bit, those of the
    TMA or pointer tile with the same columns and K steps, with HALF_TAIL: a merged
    tail's rows are its own half path's, and the padding both skip stays unwritten.
    D = 72: no multiple of BLOCK_K."""
    from moebench.impls.triton.align import align_to_blocks
    from moebench.impls.triton.layer import launch_down, launch_gate_up

    if KERNEL_DEVICE == "cpu" and block_m > 64:
        pytest.skip("large blocks: CUDA only")
    dev, dtype = KERNEL_DEVICE, torch.float16
    ids_TK = _routing(block_m).to(dev)
    tokens, top_k = ids_TK.shape
    E, D, F = len(HALF_BLOCKS), 72, 128
    generator = torch.Generator().manual_seed(block_m)
    x_TD = torch.randn(tokens, D, generator=generator).to(dtype).to(dev)
    w_gate_up_E2FD = (torch.randn(E, 2 * F, D, generator=generator) / 8).to(dtype).to(dev)
    w_down_EFD = (torch.randn(E, F, D, generator=generator) / 8).to(dtype).to(dev)
    gate_A = torch.rand(tokens * top_k, generator=generator).to(dtype).to(dev)
    alignment = align_to_blocks(ids_TK, E, block_m)
    assert _block_roles(alignment) == {"merged", "half alone", "full with padding"}
    rows = alignment.max_rows

    def nans(*shape: int) -> torch.Tensor:
        return torch.full(shape, float("nan"), device=dev, dtype=dtype)

    for config in merge_tail.candidates("gate_up", block_m, D, F, 2):
        got, want = ([nans(rows, F) for _ in range(3)] for _ in range(2))
        for h_and_pre, tile in ((got, config), (want, _unmerged(config))):
            launch_gate_up(
                tile, x_TD, w_gate_up_E2FD, h_and_pre[0], alignment, top_k, h_and_pre[1:]
            )
        for mine, theirs in zip(got, want):
            torch.testing.assert_close(
                mine, theirs, rtol=0, atol=0, equal_nan=True, msg=str(config)
            )
        h_PF = got[0]
    assert h_PF[: int(alignment.num_padded_1)].isnan().any(), "no padding left unwritten"
    h_PF = h_PF.nan_to_num()  # (the padding halves both skip hold NaN: not multiplied)
    for config in merge_tail.candidates("down", block_m, D, F, 2):
        got_AD, want_AD = nans(tokens * top_k, D), nans(tokens * top_k, D)
        launch_down(config, h_PF, w_down_EFD, gate_A, got_AD, alignment)
        launch_down(_unmerged(config), h_PF, w_down_EFD, gate_A, want_AD, alignment)
        assert not got_AD.isnan().any(), config  # every assignment's row written
        assert torch.equal(got_AD, want_AD), config


def check_every_candidate_compiles() -> None:
    """The body of `test_every_candidate_compiles_for_hopper` (in a process without
    Triton's interpreter): each config of both GEMMs at both heights, D = 272 (no multiple
    of a tile; of 16, as GATHER_A's tiles need), F = 384, training's gate_up (the
    pre-activations stored) too, compiled for sm_90 without spills and within a block's
    shared memory."""
    from moebench import offline_compile
    from moebench.impls.triton.layer import launch_down, launch_gate_up
    from tests.test_gluon_down import _meta, _meta_alignment

    D, F, E, K, tokens = 272, 384, 8, 2, 1024
    launched = 0
    with offline_compile.compiling_for() as record:
        for block_m in (64, 128):
            alignment = _meta_alignment(tokens, K, E, block_m)
            rows = alignment.max_rows
            for config in merge_tail.candidates("gate_up", block_m, D, F, 2):
                for pre in (None, (_meta(rows, F), _meta(rows, F))):
                    launch_gate_up(
                        config, _meta(tokens, D), _meta(E, 2 * F, D), _meta(rows, F),
                        alignment, K, pre,
                    )  # fmt: skip
                    launched += 1
            for config in merge_tail.candidates("down", block_m, D, F, 2):
                launch_down(
                    config, _meta(rows, F), _meta(E, F, D), _meta(tokens * K),
                    _meta(tokens * K, D), alignment,
                )  # fmt: skip
                launched += 1
    merged = [r for r in record if r.kernel.endswith("merged_kernel")]
    gate_up = 2 * len(merge_tail.TILES["gate_up"]) + len(merge_tail.POINTER_TILES)
    tiles = gate_up * 2 + len(merge_tail.TILES["down"])  # gate_up with and without pre
    assert len(merged) == launched == 2 * tiles, [r.describe() for r in record]
    for compiled in merged:
        assert compiled.error is None, compiled.describe()
        assert compiled.stack_bytes == 0, compiled.describe()  # no spills
        assert compiled.shared_bytes <= 232448, compiled.describe()


def check_the_layer_races_them(setting: str | None) -> None:
    """The body of `test_the_layer_races_them_unless_turned_off`
    (`test_gluon_down.forward_launches`, `$MOEBENCH_MERGE_TAIL` set to `setting`, unset
    where None, at both row-block heights)."""
    from moebench.env import MERGE_TAIL_SWITCH
    from tests.test_gluon_down import RACE_SHAPE, forward_launches

    launched, heights = forward_launches(MERGE_TAIL_SWITCH, setting)
    asked = setting != "0"
    D, F = RACE_SHAPE["D"], RACE_SHAPE["F"]
    assert 64 in heights and 128 in heights
    for name in ("gate_up", "down"):
        kernels = {kernel.fn.__name__ for kernel in merge_tail.KERNELS[name]}
        merged = [kwargs for ran, kwargs in launched if ran in kernels]
        if not asked:
            assert merged == [], name
            continue
        for block_m in heights:
            got = [kwargs for kwargs in merged if kwargs["BLOCK_M"] == block_m]
            assert len(got) == len(merge_tail.candidates(name, block_m, D, F, 2)), (name, block_m)
    # the TMA tiles race beside them either way
    assert any(name == "down_tma_kernel" for name, _ in launched)


def test_every_candidate_compiles_for_hopper():
    pytest.importorskip("triton.experimental.gluon", reason="tests/test_gluon_down's helpers")
    in_a_fresh_process("tests.test_merge_tail", "check_every_candidate_compiles()")


@pytest.mark.parametrize("setting", [None, "1", "0"])
def test_the_layer_races_them_unless_turned_off(setting):
    pytest.importorskip("triton.experimental.gluon", reason="tests/test_gluon_down's helpers")
    in_a_fresh_process("tests.test_merge_tail", f"check_the_layer_races_them({setting!r})")


@needs_kernels
@pytest.mark.parametrize("gate_up_kind", ["tma", "pointer"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_layer_on_merged_tiles_alone_matches_reference(dtype, gate_up_kind, monkeypatch, tmp_path):
    """Forward and gradients with only the merged-tail tiles to choose from (gate_up's
    TMA or pointer ones; the training step's gate_up stores its pre-activations through
    them, and the backward runs on their rows), at 64-row blocks (CPU) or 128 (CUDA)."""
    from moebench.env import MERGE_TAIL_SWITCH
    from moebench.impls.reference import reference_output
    from moebench.impls.triton import kernels, layer
    from moebench.impls.triton.align import Alignment
    from moebench.measure.check import check_gradients
    from tests.test_triton import TOLERANCE, _gpu_case, _relative, built_layer

    if KERNEL_DEVICE == "cpu" and dtype == "bfloat16":
        pytest.skip("Triton's interpreter computes in numpy, which has no bfloat16")
    monkeypatch.setenv(MERGE_TAIL_SWITCH, "1")
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning.TUNER, "_chosen", {})
    every = layer.gemm_candidates

    def merged(name: str, *args) -> list[dict]:
        configs = [c for c in every(name, *args) if c.get("MERGE_TAIL")]
        if name == "gate_up":
            configs = [c for c in configs if bool(c.get("TMA")) == (gate_up_kind == "tma")]
        return configs

    monkeypatch.setattr(layer, "gemm_candidates", merged)
    ran = []  # (kernel, alignment) of the merged-tail tiles' launches
    merged_kernels = [kernel for pair in merge_tail.KERNELS.values() for kernel in pair]
    for module, name in (
        (tma, "launch_gate_up"),
        (tma, "launch_down"),
        (kernels, "launch_gate_up"),
    ):
        launch = getattr(module, name)

        def recorded(*args, launch=launch):
            if args[-1] in merged_kernels:  # tile_kernel
                ran.append((args[-1], next(a for a in args if isinstance(a, Alignment))))
            launch(*args)

        monkeypatch.setattr(module, name, recorded)
    # 64-row blocks (CPU: the block size for 60 rows an expert on average; the router
    # gives some experts more, and so a tail to merge) or 128-row blocks (CUDA: about 300
    # rows an expert, two blocks and a tail of under 64 rows)
    tokens = 120 if KERNEL_DEVICE == "cpu" else 600
    case = _gpu_case((200, 128, 4, 2, tokens), dtype, mode="train", device=KERNEL_DEVICE)
    weights, built, x_TD = built_layer(case)
    tolerance = TOLERANCE[dtype]
    with torch.no_grad():
        y_TD = built(x_TD)
    gate_up = merge_tail.KERNELS["gate_up"][0 if gate_up_kind == "tma" else 1]
    assert {kernel for kernel, _ in ran} == {gate_up, merge_tail.KERNELS["down"][0]}, ran
    roles = set().union(*(_block_roles(alignment) for _, alignment in ran))
    assert "merged" in roles, roles
    assert _relative(y_TD, reference_output(weights, x_TD)) <= tolerance
    result = check_gradients(built, [weights], x_TD, dtype, 0)
    assert max(result.errors.values()) <= tolerance, result.errors
