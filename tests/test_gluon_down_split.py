"""The down GEMM with its K loop split in two (`moebench/impls/triton/gluon_down_split.py`,
an experiment behind `$MOEBENCH_DOWN_SPLIT_K=1`): which configs it offers, that each
compiles for Hopper on this host (Gluon has no interpreter), that the layer races it only
when turned on and then times down's candidates with the sum over slots after them, and,
on a Hopper card only, that each config's two partial rows sum to the whole kernel's row
and the layer's forward on them matches `reference`."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="Gluon is Triton 3.4's and later")

from moebench.impls.triton import gluon_down, gluon_down_split, tma, tuning
from tests.conftest import in_a_fresh_process
from tests.test_gluon_down import (
    ODD_SHAPES,
    RACE_SHAPE,
    _meta,
    _meta_alignment,
    forward_launches,
    odd_down_inputs,
)

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="Gluon's wgmma kernels need a Hopper card")


def test_candidates_are_the_gluon_down_tiles_split_in_two():
    whole = gluon_down.candidates(128, 2048, 768, 2)
    split = gluon_down_split.candidates(128, 2048, 768, 2)
    assert split == [{**config, "SPLIT_K": 2} for config in whole]
    assert gluon_down_split.candidates(32, 2048, 768, 2) == []
    # F = 448: 7 steps of 64 do not split in two equal shares
    assert gluon_down.candidates(128, 2048, 448, 2)
    assert gluon_down_split.candidates(128, 2048, 448, 2) == []
    from moebench.impls.triton.layer import down_rows

    assert [down_rows(c) for c in (split[0], whole[0])] == [2, 1]


def check_every_candidate_compiles() -> None:
    """The body of `test_every_candidate_compiles_for_hopper` (in a process without
    Triton's interpreter): each config at both heights, D = 264 and F = 384 (6 steps of
    64, 3 a share), compiled for sm_90 without spills, within the shared memory `fits`
    takes."""
    from moebench import offline_compile

    D, F, E, K, tokens = 264, 384, 8, 2, 1024
    configs = []
    with offline_compile.compiling_for() as record:
        for block_m in (64, 128):
            alignment = _meta_alignment(tokens, K, E, block_m)
            for config in gluon_down_split.candidates(block_m, D, F, 2):
                configs.append(config)
                gluon_down_split.launch_down(
                    _meta(alignment.max_rows, F), _meta(E, F, D), _meta(tokens * K),
                    _meta(tokens * K * 2, D), alignment, config, 132,
                )  # fmt: skip
    assert len(record) == len(configs) == 8, [r.describe() for r in record]
    for compiled, config in zip(record, configs):
        assert compiled.error is None, compiled.describe()
        assert compiled.stack_bytes == 0, compiled.describe()
        assert compiled.warps == (12 if config["BLOCK_M"] == 128 else 8), compiled.describe()
        assert compiled.shared_bytes <= gluon_down.shared_bytes(config, 2) + 1024


def test_every_candidate_compiles_for_hopper():
    in_a_fresh_process("tests.test_gluon_down_split", "check_every_candidate_compiles()")


def check_the_layer_races_it(setting: str | None) -> None:
    """The body of `test_the_layer_races_it_only_when_turned_on`: with the switch on,
    every split config of each height beside gluon_down.py's, and down's candidates each
    followed by the sum over slots (the split ones sum twice the rows); else none, and
    down's candidates timed alone."""
    from moebench.env import DOWN_SPLIT_K_SWITCH
    from moebench.impls.triton import layer

    launched, heights = forward_launches(DOWN_SPLIT_K_SWITCH, setting)
    D, F, K = RACE_SHAPE["D"], RACE_SHAPE["F"], RACE_SHAPE["K"]
    names = [name for name, _ in launched]
    split = [kwargs for name, kwargs in launched if name == "down_split_ws_kernel"]
    if setting != "1":
        assert split == []
        # each forward: gate_up's race, down's race, then the one sum over slots
        assert names.count("token_sum_kernel") == len(heights)
        return
    wanted = [c for b in heights for c in gluon_down_split.candidates(b, D, F, 2)]
    assert wanted and len(split) == len(wanted)
    for kwargs, config in zip(split, wanted):
        assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"]) == (config["BLOCK_M"], config["BLOCK_N"])
    assert "down_ws_kernel" in names  # the whole kernel races beside it
    # every down candidate is followed by its sum: over K rows a token, 2 K for a split
    downs = {kernel.fn.__name__ for kernel in layer.gemm_code("down", True, True, True, True)}
    timed = [i for i, (name, _) in enumerate(launched) if name in downs]
    assert len(timed) > len(split)
    for i in timed:
        name, (following, kwargs) = launched[i][0], launched[i + 1]
        assert following == "token_sum_kernel", (name, following)
        rows_a_token = kwargs["args"][4]  # (token_sum_kernel's top_k)
        assert rows_a_token == (2 * K if name == "down_split_ws_kernel" else K), name
    # the chosen config's launch is summed once, by the forward itself
    assert not any(first == second == "token_sum_kernel" for first, second in pairwise(names))


