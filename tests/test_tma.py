"""The fused layer's TMA tiles (`moebench/impls/triton/tma.py`): every candidate against
float32 per-row products (D not a multiple of any tile, an expert with no tokens,
padding rows zero), which shapes they are offered for, and the layer's forward and
gradients against `reference` with only TMA tiles to choose from. In Triton's
interpreter on a CPU (float16), and on a card (skipped without one)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the TMA tiles are Triton kernels")

from moebench.impls.reference import reference_output
from moebench.impls.triton import tma, tuning
from moebench.measure.check import check_gradients
from tests.conftest import KERNEL_DEVICE, needs_kernels
from tests.test_triton import TOLERANCE, _gpu_case, _relative, built_layer, float32_problem


def test_fits_refuses_a_tile_crossing_into_the_next_experts_rows():
    gate_up = {"BLOCK_N": 128, "BLOCK_K": 64}
    down = {"BLOCK_N": 256, "BLOCK_K": 64}
    assert tma.fits("gate_up", gate_up, 72, 256, 2)
    assert not tma.fits("gate_up", gate_up, 72, 192, 2)  # gate's last tile into up
    assert tma.fits("down", down, 72, 192, 2)
    assert not tma.fits("down", down, 72, 200, 2)  # a K tile into the next expert
    assert not tma.fits("down", down, 36, 192, 2)  # a row of 72 bytes: not 16-aligned
    assert tma.fits("down", down, 36, 192, 4)


def test_candidates_only_from_64_row_blocks_and_marked():
    assert tma.candidates("gate_up", 32, 4096, 14336, 2) == []
    configs = tma.candidates("down", 128, 4096, 14336, 2)
    assert configs and all(c["TMA"] and c["BLOCK_M"] == 128 for c in configs)
    # Qwen3-30B-A3B's F = 768: the 128-column gate_up tiles fit, DeepSeek-V3's 2048 too
    configs = tma.candidates("gate_up", 64, 2048, 768, 2)
    tiles = len(tma.TILES["gate_up"])
    # each tile plain, with HALF_TAIL and persistent (never both), as two dots, one dot,
    # and one dot with A gathered by pointers
    assert len(configs) == 9 * tiles
    assert sum(bool(config.get("HALF_TAIL")) for config in configs) == 3 * tiles
    assert sum(bool(config.get("PERSISTENT")) for config in configs) == 3 * tiles
    assert not any(c.get("HALF_TAIL") and c.get("PERSISTENT") for c in configs)
    assert sum(bool(config.get("ONE_DOT")) for config in configs) == 6 * tiles
    assert all(c.get("ONE_DOT") for c in configs if c.get("GATHER_A"))
    assert sum(bool(config.get("GATHER_A")) for config in configs) == 3 * tiles
    down = tma.candidates("down", 64, 2048, 768, 2)
    assert not any(c.get("ONE_DOT") for c in down)
    # down: each tile plain, with HALF_TAIL, and persistent (never both)
    assert len(down) == 3 * len(tma.TILES["down"])
    persistent = [c for c in down if c.get("PERSISTENT")]
    assert len(persistent) == len(tma.TILES["down"])
    assert not any(c.get("HALF_TAIL") for c in persistent)
    # F = 96: no gate_up tile (64 or 128 columns) stays inside gate
    assert tma.candidates("gate_up", 64, 2048, 96, 2) == []


@needs_kernels
@pytest.mark.parametrize(("tokens", "block_m"), [(70, 64), (300, 128)])
def test_every_tma_candidate_matches_a_float32_loop(tokens, block_m):
    from moebench.impls.triton.align import align_to_blocks

    if KERNEL_DEVICE == "cpu" and block_m > 64:
        pytest.skip("large blocks: CUDA only")
    dev = KERNEL_DEVICE
    # D = 72: no multiple of BLOCK_K (TMA's zero fill); F = 128: every tile fits
    x_TD, w_gate_up_E2FD, w_down_EFD, ids_TK, gate_A, pre_A2F, h_AF, out_AD = float32_problem(
        tokens, 72, 128, 5, 2
    )
    D, F = x_TD.shape[1], w_down_EFD.shape[1]
    alignment = align_to_blocks(ids_TK.to(torch.int32).to(dev), w_down_EFD.shape[0], block_m)
    rows, num_padded = alignment.max_rows, int(alignment.num_padded_1)
    row_ids = alignment.sorted_ids_P.long().cpu()[:num_padded]
    real = row_ids < alignment.num_assign
    # which rows a HALF_TAIL tile skips: the second half of a block whose second half is
    # padding alone; the problem must have such blocks, and blocks without
    skipped = torch.zeros(num_padded, dtype=torch.bool)
    for first in range(0, num_padded, block_m):
        if not real[first + block_m // 2]:
            skipped[first + block_m // 2 : first + block_m] = True
    assert 0 < int(skipped.sum()) < int((~real).sum()), "no half tail, or only half tails"
    configs = tma.candidates("gate_up", block_m, D, F, 2)
    assert len(configs) == 9 * len(tma.TILES["gate_up"])
    for config in configs:
        h_PF, gate_pre_PF, up_pre_PF = (
            torch.full((rows, F), float("nan"), device=dev, dtype=x_TD.dtype) for _ in range(3)
        )
        tma.launch_gate_up(
            x_TD.to(dev), w_gate_up_E2FD.to(dev), h_PF, alignment, 2, config,
            (gate_pre_PF, up_pre_PF),
        )  # fmt: skip
        for got, want in ((h_PF, h_AF), (gate_pre_PF, pre_A2F[:, :F]), (up_pre_PF, pre_A2F[:, F:])):
            got = got.float().cpu()[:num_padded]
            torch.testing.assert_close(
                got[real], want[row_ids[real]], rtol=2e-2, atol=2e-2, msg=str(config)
            )
            # padding rows computed hold zeros, as the pointer kernel leaves them; those a
            # HALF_TAIL tile skips are left as they were (the NaNs), as the pointer's are
            computed = ~skipped if config.get("HALF_TAIL") else torch.ones_like(real)
            assert (got[~real & computed] == 0).all(), config
            assert got[~computed].isnan().all(), config
    h_PF = torch.zeros(rows, F)
    h_PF[:num_padded][real] = h_AF[row_ids[real]]
    configs = tma.candidates("down", block_m, D, F, 2)
    assert configs
    for config in configs:
        got_AD = torch.full((tokens * 2, D), float("nan"), device=dev, dtype=x_TD.dtype)
        tma.launch_down(
            h_PF.to(x_TD.dtype).to(dev), w_down_EFD.to(dev), gate_A.to(dev), got_AD, alignment,
            config,
        )  # fmt: skip
        torch.testing.assert_close(
            got_AD.float().cpu(), out_AD, rtol=2e-2, atol=2e-2, msg=str(config)
        )


@needs_kernels
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_layer_on_tma_tiles_alone_matches_reference(dtype, monkeypatch, tmp_path):
    """Forward and gradients with the pointer kernels' candidates taken away: the tuner
    can only pick TMA tiles, at 64-row blocks (CPU) or 128 (CUDA)."""
    if KERNEL_DEVICE == "cpu" and dtype == "bfloat16":
        pytest.skip("Triton's interpreter computes in numpy, which has no bfloat16")
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning.TUNER, "_chosen", {})
    monkeypatch.setattr(tuning, "candidates", lambda kernel, block_m: [])
    ran = []

    def counted(name: str):
        launch = getattr(tma, name)

        def run(*args, **kwargs):
            ran.append(name)
            launch(*args, **kwargs)

        return run

    for name in ("launch_gate_up", "launch_down"):
        monkeypatch.setattr(tma, name, counted(name))
    tokens = 100 if KERNEL_DEVICE == "cpu" else 2048  # 64- and 128-row blocks
    case = _gpu_case((200, 128, 4, 2, tokens), dtype, mode="train", device=KERNEL_DEVICE)
    weights, layer, x_TD = built_layer(case)
    tolerance = TOLERANCE[dtype]
    with torch.no_grad():
        y_TD = layer(x_TD)
    assert set(ran) == {"launch_gate_up", "launch_down"}, ran
    assert _relative(y_TD, reference_output(weights, x_TD)) <= tolerance
    result = check_gradients(layer, [weights], x_TD, dtype, 0)
    assert max(result.errors.values()) <= tolerance, result.errors


@needs_kernels
@pytest.mark.parametrize("gemm", ["gate_up", "down"])
def test_tail_probe_runs_every_variant_and_they_agree(gemm, tmp_path, capsys):
    """scripts/tail_probe.py end to end at a small shape: each rows-per-expert count and
    variant timed, and every variant's output equal to the pointer tile's on the real
    rows (the TMA tiles' gather, one dot, half and merged-tail paths included); the Gluon
    variants (no interpreter) left out on a CPU, run on a card (version 42's CUDA run
    found this test expecting the CPU's list there)."""
    import json
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "tail_probe.py"))
    # 64-row blocks: 32 rows an expert fill half a block, 40 a bit more, 72 a block and
    # a tail of 8 (MERGE_TAIL's)
    out = tmp_path / "tail.json"
    args = ["--shape", "64", "128", "4", "2", "--rows", "32", "40", "72", "--block-m", "64"]
    args += ["--gemm", gemm, "--warm-s", "0", "--rounds", "1", "--json", str(out)]
    assert script["main"](args) == 0
    found = json.loads(out.read_text())
    variants = script["GEMMS"][gemm]
    on_cpu = [name for name, variant in variants.items() if not variant.get("GLUON_WS")]
    assert "pointer" in on_cpu and len(on_cpu) < len(variants)  # (Gluon ones are listed)
    ran = {label.split(" ", 1)[1] for label in found}
    # on a CPU all but the Gluon variants; on a card the Gluon ones too, where it takes them
    assert set(on_cpu) <= ran <= set(variants)
    assert KERNEL_DEVICE != "cpu" or ran == set(on_cpu)
    assert set(found) == {f"{rows} {name}" for rows in (32, 40, 72) for name in ran}
    for label, result in found.items():
        assert result["ms"] > 0, label
        assert result["max_diff"] <= 2e-2, (label, result)  # float16 sums in another order
    printed = capsys.readouterr().out
    assert f"{gemm}, D 64" in printed and "MERGE_TAIL" in printed


