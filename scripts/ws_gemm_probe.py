"""Probe (not yet run on a GPU): the fused layer's two GEMMs with TMA tensor-descriptor
loads and Triton's warp specialisation, against the layer's own kernels.

    python scripts/ws_gemm_probe.py [--gemm down gate_up] [--preset mixtral-8x7b]
                                    [--tokens 8192] [--ws 0 1] [--tiny] [--compile-only]

Why (triton/NOTES.md, "What would close the gaps", large batches): Triton 3.6 runs its
Hopper warp-specialisation pass for capability 9.x on loops marked
`tl.range(..., warp_specialize=True)`, and that pass wants TMA loads. The down kernel's
A operand is h, already in padded sorted row order, so both of its operands can be
descriptors: h as a P x F matrix, W_down as an (E F) x D one (an expert's K range never
crosses into the next expert's rows when BLOCK_K divides F). Its epilogue keeps the
layer's routing weight and scatter to each row's assignment. gate_up's A is a gather of
x, which Hopper's TMA cannot do: here its rows are gathered first (torch indexing, timed
apart), then gate and up are two descriptor loads of the K-major E 2F x D weights.

Prints, per config, the median ms of each kernel replayed from a CUDA graph with L2
flushed (`tuning.graphed_ms`), and checks that the outputs agree. Under
TRITON_INTERPRET=1 on a CPU (tiny shapes, `--tiny`) it checks the values only.

`--compile-only`, on any host (no card, no interpreter): compiles every variant for
Hopper (sm_90) as the JIT would for these arguments, on meta tensors of the same shapes
and strides (`moebench.offline_compile`), and prints what each uses: shared memory,
warps, and the registers and stack per thread. Read that way on a CPU at Mixtral-8x7B's
8192 tokens (triton/NOTES.md), Triton 3.6's warp specialisation applied with num_warps=4
only (4 warps became 12 at 168 registers, no stack, 16-33 KB more shared memory) and
left num_warps=8 kernels exactly as they were; without it, the 4-warp tiles of 128 x 256
(down) and 128 x 128 (gate_up, two accumulators) spilled (255 registers, 512-656 bytes
of stack). So the probe races warp specialisation on 4-warp configs and keeps 8-warp
ones as the plain reference.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moebench.impls.triton import kernels, tuning
from moebench.impls.triton.align import Alignment, align_to_blocks, max_padded_rows
from moebench.impls.triton.kernels import _block_coords
from moebench.offline_compile import compile_record
from moebench.presets import PRESETS


@triton.jit
def _tiles(num_padded_ptr, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row blocks holding rows (the padded length, read on the device) and tiles."""
    num_blocks_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)
    return num_blocks_m, num_blocks_m * tl.cdiv(N, BLOCK_N)


@triton.jit
def _down_tile(
    h_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    D, F, num_assign, stride_out_a, pid_m, pid_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """out[a] <- gate[a] * h[row of a] @ W_down[expert of a] for one BLOCK_M x BLOCK_N
    tile; h and W through tensor descriptors, the K loop warp-specialised if WS."""
    expert = tl.load(block_expert_ptr + pid_m)
    first_w_row = expert * F
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, F, BLOCK_K, warp_specialize=WS):
        a = h_desc.load([pid_m * BLOCK_M, k])
        w = w_desc.load([first_w_row + k, pid_n * BLOCK_N])
        acc = tl.dot(a, w, acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(sorted_ids_ptr + offs_m)
    row_ok = ids < num_assign
    gate = tl.load(gate_weight_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * gate[:, None]
    out_ptrs = out_ptr + ids[:, None].to(tl.int64) * stride_out_a + offs_n[None, :]
    store_ok = row_ok[:, None] & (offs_n[None, :] < D)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def down_tma_kernel(
    h_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_padded_ptr, D, F, num_assign, stride_out_a,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """The down GEMM: a program per tile, or PERSISTENT programs walking the tiles (the
    tile loop warp-specialised if WS, as Triton wants it in a persistent kernel)."""
    num_blocks_m, num_tiles = _tiles(num_padded_ptr, D, BLOCK_M, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), warp_specialize=WS):
            pid_m, pid_n = _block_coords(tile, num_blocks_m, tl.cdiv(D, BLOCK_N), GROUP_M)
            _down_tile(
                h_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
                D, F, num_assign, stride_out_a, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, False,
            )  # fmt: skip
    elif tl.program_id(0) < num_tiles:
        pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, tl.cdiv(D, BLOCK_N), GROUP_M)
        _down_tile(
            h_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
            D, F, num_assign, stride_out_a, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, WS,
        )  # fmt: skip


def _grid(config: dict, max_tiles: int, device: torch.device) -> tuple[int]:
    """A program per tile the layout can hold, or one per SM when persistent."""
    if not config["PERSISTENT"]:
        return (max_tiles,)
    sms = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 4
    )
    return (min(sms, max_tiles),)


