"""The fused `triton` layer.

CPU, with TRITON_INTERPRET=1 (Triton's CPU interpreter, float16): the alignment kernels
and forward and gradients against `reference` (the tuner: test_triton_tuning.py; the
`cuda_graph` case field: test_cuda_graph_field.py). CUDA (skipped without a GPU or Triton):
forward and gradients against `reference` on odd shapes in bfloat16 and float16, the
decode path, and a graphed harness run read back from parquet.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from moebench import registry
from moebench.case import Case, LayerShape, Workload
from moebench.impls.reference import reference_output
from moebench.impls.triton import tuning
from moebench.measure.check import check_gradients
from moebench.measure.timing import TimingPlan
from moebench.suite import parse_suite
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs
from tests.conftest import KERNEL_DEVICE, needs_kernels

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA device and triton"
)


# ---------------------------------------------------------------------- CPU: alignment


@needs_kernels
@pytest.mark.parametrize(
    ("tokens", "num_experts", "top_k", "block_m"),
    # up to 64 assignments (and 256 experts): one program (decode); up to 1024: one
    # program in steps; more: three kernels
    [
        (37, 6, 2, 16),
        (1, 8, 8, 16),
        (5, 64, 3, 16),
        (8, 256, 8, 16),
        (9, 128, 8, 16),
        (700, 3, 1, 64),
        (300, 256, 8, 32),
        (64, 128, 8, 16),
        (128, 64, 8, 16),
        (129, 64, 8, 16),
        (40, 300, 8, 16),
    ],
)
def test_alignment_pads_each_expert_to_whole_blocks(tokens, num_experts, top_k, block_m):
    from moebench.impls.triton import align
    from moebench.impls.triton.align import align_to_blocks, max_padded_rows

    generator = torch.Generator().manual_seed(tokens)
    scores_TE = torch.rand(tokens, num_experts, generator=generator)
    expert_ids_TK = scores_TE.topk(top_k, dim=1).indices.to(KERNEL_DEVICE)
    a = align_to_blocks(expert_ids_TK, num_experts, block_m)
    rows_E = None if a.rows_E is None else a.rows_E.cpu()
    a, expert_ids_TK = (
        type(a)(*(t.cpu() for t in (a.sorted_ids_P, a.block_expert_B, a.num_padded_1,
                                     a.padded_ends_E, a.row_of_assign_A)),
                a.num_assign, a.block_m),
        expert_ids_TK.cpu(),
    )  # fmt: skip
    num_assign = tokens * top_k
    assert a.max_rows == max_padded_rows(num_assign, num_experts, block_m)
    padded = int(a.num_padded_1)
    assert padded % block_m == 0 and padded <= a.max_rows
    ids = a.sorted_ids_P.long()
    real = ids[ids < num_assign]
    # Every assignment exactly once, nothing past the padded length.
    assert sorted(real.tolist()) == list(range(num_assign))
    # row_of_assign_A is the inverse: assignment a sits in row row_of_assign_A[a].
    assert (ids[a.row_of_assign_A.long()] == torch.arange(num_assign)).all()
    assert (ids[padded:] == num_assign).all()
    flat_experts = expert_ids_TK.flatten()
    for block in range(a.max_blocks):
        rows = ids[block * block_m : (block + 1) * block_m]
        expert = int(a.block_expert_B[block])
        if block * block_m >= padded:
            assert (rows == num_assign).all()
            continue
        valid = rows[rows < num_assign]
        assert valid.numel() > 0, "a block inside the padded length holds only padding"
        assert (flat_experts[valid] == expert).all()
    # Each expert's run: its real rows first, then padding up to whole blocks.
    counts_E = torch.bincount(flat_experts, minlength=num_experts).tolist()
    # the real rows of each expert, where the alignment keeps them (all but decode's)
    assert rows_E is None or rows_E.tolist() == counts_E
    assert rows_E is not None or tokens * top_k <= align.SMALL_ASSIGNMENTS
    start = 0
    for expert, count in enumerate(counts_E):
        run = ids[start : start + count]
        assert (run < num_assign).all() and (flat_experts[run] == expert).all()
        start += -(-count // block_m) * block_m
        assert (ids[start - (-count % block_m) : start] == num_assign).all()
        assert int(a.padded_ends_E[expert]) == start
    assert padded == start


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_few_rows_weight_grad_matches_a_per_expert_loop(dtype):
    """Experts with no rows (zeros, written), runs not a multiple of BLOCK_R, widths not
    a multiple of any tile, against a float32 loop, for every candidate tile shape."""
    from moebench.impls.triton import weight_grad

    if KERNEL_DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes in numpy, which has no bfloat16")
    gen = torch.Generator().manual_seed(0)
    counts = [0, 5, 0, 17, 1, 40, 0]  # expert 0 and the last have none
    ends_E = torch.tensor(counts).cumsum(0).to(torch.int32)
    M, N, P = 72, 136, int(ends_E[-1]) + 9  # rows past the last end are never read
    a_PM = torch.randn(P, M, generator=gen).to(dtype)
    b_PN = torch.randn(P, N, generator=gen).to(dtype)
    a_PM[int(ends_E[-1]) :] = float("nan")
    expected = torch.zeros(len(counts), M, N)
    for expert, end in enumerate(ends_E.tolist()):
        start = end - counts[expert]
        expected[expert] = a_PM[start:end].float().t() @ b_PN[start:end].float()
    device = KERNEL_DEVICE
    for config in weight_grad.candidates(16, False) + weight_grad.candidates(64, False):
        out_EMN = torch.full((len(counts), M, N), float("nan"), dtype=dtype, device=device)
        args = (a_PM.to(device), b_PN.to(device), ends_E.to(device), out_EMN)
        weight_grad.launch(*args, config)
        torch.testing.assert_close(out_EMN.float().cpu(), expected, rtol=2e-2, atol=2e-2)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_grad_reads_each_experts_real_rows_alone(dtype):
    """Given each expert's real rows (`rows_E`), every tile (one a program and, where TMA
    stores run, persistent) sums those alone: the padding rows after them hold NaN here,
    which any tile reading them would carry into its expert's gradient; and the sums are
    the bits of the same tiles over zero padding rows without `rows_E`."""
    from moebench.impls.triton import tma, weight_grad

    if KERNEL_DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes in numpy, which has no bfloat16")
    device = torch.device(KERNEL_DEVICE)
    gen = torch.Generator().manual_seed(2)
    rows_E = torch.tensor([0, 5, 0, 17, 1, 40, 64, 0], dtype=torch.int32)
    padded_E = (rows_E + 63) // 64 * 64  # runs padded to 64-row blocks, as the forward's
    ends_E = padded_E.cumsum(0).to(torch.int32)
    M, N, P = 128, 256, int(ends_E[-1])
    a_PM = torch.randn(P, M, generator=gen).to(dtype)
    b_PN = torch.randn(P, N, generator=gen).to(dtype)
    padding_P = torch.ones(P, dtype=torch.bool)
    for end, padded, rows in zip(ends_E.tolist(), padded_E.tolist(), rows_E.tolist()):
        padding_P[end - padded : end - padded + rows] = False
    zero_padded_PM = a_PM.masked_fill(padding_P[:, None], 0.0).to(device)
    a_PM = a_PM.masked_fill(padding_P[:, None], float("nan")).to(device)
    b_PN, ends_E, rows_E = b_PN.to(device), ends_E.to(device), rows_E.to(device)
    configs = weight_grad.candidates(64, False, M, N, store_tma=tma.available(device))
    for config in configs:
        outs = []
        for a, rows in ((a_PM, rows_E), (zero_padded_PM, None)):
            out_EMN = torch.full((len(padded_E), M, N), float("nan"), dtype=dtype, device=device)
            weight_grad.launch(a, b_PN, ends_E, out_EMN, config, rows)
            outs.append(out_EMN)
        assert torch.equal(outs[0], outs[1]), config
        start = int(ends_E[4])  # expert 5's 40 real rows
        expected = a_PM[start : start + 40].float().t() @ b_PN[start : start + 40].float()
        torch.testing.assert_close(outs[0][5].float(), expected, rtol=2e-2, atol=2e-2)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_persistent_weight_grad_tiles_store_the_same_bits_by_tma(dtype):
    """The persistent TMA-store tiles (a Hopper card's or the interpreter's candidates at
    widths they divide): each program walks several tiles (the interpreter launches 3,
    the card 2 a multiprocessor for 7 experts' 8-32 tiles), experts with no rows get
    zeros, and every tile has the bits of the same tile stored one a program."""
    from moebench.impls.triton import tma, weight_grad

    if KERNEL_DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes in numpy, which has no bfloat16")
    device = torch.device(KERNEL_DEVICE)
    if not tma.available(device):
        pytest.skip("TMA stores need a Hopper card (or Triton's interpreter)")
    gen = torch.Generator().manual_seed(1)
    counts = [0, 5, 0, 17, 1, 40, 0]
    ends_E = torch.tensor(counts).cumsum(0).to(torch.int32).to(device)
    M, N, P = 128, 256, sum(counts) + 9
    a_PM = torch.randn(P, M, generator=gen).to(dtype).to(device)
    b_PN = torch.randn(P, N, generator=gen).to(dtype).to(device)
    a_PM[sum(counts) :] = float("nan")  # rows past the last end are never read
    persistent = [
        config
        for block_m in (16, 64)
        for config in weight_grad.candidates(block_m, False, M, N, store_tma=True)
        if config.get("PROGRAMS_PER_SM")
    ]
    assert len(persistent) == 5
    for config in persistent:
        plain = {key: value for key, value in config.items() if key != "PROGRAMS_PER_SM"}
        outs = []
        for launched in (config, plain):
            out_EMN = torch.full((len(counts), M, N), float("nan"), dtype=dtype, device=device)
            weight_grad.launch(a_PM, b_PN, ends_E, out_EMN, launched)
            outs.append(out_EMN)
        assert torch.equal(outs[0], outs[1]), config
        assert (outs[0][0] == 0).all() and (outs[0][-1] == 0).all()
        expected = a_PM[5:22].float().t() @ b_PN[5:22].float()  # expert 3's 17 rows
        torch.testing.assert_close(outs[0][3].float(), expected, rtol=2e-2, atol=2e-2)


@needs_kernels
def test_persistent_weight_grad_tiles_refuse_widths_they_do_not_divide():
    """A persistent config is raced only where its tiles divide the gradient; launched on
    one they do not, it names itself and the widths instead of storing past a box."""
    from moebench.impls.triton import weight_grad

    assert not [
        config
        for config in weight_grad.candidates(64, False, 72, 136, store_tma=True)
        if config.get("PROGRAMS_PER_SM")
    ]
    assert not [c for c in weight_grad.candidates(64, False) if c.get("PROGRAMS_PER_SM")]
    config = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_R": 16, "num_warps": 4, "PROGRAMS_PER_SM": 2}
    ends_E = torch.tensor([4, 8], dtype=torch.int32, device=KERNEL_DEVICE)
    a_PM = torch.zeros(8, 72, dtype=torch.float16, device=KERNEL_DEVICE)
    b_PN = torch.zeros(8, 136, dtype=torch.float16, device=KERNEL_DEVICE)
    out_EMN = torch.empty(2, 72, 136, dtype=torch.float16, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="72 x 136"):
        weight_grad.launch(a_PM, b_PN, ends_E, out_EMN, config)


@needs_kernels
def test_expert_weight_grad_takes_the_grouped_gemm_above_few_rows(tmp_path, monkeypatch):
    """Above FEW_ROWS_BLOCK_M rows per block the grouped GEMM is used untimed; without one
    (a dtype or width it cannot take) the Triton kernel stands in at any block size."""
    from moebench.impls.triton import weight_grad

    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    ends_E = torch.tensor([16, 16, 48], dtype=torch.int32, device=KERNEL_DEVICE)
    a_PM = torch.randn(48, 24, device=KERNEL_DEVICE).half()
    b_PN = torch.randn(48, 40, device=KERNEL_DEVICE).half()
    calls = []

    def grouped(*args):
        calls.append(args)
        return "grouped"

    block_m = 2 * weight_grad.FEW_ROWS_BLOCK_M
    got = weight_grad.expert_weight_grad(a_PM, b_PN, ends_E, block_m, "k", grouped)
    assert got == "grouped" and len(calls) == 1
    out_EMN = weight_grad.expert_weight_grad(a_PM, b_PN, ends_E, block_m, "k", None)
    assert out_EMN.shape == (3, 24, 40) and (out_EMN[1] == 0).all()
    expected = a_PM[16:].float().t() @ b_PN[16:].float()
    torch.testing.assert_close(out_EMN[2].float(), expected, rtol=2e-2, atol=2e-2)

    # Few rows, and the tuner's cached choice is the grouped GEMM: no kernel launched.
    cache_file = tuning._device_file(torch.device(KERNEL_DEVICE))
    code = (weight_grad.weight_grad_kernel,)
    tma_ok = weight_grad.tma_stores(a_PM.device, 40 * a_PM.element_size())
    configs = weight_grad.candidates(16, True, 24, 40, tma_ok)
    fingerprint = tuning.code_fingerprint(code, configs, tuning.timing_way(graphed=False))
    cache_file.write_text(json.dumps({f"few {fingerprint}": weight_grad.GROUPED_GEMM}))
    tuning.TUNER._loaded.pop(cache_file, None)
    monkeypatch.setattr(weight_grad, "launch", lambda *args: pytest.fail("launched"))
    assert weight_grad.expert_weight_grad(a_PM, b_PN, ends_E, 16, "few", grouped) == "grouped"


def float32_problem(tokens: int, D: int, F: int, E: int, K: int) -> tuple:
    """Float16 x, gate|up and down weights, routing (expert E - 1 gets no token) and
    routing weights, and float32 expectations per assignment: the gate|up products (A x
    2F), h (SwiGLU) and the weighted down product."""
    dtype = torch.float16
    gen = torch.Generator().manual_seed(tokens)
    x_TD = torch.randn(tokens, D, generator=gen).to(dtype)
    w_gate_up_E2FD = (torch.randn(E, 2 * F, D, generator=gen) / 8).to(dtype)
    w_down_EFD = (torch.randn(E, F, D, generator=gen) / 8).to(dtype)
    ids_TK = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(tokens)])
    gate_A = torch.rand(tokens * K, generator=gen).to(dtype)
    experts_A = ids_TK.reshape(-1).tolist()
    pre_A2F = torch.stack(
        [w_gate_up_E2FD[e].float() @ x_TD[a // K].float() for a, e in enumerate(experts_A)]
    )
    h_AF = torch.nn.functional.silu(pre_A2F[:, :F]) * pre_A2F[:, F:]
    out_AD = torch.stack(
        [gate_A[a].float() * (h_AF[a] @ w_down_EFD[e].float()) for a, e in enumerate(experts_A)]
    )
    return x_TD, w_gate_up_E2FD, w_down_EFD, ids_TK, gate_A, pre_A2F, h_AF, out_AD


@needs_kernels
@pytest.mark.parametrize(("tokens", "block_m"), [(1, 16), (13, 16), (70, 64), (300, 128)])
def test_every_forward_candidate_matches_a_float32_loop(tokens, block_m):
    """Each tile the tuner may pick for gate_up and down (D and F not a multiple of any
    tile, an expert with no tokens), against float32 per-row products; one token also
    through the per-assignment layout. 128-row blocks: CUDA only."""
    from moebench.impls.triton import kernels
    from moebench.impls.triton.align import align_to_blocks, per_assignment_blocks

    if KERNEL_DEVICE == "cpu" and block_m > 64:
        pytest.skip("large blocks: CUDA only")
    dev, dtype = KERNEL_DEVICE, torch.float16
    D, F, E, K = 72, 40, 5, 2
    x_TD, w_gate_up_E2FD, w_down_EFD, ids_TK, gate_A, _, h_AF, out_AD = float32_problem(
        tokens, D, F, E, K
    )
    w_gate_up_E2FD, w_down_EFD = w_gate_up_E2FD.to(dev), w_down_EFD.to(dev)
    w_gate_EDF = w_gate_up_E2FD[:, :F].transpose(1, 2)
    w_up_EDF = w_gate_up_E2FD[:, F:].transpose(1, 2)
    ids_TK = ids_TK.to(torch.int32).to(dev)
    layouts = [align_to_blocks(ids_TK, E, block_m)]
    if tokens == 1:
        layouts.append(per_assignment_blocks(ids_TK, block_m))
    for alignment in layouts:
        rows = alignment.max_rows
        row_ids = (
            torch.arange(rows, device=dev) // block_m
            if alignment.per_assignment
            else alignment.sorted_ids_P.long()
        )
        if alignment.per_assignment:  # row block a: assignment a in its first row
            row_ids = torch.where(
                torch.arange(rows, device=dev) % block_m == 0, row_ids, tokens * K
            )
        real = (row_ids < tokens * K).cpu()
        for config in tuning.candidates("gate_up", block_m):
            h_PF = torch.full((rows, F), float("nan"), device=dev, dtype=dtype)
            kernels.launch_gate_up(x_TD.to(dev), w_gate_EDF, w_up_EDF, h_PF, alignment, K, config)
            got = h_PF.float().cpu()[real]
            torch.testing.assert_close(
                got, h_AF[row_ids.cpu()[real]], rtol=2e-2, atol=2e-2, msg=str(config)
            )
        h_PF = torch.zeros(rows, F)
        h_PF[real] = h_AF[row_ids.cpu()[real]]
        h_PF = h_PF.to(dtype).to(dev)
        for config in tuning.candidates("down", block_m):
            got_AD = torch.full((tokens * K, D), float("nan"), device=dev, dtype=dtype)
            kernels.launch_down(h_PF, w_down_EFD, gate_A.to(dev), got_AD, alignment, config)
            torch.testing.assert_close(
                got_AD.float().cpu(), out_AD, rtol=2e-2, atol=2e-2, msg=str(config)
            )
        if not alignment.per_assignment:
            _check_rows_times_weights(alignment, [w_down_EFD.transpose(1, 2), w_gate_up_E2FD])


def _check_rows_times_weights(alignment, weights_EKN: list[torch.Tensor]) -> None:
    """The down kernel without its scatter (the backward's dh and dx), every candidate,
    for weights in either orientation: each real padded row times its block's expert's
    weights, in place; padding rows too, except the halves of padding a HALF_TAIL config
    skips."""
    from moebench.impls.triton import kernels

    num_padded = int(alignment.num_padded_1)
    expert_P = alignment.block_expert_B.repeat_interleave(alignment.block_m)[:num_padded].cpu()
    real = (alignment.sorted_ids_P[:num_padded] < alignment.num_assign).cpu()
    if alignment.block_m >= 64:  # an expert's last block whose second half is padding
        halves = real.view(-1, alignment.block_m // 2).any(1).view(-1, 2)
        assert (halves[:, 0] & ~halves[:, 1]).any(), "no block takes the HALF_TAIL path"
        assert halves[:, 1].any(), "no block has real rows in its second half"
    gen = torch.Generator().manual_seed(1)
    for w_EKN in weights_EKN:
        _, K, N = w_EKN.shape
        a_PK = torch.randn(alignment.max_rows, K, generator=gen).half()
        expected = torch.stack(
            [a_PK[row].float() @ w_EKN[e].float().cpu() for row, e in enumerate(expert_P.tolist())]
        )
        for config in tuning.candidates("down", alignment.block_m):
            out_PN = torch.full((alignment.max_rows, N), float("nan"), device=w_EKN.device).half()
            kernels.launch_rows(a_PK.to(w_EKN.device), w_EKN, out_PN, alignment, config)
            got = out_PN[:num_padded].float().cpu()
            rows = real if config.get("HALF_TAIL") else slice(None)
            torch.testing.assert_close(
                got[rows], expected[rows], rtol=2e-2, atol=2e-2, msg=str(config)
            )


@needs_kernels
def test_backward_rows_gemm_takes_the_tuners_choice(tmp_path, monkeypatch):
    """dh and dx (`rows_times_weights`): a cached choice of the grouped GEMM launches no
    kernel; where the grouped GEMM cannot run, the Triton kernel computes the rows."""
    from moebench.impls.triton import backward, kernels
    from moebench.impls.triton.align import align_to_blocks
    from moebench.impls.triton.weight_grad import GROUPED_GEMM

    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    ids_TK = torch.tensor([[0, 2], [2, 0], [2, 1]], dtype=torch.int32, device=KERNEL_DEVICE)
    alignment = align_to_blocks(ids_TK, 4, 16)
    a_PK = torch.randn(alignment.max_rows, 24, device=KERNEL_DEVICE).half()
    w_EKN = torch.randn(4, 24, 40, device=KERNEL_DEVICE).half()

    monkeypatch.setattr(backward, "_grouped_ok", lambda *tensors: False)
    out_PN = backward.rows_times_weights(a_PK, w_EKN, alignment, "rows alone")
    for row, expert in enumerate(alignment.block_expert_B.repeat_interleave(16).tolist()):
        if row < int(alignment.num_padded_1):
            expected = a_PK[row].float() @ w_EKN[expert].float()
            torch.testing.assert_close(out_PN[row].float(), expected, rtol=2e-2, atol=2e-2)

    configs = [*tuning.candidates("down", 16), GROUPED_GEMM]
    fingerprint = tuning.code_fingerprint(
        (kernels.down_kernel,), configs, tuning.timing_way(graphed=False)
    )
    cache_file = tuning._device_file(torch.device(KERNEL_DEVICE))
    cache_file.write_text(json.dumps({f"rows {fingerprint}": GROUPED_GEMM}))
    tuning.TUNER._loaded.pop(cache_file, None)
    monkeypatch.setattr(backward, "_grouped_ok", lambda *tensors: True)
    monkeypatch.setattr(backward, "GROUPED_MM", lambda *args, **kwargs: "grouped")
    monkeypatch.setattr(kernels, "launch_rows", lambda *args: pytest.fail("launched"))
    assert backward.rows_times_weights(a_PK, w_EKN, alignment, "rows") == "grouped"


def test_triton_is_registered_exact_and_cuda_only():
    info = registry.get("triton")
    assert info.exact and info.devices == ("cuda",) and info.family == "triton"


# ---------------------------------------------------------------------- CUDA


ODD_SHAPES = [
    # hidden, ffn, experts, top_k, tokens: hidden/ffn not multiples of any block
    (200, 136, 6, 2, 37),
    # many experts, few tokens: most experts get none
    (128, 96, 16, 1, 3),
    # top_k = num_experts: every token through every expert
    (96, 64, 4, 4, 19),
    # one token (the decode path: a row block per assignment, no alignment)
    (256, 512, 8, 2, 1),
    (200, 136, 6, 3, 1),
    # 1024 rows per expert: BLOCK_M = 128, Hopper's wgmma path (CUDA only: slow in the
    # interpreter)
    (512, 256, 4, 2, 2048),
]


def _gpu_case(
    shape: tuple, dtype: str, mode: str = "forward", device: str | None = "cuda", **kw
) -> Case:
    hidden, ffn, experts, top_k, tokens = shape
    return Case(
        LayerShape(hidden, ffn, experts, top_k),
        Workload(tokens, 1, mode),
        "triton",
        device=device or "cuda",
        dtype=dtype,
        **kw,
    )


# the relative error a layer's output and gradients may have against `reference`
TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3}


def built_layer(case: Case) -> tuple:
    """(weights, the `triton` layer built on them, the case's first input)."""
    weights = make_weights(case)
    return weights, registry.get("triton").build(weights, case), make_inputs(case, 1)[0]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm() / b64.norm())


@needs_kernels
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_forward_and_gradients_match_reference(shape, dtype):
    if KERNEL_DEVICE == "cpu" and dtype == "bfloat16":
        pytest.skip("Triton's interpreter computes in numpy, which has no bfloat16")
    if KERNEL_DEVICE == "cpu" and shape[-1] > 1000:
        pytest.skip("large blocks: CUDA only")
    case = _gpu_case(shape, dtype, mode="train", device=KERNEL_DEVICE)
    weights, layer, x_TD = built_layer(case)
    tolerance = TOLERANCE[dtype]
    with torch.no_grad():
        y_TD = layer(x_TD)
    assert torch.isfinite(y_TD).all()
    assert _relative(y_TD, reference_output(weights, x_TD)) <= tolerance

    # Gradients against the float32 reference, as the harness checks every training case
    # (seeded output gradients): float16 against float16 autograd would measure the
    # reference's rounding too, which a one-token router gradient (a difference of the
    # two slots' dw) amplifies past the tolerance for some draws.
    for seed in range(3):
        result = check_gradients(layer, [weights], x_TD, dtype, seed)
        assert set(result.errors) == {
            "input",
            "w_router_DE",
            "w_gate_EDF",
            "w_up_EDF",
            "w_down_EFD",
        }
        if case.shape.top_k == 1:  # a renormalised single gate weight is 1: its gradient is 0
            del result.errors["w_router_DE"]
        worst = max(result.errors.values())
        assert worst <= tolerance, (seed, result.errors)


def _fused_experts_args(case: Case) -> tuple:
    """(weights, x_TD, the arguments of `fused_experts` after the layer's router)."""
    weights, layer, x_TD = built_layer(case)
    with torch.no_grad():
        gate_TK, ids_TK, _ = layer.router(x_TD)
    return weights, x_TD, (x_TD, gate_TK, ids_TK, layer.w_gate_up_E2FD, layer.w_down_EFD)


@needs_cuda
def test_training_forward_keeps_what_inference_computes():
    """At BLOCK_M = 128 (wgmma): the forward that keeps activations for the backward gives
    the inference forward's output, and pre-activations whose SwiGLU is h."""
    from moebench.impls.triton.layer import fused_experts

    _, _, args = _fused_experts_args(_gpu_case((512, 256, 4, 2, 2048), "bfloat16"))
    with torch.no_grad():
        y_TD, _ = fused_experts(*args)
        y_kept_TD, saved = fused_experts(*args, keep_for_backward=True)
    assert saved.alignment.block_m == 128
    torch.testing.assert_close(y_kept_TD, y_TD, rtol=0, atol=0)
    real = saved.alignment.sorted_ids_P < saved.alignment.num_assign  # HALF_TAIL skips padding
    gate_pre, up_pre = saved.gate_pre_PF[real].float(), saved.up_pre_PF[real].float()
    swiglu = torch.nn.functional.silu(gate_pre) * up_pre
    torch.testing.assert_close(saved.h_PF[real].float(), swiglu, rtol=2e-2, atol=1e-2)


@needs_cuda
def test_forward_races_the_row_block_size(tmp_path, monkeypatch):
    """64 rows per expert: the forward times itself at 64- and 128-row blocks (each with
    its own tuned tiles), each as a CUDA graph (un-graphed, the host's launches decide),
    and keeps the faster; both give the same output."""
    from moebench.impls.triton import layer
    from moebench.impls.triton.layer import fused_experts

    captured = []

    def graphed_step(step, rotations, device, impl):
        captured.append(step)
        return layer_graphed_step(step, rotations, device, impl)

    layer_graphed_step = layer.graphed_step
    monkeypatch.setattr(layer, "graphed_step", graphed_step)
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path / "tune"))
    monkeypatch.setenv("MOEBENCH_TRITON_TUNE_LOG", str(tmp_path / "log.jsonl"))
    monkeypatch.setattr(tuning, "TUNER", tuning.Tuner())
    case = _gpu_case((200, 384, 8, 2, 250), "bfloat16")  # bucket 256: 64 rows per expert
    weights, x_TD, args = _fused_experts_args(case)
    with torch.no_grad():
        y_TD, _ = fused_experts(*args)
        by_block = {m: fused_experts(*args, block_m=m)[0] for m in (64, 128)}
    for y_block_TD in by_block.values():
        torch.testing.assert_close(y_block_TD, y_TD, rtol=2e-2, atol=2e-2)
    assert _relative(y_TD, reference_output(weights, x_TD)) <= 2e-2
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    (race,) = [line for line in lines if line["key"].startswith("block_m ")]
    assert [config["BLOCK_M"] for config, _ in race["trials"]] == [64, 128]
    assert all(isinstance(ms, float) for _, ms in race["trials"])
    assert len(captured) == 2, "each block size raced as a graph"
    # Each block size's kernels were tuned under their own keys.
    assert {line["key"].split(" ")[-2] for line in lines if line is not race} == {"M64", "M128"}


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 64])
def test_forward_runs_without_host_sync_and_under_a_graph(tokens):
    """One token (no alignment) and 64 (the one-program alignment)."""
    case = _gpu_case((256, 512, 8, 2, tokens), "bfloat16")
    _, layer, x_TD = built_layer(case)
    with torch.no_grad():
        expected = layer(x_TD)  # tunes (outside the capture) and warms up
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x_TD)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x_TD)
        out.fill_(float("nan"))
        graph.replay()
    torch.testing.assert_close(out, expected)