@needs_kernels
def test_tail_probe_races_the_tile_order_and_it_changes_no_bit(tmp_path):
    """--group-m: each variant at each GROUP_M, labelled; the order of the tiles moves
    no output bit (each tile's sums are the same)."""
    import json
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "tail_probe.py"))
    out = tmp_path / "tail.json"
    # 3 blocks an expert (64-row blocks, 136 rows): GROUP_M 2 splits experts, 3 does not
    args = ["--shape", "64", "128", "4", "2", "--rows", "136", "--block-m", "64"]
    args += ["--group-m", "3", "2", "--only", "pointer", "TMA, GATHER_A, HALF_TAIL"]
    args += ["--warm-s", "0", "--rounds", "1", "--json", str(out)]
    assert script["main"](args) == 0
    found = json.loads(out.read_text())
    names = ("pointer", "TMA, GATHER_A, HALF_TAIL")
    assert set(found) == {f"136 {name} G{g}" for name in names for g in (3, 2)}
    assert found["136 pointer G2"]["max_diff"] == 0
    assert found["136 TMA, GATHER_A, HALF_TAIL G2"]["max_diff"] <= 2e-2


@needs_kernels
def test_tail_probe_routes_tokens_at_random_too(tmp_path):
    """--tokens: T tokens on random routing beside the even rows ("<T>tok"), every
    variant's output on each assignment equal to the first's."""
    import json
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "tail_probe.py"))
    out = tmp_path / "tail.json"
    args = ["--shape", "64", "128", "4", "2", "--rows", "32", "--tokens", "50", "--block-m", "64"]
    args += ["--only", "pointer", "TMA, GATHER_A, HALF_TAIL"]
    args += ["--warm-s", "0", "--rounds", "1", "--json", str(out)]
    assert script["main"](args) == 0
    found = json.loads(out.read_text())
    names = ("pointer", "TMA, GATHER_A, HALF_TAIL")
    assert set(found) == {f"{case} {name}" for case in ("32", "50tok") for name in names}
    assert found["50tok TMA, GATHER_A, HALF_TAIL"]["max_diff"] <= 2e-2
    assert found["50tok pointer"]["ms"] > 0


