"""The swapped gate_up experiment (`moebench/impls/triton/gluon_gate_up_rows.py`): its unit
table (in Triton's interpreter on a CPU, or on a card), that every config compiles for
Hopper on this host without spills, and, on a Hopper card only, that its h equals the
shipped Gluon tile's for every assignment on odd shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="Gluon is Triton 3.4's and later")

from moebench.impls.triton import gluon_common, gluon_gate_up, gluon_gate_up_rows, tma
from tests.conftest import KERNEL_DEVICE, in_a_fresh_process, needs_kernels
from tests.test_gluon_down import _meta, needs_hopper


def _ids_for_rows(rows_E: list[int], top_k: int = 1) -> torch.Tensor:
    """Top-1 expert ids giving expert e exactly rows_E[e] rows, in a shuffled order."""
    ids = torch.cat([torch.full((n,), e, dtype=torch.int32) for e, n in enumerate(rows_E)])
    return ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))][:, None]


@needs_kernels
def test_row_units_split_each_experts_blocks_as_evenly_as_six_allow():
    """Each expert's 64-row blocks in ceil(blocks / 6) units, heights apart by at most
    one, the taller first; experts with no rows give none; entries are first block * 8
    + height, in row order."""
    from moebench.impls.triton.align import align_to_blocks

    rows_E = [0, 1, 64, 65, 200, 384, 385, 129, 830]
    # blocks:  0, 1,  1,  2,   4,   6,   7,   3,  13
    alignment = align_to_blocks(_ids_for_rows(rows_E).to(KERNEL_DEVICE), len(rows_E), 64)
    units_R, num_units_1 = gluon_gate_up_rows.row_units(alignment, len(rows_E))
    heights = [[], [1], [1], [2], [4], [6], [4, 3], [3], [5, 4, 4]]
    want, block = [], 0
    for expert_heights in heights:
        for height in expert_heights:
            want.append(block * 8 + height)
            block += height
    assert int(num_units_1) == len(want)
    assert units_R[: len(want)].tolist() == want
    assert block == int(alignment.num_padded_1) // 64  # every block in one unit


def test_candidates_fit_shared_memory_and_refuse_what_the_tma_tiles_refuse():
    configs = gluon_gate_up_rows.candidates(4096, 14336, 2)
    assert len(configs) == len(gluon_gate_up_rows.TILES)
    for config in configs:
        assert config["GLUON_ROWS"] and config["BLOCK_M"] == 64
        assert gluon_gate_up_rows.shared_bytes(config, 2) <= gluon_common.SHARED_BYTES
    assert gluon_gate_up_rows.candidates(264, 352, 2) == []  # an N tile from gate into up
    assert gluon_gate_up_rows.candidates(260, 384, 2) == []  # rows not 16-byte aligned


def check_every_candidate_compiles() -> None:
    """The body of `test_every_candidate_compiles_for_hopper`: each config for Mixtral-8x7B's
    shape and an odd one (D = 264), compiled for sm_90 without spills, on two consumer
    warp groups and the loader's."""
    from moebench import offline_compile
    from moebench.impls.triton.align import Alignment, max_padded_rows

    ids = torch.int32
    compiled_configs = []
    with offline_compile.compiling_for() as record:
        for D, F, E, K, tokens in ((4096, 14336, 8, 2, 1024), (264, 384, 5, 2, 300)):
            rows = max_padded_rows(tokens * K, E, 64)
            alignment = Alignment(
                _meta(rows, dtype=ids), _meta(rows // 64, dtype=ids), _meta(1, dtype=ids),
                _meta(E, dtype=ids), None, tokens * K, 64,
            )  # fmt: skip
            for config in gluon_gate_up_rows.candidates(D, F, 2):
                compiled_configs.append(config)
                gluon_gate_up_rows.launch_gate_up(
                    _meta(tokens, D), _meta(E, 2 * F, D), _meta(rows, F), alignment, K,
                    config, 132,
                )  # fmt: skip
    gemms = [r for r in record if r.describe().startswith("gate_up_rows_kernel")]
    assert len(gemms) == len(compiled_configs) == 2 * len(gluon_gate_up_rows.TILES)
    for compiled, config in zip(gemms, compiled_configs):
        assert compiled.error is None, compiled.describe()
        assert compiled.stack_bytes == 0, compiled.describe()  # no spills
        assert compiled.warps == 12, compiled.describe()
        bound = gluon_gate_up_rows.shared_bytes(config, 2) + 1024  # the barriers apart
        assert compiled.shared_bytes <= bound, compiled.describe()


def test_every_candidate_compiles_for_hopper():
    in_a_fresh_process("tests.test_gluon_gate_up_rows", "check_every_candidate_compiles()")


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "rows_E",
    [[0, 1, 64, 65, 200, 384, 385, 129, 830], [5, 0, 130, 70], [191, 192, 193, 320, 257]],
)
def test_every_candidate_gives_each_assignment_the_gluon_tiles_h(rows_E, dtype):
    """On odd shapes (D = 264: no multiple of a K box; experts without rows; units of one
    to six blocks, an expert of several units; warp groups of none to three blocks), each
    config's h row of every assignment equals the shipped
    Gluon tile's (128-row blocks) bit for bit, and every padded row is written."""
    from moebench.impls.triton.align import align_to_blocks

    generator = torch.Generator().manual_seed(len(rows_E))
    D, F, E = 264, 384, len(rows_E)
    ids_T1 = _ids_for_rows(rows_E).cuda()
    x_TD = torch.randn(ids_T1.shape[0], D, generator=generator).to("cuda", dtype)
    w_E2FD = (torch.randn(E, 2 * F, D, generator=generator) / D**0.5).to("cuda", dtype)
    programs = tma.multiprocessors(x_TD.device)
    tall = align_to_blocks(ids_T1, E, 128)
    want_PF = torch.full((tall.max_rows, F), float("nan"), device="cuda", dtype=dtype)
    shipped = next(c for c in gluon_gate_up.candidates(128, D, F, 2) if c["BLOCK_N"] == 128)
    gluon_gate_up.launch_gate_up(x_TD, w_E2FD, want_PF, tall, 1, shipped, programs)
    short = align_to_blocks(ids_T1, E, 64)
    configs = gluon_gate_up_rows.candidates(D, F, 2)
    assert configs
    for config in configs:
        got_PF = torch.full((short.max_rows, F), float("nan"), device="cuda", dtype=dtype)
        gluon_gate_up_rows.launch_gate_up(x_TD, w_E2FD, got_PF, short, 1, config, programs)
        torch.cuda.synchronize()
        written = int(short.num_padded_1)
        assert not got_PF[:written].isnan().any(), config  # every padded row written
        got = got_PF[short.row_of_assign_A.long()]
        want = want_PF[tall.row_of_assign_A.long()]
        assert torch.equal(got, want), (config, (got.float() - want.float()).abs().max())
