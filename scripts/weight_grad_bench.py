"""The fused layer's two expert weight gradients, torch's grouped GEMM against the
few-rows Triton kernel (`moebench/impls/triton/weight_grad.py`), on real shapes (CUDA).

    python scripts/weight_grad_bench.py [--preset deepseek-v3 ...] [--tokens 1 64 1024]

For each preset and token count: random top-k routing aligned as the training forward
aligns it, then the milliseconds (triton.testing.do_bench, median) of each way of
computing dW_gate_up (E x 2F x D) and dW_down (E x F x D): torch's grouped GEMM, the
Triton kernel alone (its best tile; the bandwidth of the bytes it writes), `zero_()` on
the same bytes (a write ceiling), and the path the backward takes (the tuner's choice of
the two up to `weight_grad.FEW_ROWS_BLOCK_M` rows per block, else the grouped GEMM). The
padding rows of `a` are zeros, as the backward's are; the kernel reads each expert's real
rows alone (`Alignment.rows_E`), and once more all of its padded run ("padded").
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch

from moebench.presets import PRESETS

if TYPE_CHECKING:  # (the module imports Triton, which main checks for first)
    from moebench.impls.triton.align import Alignment


def time_gradient(alignment: Alignment, width: int, D: int, key: str) -> str:
    """One E x width x D gradient from random rows (zeros at padding): the grouped GEMM,
    the Triton kernel alone (its best tile) over the real rows and over the padded runs,
    `zero_` on the same bytes, and the backward's own choice."""
    from triton.testing import do_bench

    from moebench.impls.triton.backward import weight_grad
    from moebench.impls.triton.weight_grad import (
        GROUPED_GEMM,
        expert_weight_grad,
        weight_grad_choice,
    )

    ends_E, block_m, rows_E = alignment.padded_ends_E, alignment.block_m, alignment.rows_E
    rows = alignment.max_rows
    a_PM = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    a_PM[alignment.sorted_ids_P >= alignment.num_assign] = 0
    b_PD = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16)
    terabytes = ends_E.numel() * width * D * 2 / 1e12

    def kernel_only(rows_E=rows_E, suffix: str = "") -> torch.Tensor:
        only = f"{key} kernel only{suffix}"
        return expert_weight_grad(a_PM, b_PD, ends_E, block_m, only, None, rows_E)

    # the best of the kernel's tiles (on a Hopper card the persistent TMA-store ones too)
    triton_ms = do_bench(kernel_only)
    padded_ms = do_bench(lambda: kernel_only(None, " padded"))
    grouped_ms = do_bench(lambda: weight_grad(a_PM, b_PD, ends_E))
    chosen_ms = do_bench(
        lambda: expert_weight_grad(a_PM, b_PD, ends_E, block_m, key, weight_grad, rows_E)
    )
    choice = weight_grad_choice(a_PM, b_PD, ends_E, block_m, key, weight_grad, rows_E)
    chosen = "grouped" if choice == GROUPED_GEMM else f"triton {choice}"
    # The first 16 experts' gradients in float32 (all of them would need 60 GB here).
    expected = weight_grad(a_PM, b_PD, ends_E)[:16].float()
    got = kernel_only()
    zero_ms = do_bench(got.zero_)
    got = kernel_only()[:16].float()
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    return (
        f"{grouped_ms:.3f}, {triton_ms:.3f} ({terabytes / triton_ms * 1e3:.2f})"
        f" padded {padded_ms:.3f},"
        f" {zero_ms:.3f} ({terabytes / zero_ms * 1e3:.2f}) err {error:.1e};"
        f" backward {chosen_ms:.3f} ({chosen})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["deepseek-v3", "qwen3-30b-a3b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 1024, 8192])
    args = parser.parse_args()
    unknown = [p for p in args.preset if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    if min(args.tokens) < 1:
        raise SystemExit(f"--tokens must be >= 1, got {args.tokens}")
    if not torch.cuda.is_available():
        raise SystemExit("weight_grad_bench.py needs a CUDA device")
    from moebench.impls.triton import tuning
    from moebench.impls.triton.align import align_to_blocks

    device, dtype = torch.device("cuda"), torch.bfloat16
    print(
        "preset tokens block_m | gradient: grouped_mm ms, triton ms (TB/s written) padded ms,"
        " zero_ ms (TB/s), relative error; backward ms (its path)"
    )
    for preset in args.preset:
        shape = PRESETS[preset]
        D, F, E, K = shape.hidden, shape.ffn, shape.num_experts, shape.top_k
        for tokens in args.tokens:
            gen = torch.Generator(device=device).manual_seed(tokens)
            scores_TE = torch.rand(tokens, E, device=device, generator=gen)
            expert_ids_TK = scores_TE.topk(K, dim=1).indices.to(torch.int32)
            block_m = tuning.block_m_for(tokens, K, E)
            alignment = align_to_blocks(expert_ids_TK, E, block_m)
            # the tuning keys read only shapes and the dtype: no memory behind them
            x_TD = torch.empty(tokens, D, device="meta", dtype=dtype)
            w_down_EFD = torch.empty(E, F, D, device="meta", dtype=dtype)
            line = [f"{preset} {tokens} {block_m}"]
            for name, width, layout in (("gate_up", 2 * F, "kmajor"), ("down", F, "nmajor")):
                key = tuning.key(f"weight_grad_{name}", x_TD, w_down_EFD, K, layout)
                line.append(f"{name}: " + time_gradient(alignment, width, D, key))
            print(" | ".join(line), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