def launch_down_tma(
    h_PF, w_down_EFD, gate_weight_A, out_AD, alignment, config: dict, kernel=down_tma_kernel
) -> None:
    """`kernels.launch_down`'s result through `down_tma_kernel` (`kernel`: a stand-in
    for it, `_CompileOnly`)."""
    E, F, D = w_down_EFD.shape
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    assert F % block_k == 0, "a K tile must not cross into the next expert's rows"
    h_desc = TensorDescriptor.from_tensor(h_PF, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(w_down_EFD.view(E * F, D), [block_k, block_n])
    grid = _grid(config, alignment.max_blocks * triton.cdiv(D, block_n), h_PF.device)
    kernel[grid](
        h_desc, w_desc, gate_weight_A, out_AD,
        alignment.sorted_ids_P, alignment.block_expert_B, alignment.num_padded_1,
        D, F, alignment.num_assign, out_AD.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        PERSISTENT=config["PERSISTENT"], WS=config["WS"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip


@triton.jit
def _gate_up_tile(
    a_desc, w_desc, h_ptr, block_expert_ptr, D, F, stride_h_p, pid_m, pid_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """h[row] <- SwiGLU of the row's gathered input through its expert's gate and up
    rows of the K-major E 2F x D weights (viewed as (E 2F) x D), one tile; the rows of
    A already gathered in padded sorted order."""
    expert = tl.load(block_expert_ptr + pid_m)
    gate_row = expert * 2 * F + pid_n * BLOCK_N
    up_row = gate_row + F
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, D, BLOCK_K, warp_specialize=WS):
        a = a_desc.load([pid_m * BLOCK_M, k])
        w_gate = w_desc.load([gate_row, k])
        w_up = w_desc.load([up_row, k])
        acc_gate = tl.dot(a, w_gate.T, acc_gate)
        acc_up = tl.dot(a, w_up.T, acc_up)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_h_p + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=offs_n[None, :] < F)


@triton.jit
def gate_up_tma_kernel(
    a_desc, w_desc, h_ptr, block_expert_ptr, num_padded_ptr, D, F, stride_h_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """The gate_up GEMM, a program per tile or PERSISTENT (as `down_tma_kernel`)."""
    num_blocks_m, num_tiles = _tiles(num_padded_ptr, F, BLOCK_M, BLOCK_N)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), warp_specialize=WS):
            pid_m, pid_n = _block_coords(tile, num_blocks_m, tl.cdiv(F, BLOCK_N), GROUP_M)
            _gate_up_tile(
                a_desc, w_desc, h_ptr, block_expert_ptr, D, F, stride_h_p, pid_m, pid_n,
                BLOCK_M, BLOCK_N, BLOCK_K, False,
            )  # fmt: skip
    elif tl.program_id(0) < num_tiles:
        pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, tl.cdiv(F, BLOCK_N), GROUP_M)
        _gate_up_tile(
            a_desc, w_desc, h_ptr, block_expert_ptr, D, F, stride_h_p, pid_m, pid_n,
            BLOCK_M, BLOCK_N, BLOCK_K, WS,
        )  # fmt: skip