@pytest.mark.parametrize("setting", [None, "0", "1"])
def test_the_layer_races_it_only_when_turned_on(setting):
    in_a_fresh_process("tests.test_gluon_down_split", f"check_the_layer_races_it({setting!r})")


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "experts", "top_k", "block_m"), ODD_SHAPES)
def test_the_two_halves_sum_to_the_whole_kernels_row(tokens, experts, top_k, block_m, dtype):
    """On odd shapes (D = 264: no multiple of a tile; an expert without tokens; top_k 1
    and = the experts), each config writes both rows of every assignment, and their sum
    is the whole kernel's row within the roundings of the two halves."""
    D, F = 264, 384
    alignment, h_PF, w_down_EFD, gate_A = odd_down_inputs(tokens, experts, top_k, block_m, dtype)
    programs = tma.multiprocessors(h_PF.device)
    configs = gluon_down_split.candidates(block_m, D, F, 2)
    assert configs
    for config in configs:
        whole = {key: value for key, value in config.items() if key != "SPLIT_K"}
        want_AD = torch.full((tokens * top_k, D), float("nan"), device="cuda", dtype=dtype)
        gluon_down.launch_down(h_PF, w_down_EFD, gate_A, want_AD, alignment, whole, programs)
        got_RD = torch.full((tokens * top_k * 2, D), float("nan"), device="cuda", dtype=dtype)
        gluon_down_split.launch_down(h_PF, w_down_EFD, gate_A, got_RD, alignment, config, programs)
        torch.cuda.synchronize()
        assert not got_RD.isnan().any(), config  # both rows of every assignment written
        halves = got_RD.view(-1, 2, D).float().sum(1)
        # each half rounded once: within two roundings of the larger half's magnitude
        ulp = torch.finfo(dtype).eps * got_RD.view(-1, 2, D).float().abs().amax(1)
        assert ((halves - want_AD.float()).abs() <= 2 * ulp + 1e-6).all(), config


@needs_hopper
def test_layer_on_the_split_down_alone_matches_reference(monkeypatch, tmp_path):
    """The layer's forward with only split configs to choose from for down: the tuner
    picks one, and the output (its halves summed with the slots) matches `reference`."""
    from moebench.env import DOWN_SPLIT_K_SWITCH
    from moebench.impls.reference import reference_output
    from moebench.impls.triton import layer
    from tests.test_triton import TOLERANCE, _gpu_case, _relative, built_layer

    monkeypatch.setenv(DOWN_SPLIT_K_SWITCH, "1")
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning.TUNER, "_chosen", {})
    every = layer.gemm_candidates

    def candidates(name, *args, **kwargs):
        configs = every(name, *args, **kwargs)
        return [c for c in configs if c.get("SPLIT_K")] if name == "down" else configs

    monkeypatch.setattr(layer, "gemm_candidates", candidates)
    ran = []
    launch = gluon_down_split.launch_down
    monkeypatch.setattr(gluon_down_split, "launch_down", lambda *a: (ran.append(a[5]), launch(*a)))
    case = _gpu_case((264, 384, 6, 2, 2048), "bfloat16", mode="forward", device="cuda")
    weights, built, x_TD = built_layer(case)
    with torch.no_grad():
        y_TD = built(x_TD)
    assert ran and all(config.get("SPLIT_K") == 2 for config in ran)
    assert _relative(y_TD, reference_output(weights, x_TD)) <= TOLERANCE["bfloat16"]