@needs_cuda
@pytest.mark.parametrize(
    "shape",
    [
        (256, 512, 8, 2, 1),  # the one-token chain: few-token logits, no alignment
        (256, 512, 8, 2, 2),  # the decode alignment (at most 64 assignments)
        (256, 512, 8, 2, 64),  # the one-program alignment
        (128, 256, 64, 32, 64),  # the three alignment kernels (2048 assignments)
    ],
)
def test_dependent_launch_keeps_every_bit(shape, launch_switch):
    """Launched with PDL (each kernel starting under its predecessor's tail), the layer
    gives the bits it gives launched plainly: forward, un-graphed and replayed from a
    CUDA graph, and a training step's input gradient (its weight gradients to rounding).
    A kernel that read its predecessor's
    output before `wait_for_predecessor` would read it half written."""
    from moebench import dependent_launch

    if not dependent_launch.enabled(torch.device("cuda")):
        pytest.skip("PDL needs compute capability 9.0 or later")
    assert dependent_launch.for_tokens(torch.device("cuda"), shape[-1])
    case = _gpu_case(shape, "bfloat16")
    weights = make_weights(case)
    x_TD = make_inputs(case, 1)[0]
    grad_y_TD = torch.randn_like(x_TD)

    def run(pdl: str) -> list[torch.Tensor]:
        launch_switch(dependent_launch, pdl)
        layer = registry.get("triton").build(weights, case)
        with torch.no_grad():
            eager = layer(x_TD)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graphed = layer(x_TD)
            graphed.fill_(float("nan"))
            graph.replay()
        x = x_TD.detach().clone().requires_grad_(True)
        layer(x).backward(grad_y_TD)
        weight_grads = [p.grad for p in layer.parameters() if p.grad is not None]
        return [eager, graphed.clone(), x.grad], weight_grads

    (plain, plain_weight_grads), (dependent, weight_grads) = run("0"), run("1")
    for a, b in zip(plain, dependent, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # A weight gradient sums over an expert's rows, whose order the alignment's atomics
    # choose anew on every call, PDL or not: the same up to the rounding of that order.
    assert len(weight_grads) == len(plain_weight_grads) >= 3
    for a, b in zip(plain_weight_grads, weight_grads, strict=True):
        torch.testing.assert_close(b, a)


@needs_cuda
def test_graphed_harness_run_reads_back(tmp_path, monkeypatch):
    from moebench.runner import run_cases
    from moebench.store import read_run

    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path / "tune"))
    text = """
[suite]
name = "graphed"
device = "cuda"
budget_ms = 50
[grid]
impl = ["triton", "grouped"]
hidden = 256
ffn = 512
num_experts = 8
top_k = 2
batch = 4
seq_len = 1
dtype = "bfloat16"
cuda_graph = [false, true]
"""
    suite = parse_suite(text)
    outcome = run_cases(
        list(suite.cases),
        suite_name="graphed",
        plan=TimingPlan(budget_ms=50),
        timeout_s=120,
        out_root=tmp_path / "results",
        isolate=False,
    )
    table = read_run(outcome.results_path)
    by = {(r["impl"], r["cuda_graph"]): r for r in table.to_dict("records")}
    assert by[("triton", False)]["status"] == "ok"
    assert by[("triton", True)]["status"] == "ok"
    assert by[("triton", True)]["latency_ms"] > 0
    # grouped counts tokens per expert on the host: it cannot be captured, and says so
    assert by[("grouped", True)]["status"] == "error"
    assert "CUDA graph" in by[("grouped", True)]["error"]
    assert list((tmp_path / "tune").glob("*.json"))