def gather_rows(x_TD, alignment, top_k: int) -> torch.Tensor:
    """x's row of every padded sorted row (padding rows take token 0's: their h is never
    read for an assignment), P x D: what a gather pass before gate_up would write."""
    ids_P = alignment.sorted_ids_P.clamp(max=alignment.num_assign - 1)
    return x_TD[(ids_P // top_k).long()]


def launch_gate_up_tma(
    a_PD, w_gate_up_E2FD, h_PF, alignment, config: dict, kernel=gate_up_tma_kernel
) -> None:
    """`kernels.launch_gate_up`'s h through `gate_up_tma_kernel`, from gathered rows
    (`kernel` as in `launch_down_tma`)."""
    E, two_f, D = w_gate_up_E2FD.shape
    F = two_f // 2
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    assert F % block_n == 0 and D % block_k == 0, "a tile must not cross gate into up"
    a_desc = TensorDescriptor.from_tensor(a_PD, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(w_gate_up_E2FD.view(E * two_f, D), [block_n, block_k])
    grid = _grid(config, alignment.max_blocks * triton.cdiv(F, block_n), h_PF.device)
    kernel[grid](
        a_desc, w_desc, h_PF, alignment.block_expert_B, alignment.num_padded_1,
        D, F, h_PF.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        PERSISTENT=config["PERSISTENT"], WS=config["WS"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip


def problem(hidden: int, ffn: int, experts: int, top_k: int, tokens: int, device: str):
    """Random routing, the layer's alignment at 128-row blocks, and random inputs,
    weights (gate|up K-major, down N-major, as the layer keeps them) and routing
    weights, in bfloat16 on CUDA and float16 on a CPU (Triton's interpreter computes
    bfloat16 wrongly: both kernels gave ~4e21 where the values are ~0.03)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids_TK = torch.stack(
        [torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)]
    ).to(device)
    alignment = align_to_blocks(ids_TK, experts, 128)

    def normal(*shape, scale=0.02):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    return {
        "alignment": alignment,
        "x_TD": normal(tokens, hidden, scale=1.0),
        "w_gate_up_E2FD": normal(experts, 2 * ffn, hidden),
        "h_PF": normal(alignment.max_rows, ffn, scale=1.0),
        "w_down_EFD": normal(experts, ffn, hidden),
        "gate_weight_A": torch.rand(tokens * top_k, generator=generator).to(device, dtype),
    }


# (BLOCK_N, BLOCK_K, warps, stages): 8-warp tiles (warp specialisation leaves them as
# they are) and 4-warp ones, which it turns into a producer and consumers (docstring).
TILES = {
    "down": (
        *((128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3)),
        *((128, 64, 4, 4), (256, 64, 4, 3), (128, 128, 4, 3)),
    ),
    "gate_up": (
        *((64, 64, 8, 4), (128, 64, 8, 3), (64, 128, 8, 3)),
        *((64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3)),
    ),
}
CONFIGS = {
    gemm: [
        {"BLOCK_M": 128, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}
        for n, k, w, s in tiles
    ]
    for gemm, tiles in TILES.items()
}


def variants(gemm: str, ws: list[int], persistent: list[int], tiny: bool) -> list[dict]:
    """Each config of `gemm` with warp specialisation off and on (on: 4-warp configs
    only) and per tile or persistent; `tiny`: 64 x 64 tiles (the tiny shape's F and D)."""
    out = []
    for p in persistent:
        for w in ws:
            for config in CONFIGS[gemm]:
                if w and config["num_warps"] != 4:
                    continue
                config = {**config, "WS": bool(w), "PERSISTENT": bool(p)}
                out.append({**config, "BLOCK_N": 64, "BLOCK_K": 64} if tiny else config)
    return out


def layer_and_probe(gemm: str, data: dict, top_k: int):
    """(run the layer's kernel with a config, run the probe's kernel with a config, its
    output tensor, the rows to compare): for "down" every assignment's row of out, for
    "gate_up" the real rows of h."""
    alignment = data["alignment"]
    if gemm == "down":
        out_AD = torch.zeros(
            data["gate_weight_A"].numel(), data["w_down_EFD"].shape[2],
            device=data["h_PF"].device, dtype=data["h_PF"].dtype,
        )  # fmt: skip
        args = (data["h_PF"], data["w_down_EFD"], data["gate_weight_A"], out_AD, alignment)
        return (
            lambda config: kernels.launch_down(*args, config),
            lambda config: launch_down_tma(*args, config),
            out_AD,
            slice(None),
        )
    w_gate_up_E2FD = data["w_gate_up_E2FD"]
    F = w_gate_up_E2FD.shape[1] // 2
    w_gate_EDF = w_gate_up_E2FD[:, :F].transpose(1, 2)
    w_up_EDF = w_gate_up_E2FD[:, F:].transpose(1, 2)
    h_PF = torch.zeros_like(data["h_PF"])
    a_PD = gather_rows(data["x_TD"], alignment, top_k)
    real_rows = alignment.sorted_ids_P < alignment.num_assign
    return (
        lambda config: kernels.launch_gate_up(
            data["x_TD"], w_gate_EDF, w_up_EDF, h_PF, alignment, top_k, config
        ),
        lambda config: launch_gate_up_tma(a_PD, w_gate_up_E2FD, h_PF, alignment, config),
        h_PF,
        real_rows,
    )


def layer_choice(gemm: str, data: dict, top_k: int, run_layer) -> dict:
    """The layer's own tuned config for this GEMM (from the tuning cache where it is
    there, as the forward looks it up), or on a CPU a plain one."""
    if data["x_TD"].device.type != "cuda":
        return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8,
                "num_warps": 4, "num_stages": 3}  # fmt: skip
    weights = data["w_down_EFD"]
    layout_of = weights if gemm == "down" else data["w_gate_up_E2FD"][:, :1].transpose(1, 2)
    kernel = kernels.down_kernel if gemm == "down" else kernels.gate_up_kernel
    return tuning.TUNER.choose(
        data["x_TD"].device,
        tuning.key(gemm, data["x_TD"], weights, top_k, tuning.weight_layout(layout_of), 128),
        lambda: tuning.candidates(gemm, 128),
        run_layer,
        code=(kernel,),
        graphed=True,
    )


class _CompileOnly:
    """Stands in for a probe kernel under --compile-only: `kernel[grid](*args, **kwargs)`
    compiles it for Hopper (`moebench.offline_compile`) and keeps the result; nothing
    runs. (The probe launches through `kernel[grid]`, not `fast_launch`, whose direct C
    launch is not written for tensor descriptors.)"""

    def __init__(self, kernel):
        self.kernel, self.compiled = kernel, None

    def __getitem__(self, grid):
        def compile_for_hopper(*args, **kwargs) -> None:
            self.compiled = compile_record(self.kernel, args, kwargs)

        return compile_for_hopper


def shapes_only(hidden: int, ffn: int, experts: int, top_k: int, tokens: int) -> dict:
    """`problem`'s tensors as meta tensors (shapes, strides, dtypes; no data) and an
    alignment of the layer's sizes at 128-row blocks: what compiling needs."""
    assign = tokens * top_k
    rows = max_padded_rows(assign, experts, 128)

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype)

    ids = (meta(n, dtype=torch.int32) for n in (rows, rows // 128, 1))
    return {
        "alignment": Alignment(*ids, None, None, assign, 128),
        "x_TD": meta(tokens, hidden),
        "w_gate_up_E2FD": meta(experts, 2 * ffn, hidden),
        "h_PF": meta(rows, ffn),
        "w_down_EFD": meta(experts, ffn, hidden),
        "gate_weight_A": meta(assign),
    }


def compile_report(gemm: str, data: dict, config: dict):
    """`gemm`'s probe kernel compiled for Hopper with `config`: what it uses, or why it
    did not compile (`offline_compile.Compiled`)."""
    alignment = data["alignment"]
    if gemm == "down":
        kernel = _CompileOnly(down_tma_kernel)
        out_AD = torch.empty(alignment.num_assign, data["w_down_EFD"].shape[2], device="meta")
        args = (data["h_PF"], data["w_down_EFD"], data["gate_weight_A"], out_AD.bfloat16())
        launch_down_tma(*args, alignment, config, kernel=kernel)
    else:
        kernel = _CompileOnly(gate_up_tma_kernel)
        a_PD = torch.empty(alignment.max_rows, data["x_TD"].shape[1], device="meta").bfloat16()
        args = (a_PD, data["w_gate_up_E2FD"], data["h_PF"])
        launch_gate_up_tma(*args, alignment, config, kernel=kernel)
    return kernel.compiled


def main() -> int:
    """Exit status: 0, or with --compile-only 1 where a variant did not compile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemm", choices=("down", "gate_up"), nargs="+", default=["down"])
    parser.add_argument("--preset", default="mixtral-8x7b")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ws", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--persistent", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tiny", action="store_true", help="E 4, F 128, D 128, 16 tokens")
    parser.add_argument(
        "--compile-only", action="store_true",
        help="compile each variant for Hopper on this host and say what it uses",
    )  # fmt: skip
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        shape = (128, 128, 4, 2, 16)
    else:
        s = PRESETS[args.preset]
        shape = (s.hidden, s.ffn, s.num_experts, s.top_k, args.tokens)
    top_k = shape[3]
    if args.compile_only:
        data = shapes_only(*shape)
        failed = 0
        for gemm in args.gemm:
            for config in variants(gemm, args.ws, args.persistent, args.tiny):
                compiled = compile_report(gemm, data, config)
                failed += compiled.error is not None
                print(compiled.describe(), flush=True)
        return 1 if failed else 0
    data = problem(*shape, device)
    timed = device == "cuda"
    for gemm in args.gemm:
        run_layer, run_probe, out, rows = layer_and_probe(gemm, data, top_k)
        layer_config = layer_choice(gemm, data, top_k, run_layer)
        run_layer(layer_config)
        expected = out[rows].clone()
        layer_ms = (
            tuning.graphed_ms(lambda r=run_layer, c=layer_config: r(c), out.device) if timed else 0
        )
        print(f"{gemm}: the layer's kernel {layer_config}: {layer_ms:.3f} ms")
        if gemm == "gate_up" and timed:
            gather_ms = tuning.graphed_ms(
                lambda: gather_rows(data["x_TD"], data["alignment"], top_k), out.device
            )
            print(f"gate_up: the gather by torch indexing: {gather_ms:.3f} ms")
        for config in variants(gemm, args.ws, args.persistent, args.tiny):
            out.zero_()
            try:
                run_probe(config)
            except Exception as error:  # a config that does not compile: say so, go on
                print(f"{gemm} {config}: {type(error).__name__}: {str(error)[:200]}")
                continue
            torch.testing.assert_close(out[rows], expected, rtol=2e-2, atol=2e-4)
            if not timed:
                print(f"{gemm} {config}: values agree")
                continue
            ms = tuning.graphed_ms(lambda r=run_probe, c=config: r(c), out.device)
            print(f"{gemm} {config}: {ms:.3f} ms ({layer_ms / ms:.2f}x the layer's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