@needs_kernels
def test_tail_probe_reports_one_wrong_assignment_row(monkeypatch, tmp_path):
    """The probe's comparison is a check: a variant that overwrites one assignment's row
    of h with ones (after its real launch; h's values are about 0.01 here) shows the
    difference, on even rows and on random routing, while the unchanged variant shows
    none."""
    import json
    import runpy
    from pathlib import Path

    from moebench.impls.triton import layer

    real_launch = layer.launch_gate_up

    def one_row_wrong(config, x_TD, w_E2FD, out, alignment, top_k, *rest):
        real_launch(config, x_TD, w_E2FD, out, alignment, top_k, *rest)
        if config.get("TMA"):
            out[alignment.row_of_assign_A[-1].long()] = 1.0

    monkeypatch.setattr(layer, "launch_gate_up", one_row_wrong)
    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "tail_probe.py"))
    out = tmp_path / "tail.json"
    args = ["--shape", "64", "128", "4", "2", "--rows", "32", "--tokens", "50", "--block-m", "64"]
    args += ["--only", "pointer", "TMA, GATHER_A, HALF_TAIL"]
    args += ["--warm-s", "0", "--rounds", "1", "--json", str(out)]
    assert script["main"](args) == 0
    found = json.loads(out.read_text())
    for case in ("32", "50tok"):
        assert found[f"{case} pointer"]["max_diff"] == 0
        assert found[f"{case} TMA, GATHER_A, HALF_TAIL"]["max_diff"] > 0.9, found


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "TMA, TWO_DOTS"], "no gate_up variant"),
        (["--group-m", "0"], "at least 1"),
        (["--tokens", "0"], "route at least 1 token"),
    ],
)
def test_tail_probe_names_a_bad_option(args, message, capsys):
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "tail_probe.py"))
    with pytest.raises(SystemExit):
        script["main"](args)
    assert message in capsys.readouterr().err


def test_tail_probe_refuses_rows_that_make_no_whole_token_count():
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "tail_probe.py"))
    with pytest.raises(SystemExit, match="--rows 3"):
        script["probe"](64, 128, 4, 8, [3], 64, 0, 1, "cpu", torch.float16)
