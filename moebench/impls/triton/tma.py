"""The fused layer's two GEMMs with TMA loads (Hopper's tensor-memory copy engine):
tuning candidates beside `kernels.py`'s, raced by the same tuner at 64- and 128-row
blocks, where the GEMMs are compute-bound.

Shape legend as in `kernels.py`: T tokens, D hidden, F expert width, E routed experts,
K top_k, A = T x K assignments, P padded sorted rows.

A TMA load copies a whole tile from a tensor descriptor (base, shape, strides, tile)
into shared memory, asynchronously, the out-of-range part filled with zeros; it cannot
gather rows. So:

- `gate_up`: the padded sorted rows of x are first copied into one P x D matrix
  (`gather_rows_kernel`; padding rows zero, as `kernels.gate_up_kernel` loads them), then
  A tiles come from it and the gate and up tiles from the K-major E 2F x D weights viewed
  as (E 2F) x D. SwiGLU and, in training, the pre-activations are the epilogue, as in
  `kernels.gate_up_kernel`.
- `down`: h (P x F) and the N-major E x F x D weights viewed as (E F) x D are both
  descriptors; the routing weight and the scatter to each row's assignment stay the
  epilogue.

A tile must not run from one expert's rows into the next (gate into up for gate_up):
`fits` says which configs a shape allows. Raced plain, with HALF_TAIL (an expert's last
block, second half padding, computes its first half through a half-height descriptor)
and PERSISTENT (a program an SM walking tiles), gate_up's also with ONE_DOT (gate and
up in one box, one dot twice as wide; with GATHER_A too, A's rows loaded by pointers
from x, so no gather pass runs). On an H200 TMA won 10 of 12 gate_up keys from 1024
tokens (not Qwen3-30B-A3B's or OLMoE-1B-7B's at 8192: pointer tiles 0.5-1% ahead) and 4
of 10 down keys (NOTES.md, versions 17-23). (Lines above the kernels move their cache
keys, and so the shipped tuning's fingerprints: keep their count.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moebench import fast_launch
from moebench.fast_launch import ceil_div, launch
from moebench.impls.triton.kernels import _block_coords, _second_half_is_padding

# (BLOCK_N, BLOCK_K, warps, stages) per GEMM from 64-row blocks: the fastest of version
# 17's probe (NOTES.md) and one deeper or narrower neighbour each.
TILES = {
    "gate_up": ((128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)),
    "down": ((256, 64, 8, 3), (128, 64, 8, 4)),
}
# The tiles' (row, column) strides and bases must be multiples of 16 bytes.
_ALIGN_BYTES = 16


@triton.jit
def gather_rows_kernel(
    x_ptr, a_ptr, sorted_ids_ptr, num_padded_ptr, D, num_assign, top_k, max_rows,
    stride_x_t, stride_a_p, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """a[row] <- x[token of row's assignment], zero for padding, for the real padded
    rows (blocks past the padded length, read on the device, exit at once)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.program_id(0) * BLOCK_R >= tl.load(num_padded_ptr):
        return
    row_ok = rows < max_rows
    ids = tl.load(sorted_ids_ptr + rows, mask=row_ok, other=num_assign)
    real = ids < num_assign
    token = (ids // top_k).to(tl.int64)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_ok = cols[None, :] < D
        x_ptrs = x_ptr + token[:, None] * stride_x_t + cols[None, :]
        values = tl.load(x_ptrs, mask=real[:, None] & col_ok, other=0.0)
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_a_p + cols[None, :]
        tl.store(a_ptrs, values, mask=row_ok[:, None] & col_ok)


@triton.jit
def gate_up_tma_kernel(
    a_desc, a_half_desc, w_desc, x_ptr, h_ptr, gate_pre_ptr, up_pre_ptr, sorted_ids_ptr,
    block_expert_ptr, num_padded_ptr, D, F, num_assign, top_k, num_blocks_m, stride_x_t,
    stride_h_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, STORE_PRE: tl.constexpr, HALF_TAIL: tl.constexpr,
    ONE_DOT: tl.constexpr, GATHER_A: tl.constexpr,
):  # fmt: skip
    """h[row] <- SwiGLU of the gathered row through its expert's gate and up rows, one
    BLOCK_M x BLOCK_N tile a program (with STORE_PRE the pre-activations too; with
    HALF_TAIL a block whose second half is padding alone computes its first half, its A
    tiles through a_half_desc; with ONE_DOT w_desc views the weights E x 2 x F x D and
    one box holds a tile's gate and up rows, multiplied in one dot; with GATHER_A, only
    with ONE_DOT, the A tiles are loaded from x's rows by pointers, as
    `kernels.gate_up_kernel` loads them, and the descriptors of A are not read)."""
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, tl.cdiv(F, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    if HALF_TAIL:  # noqa: SIM102 (an expert's last block, half of it padding: half the rows)
        if _second_half_is_padding(sorted_ids_ptr, pid_m, num_assign, BLOCK_M):
            _gate_up_tma_tile(
                a_half_desc, w_desc, x_ptr, sorted_ids_ptr, h_ptr, gate_pre_ptr, up_pre_ptr,
                block_expert_ptr, D, F, num_assign, top_k, stride_x_t, stride_h_p, pid_m,
                pid_n, BLOCK_M, BLOCK_M // 2, BLOCK_N, BLOCK_K, STORE_PRE, ONE_DOT, GATHER_A,
            )  # fmt: skip
            return
    _gate_up_tma_tile(
        a_desc, w_desc, x_ptr, sorted_ids_ptr, h_ptr, gate_pre_ptr, up_pre_ptr,
        block_expert_ptr, D, F, num_assign, top_k, stride_x_t, stride_h_p, pid_m, pid_n,
        BLOCK_M, BLOCK_M, BLOCK_N, BLOCK_K, STORE_PRE, ONE_DOT, GATHER_A,
    )  # fmt: skip


@triton.jit
def _gate_up_products(
    a_desc, w_desc, x_ptr, sorted_ids_ptr, block_expert_ptr, D, F, num_assign, top_k,
    stride_x_t, pid_m, pid_n, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_DOT: tl.constexpr,
    GATHER_A: tl.constexpr,
):  # fmt: skip
    """(gate, up) products, ROWS x BLOCK_N each in float32, of the first ROWS rows of
    row block pid_m and column block pid_n."""
    expert = tl.load(block_expert_ptr + pid_m)
    if ONE_DOT:  # a ROWS x 2 BLOCK_N product: wider wgmmas (a half tile's too)
        acc = tl.zeros((ROWS, 2 * BLOCK_N), dtype=tl.float32)
        if GATHER_A:  # A by pointers from x's rows (padding rows load zeros)
            ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, ROWS))
            row_ok = ids < num_assign
            offs_k = tl.arange(0, BLOCK_K)
            token = (ids // top_k).to(tl.int64)
            a_ptrs = x_ptr + token[:, None] * stride_x_t + offs_k[None, :]
            for k in range(0, tl.cdiv(D, BLOCK_K)):
                a_ok = row_ok[:, None] & (offs_k[None, :] < D - k * BLOCK_K)
                a = tl.load(a_ptrs, mask=a_ok, other=0.0)
                w = w_desc.load([expert, 0, pid_n * BLOCK_N, k * BLOCK_K])
                acc = tl.dot(a, w.reshape(2 * BLOCK_N, BLOCK_K).T, acc)
                a_ptrs += BLOCK_K
        else:
            for k in range(0, tl.cdiv(D, BLOCK_K)):
                a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
                w = w_desc.load([expert, 0, pid_n * BLOCK_N, k * BLOCK_K])
                acc = tl.dot(a, w.reshape(2 * BLOCK_N, BLOCK_K).T, acc)
        acc_gate, acc_up = tl.split(tl.permute(acc.reshape(ROWS, 2, BLOCK_N), (0, 2, 1)))
    else:
        gate_row = expert * 2 * F + pid_n * BLOCK_N
        up_row = gate_row + F
        acc_gate = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(D, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            acc_gate = tl.dot(a, w_desc.load([gate_row, k * BLOCK_K]).T, acc_gate)
            acc_up = tl.dot(a, w_desc.load([up_row, k * BLOCK_K]).T, acc_up)
    return acc_gate, acc_up


@triton.jit
def _swiglu_store(
    acc_gate, acc_up, h_ptr, gate_pre_ptr, up_pre_ptr, stride_h_p, pid_m, pid_n,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, STORE_PRE: tl.constexpr,
):  # fmt: skip
    """The TMA gate_up tiles' epilogue: SwiGLU of the first ROWS rows of row block pid_m
    (column block pid_n) into h, and with STORE_PRE the pre-activations too."""
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    offs_m = pid_m * BLOCK_M + tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_offsets = offs_m[:, None].to(tl.int64) * stride_h_p + offs_n[None, :]
    dtype = h_ptr.dtype.element_ty
    tl.store(h_ptr + row_offsets, h.to(dtype))
    if STORE_PRE:  # training: the backward needs the pre-activations
        tl.store(gate_pre_ptr + row_offsets, acc_gate.to(dtype))
        tl.store(up_pre_ptr + row_offsets, acc_up.to(dtype))


@triton.jit
def _gate_up_tma_tile(
    a_desc, w_desc, x_ptr, sorted_ids_ptr, h_ptr, gate_pre_ptr, up_pre_ptr,
    block_expert_ptr, D, F, num_assign, top_k, stride_x_t, stride_h_p, pid_m, pid_n,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, STORE_PRE: tl.constexpr, ONE_DOT: tl.constexpr,
    GATHER_A: tl.constexpr,
):  # fmt: skip
    """gate_up of the first ROWS rows of row block pid_m (a_desc's box: ROWS rows)."""
    acc_gate, acc_up = _gate_up_products(
        a_desc, w_desc, x_ptr, sorted_ids_ptr, block_expert_ptr, D, F, num_assign, top_k,
        stride_x_t, pid_m, pid_n, BLOCK_M, ROWS, BLOCK_N, BLOCK_K, ONE_DOT, GATHER_A,
    )  # fmt: skip
    _swiglu_store(
        acc_gate, acc_up, h_ptr, gate_pre_ptr, up_pre_ptr, stride_h_p, pid_m, pid_n, BLOCK_M,
        ROWS, BLOCK_N, STORE_PRE,
    )  # fmt: skip


@triton.jit
def gate_up_persistent_kernel(
    a_desc, w_desc, x_ptr, h_ptr, gate_pre_ptr, up_pre_ptr, sorted_ids_ptr, block_expert_ptr,
    num_padded_ptr, D, F, num_assign, top_k, stride_x_t, stride_h_p, num_programs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, STORE_PRE: tl.constexpr, ONE_DOT: tl.constexpr,
    GATHER_A: tl.constexpr,
):  # fmt: skip
    """`gate_up_tma_kernel`'s tiles (without HALF_TAIL), a program walking every
    num_programs-th tile of the padded length's in one loop nest that Triton flattens and
    pipelines, as `down_persistent_kernel` walks down's: a tile's first loads are in
    flight during the previous tile's SwiGLU and stores."""
    num_blocks_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = tl.cdiv(F, BLOCK_N)
    # the epilogue's own tile counter: its coordinates do not wait on the next tile's
    epilogue_tile = tl.program_id(0) - num_programs
    for tile in tl.range(tl.program_id(0), num_blocks_m * num_blocks_n, num_programs, flatten=True):
        pid_m, pid_n = _block_coords(tile, num_blocks_m, num_blocks_n, GROUP_M)
        acc_gate, acc_up = _gate_up_products(
            a_desc, w_desc, x_ptr, sorted_ids_ptr, block_expert_ptr, D, F, num_assign, top_k,
            stride_x_t, pid_m, pid_n, BLOCK_M, BLOCK_M, BLOCK_N, BLOCK_K, ONE_DOT, GATHER_A,
        )  # fmt: skip
        epilogue_tile += num_programs
        pid_m, pid_n = _block_coords(epilogue_tile, num_blocks_m, num_blocks_n, GROUP_M)
        _swiglu_store(
            acc_gate, acc_up, h_ptr, gate_pre_ptr, up_pre_ptr, stride_h_p, pid_m, pid_n,
            BLOCK_M, BLOCK_M, BLOCK_N, STORE_PRE,
        )  # fmt: skip


@triton.jit
def down_tma_kernel(
    h_desc, h_half_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_padded_ptr, D, F, num_assign, num_blocks_m, stride_out_a,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, HALF_TAIL: tl.constexpr,
):  # fmt: skip
    """out[a] <- gate[a] * h[row of a] @ W_down[expert of a], one tile a program (with
    HALF_TAIL as in `gate_up_tma_kernel`, h's tiles through h_half_desc)."""
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, tl.cdiv(D, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    if HALF_TAIL:  # noqa: SIM102 (an expert's last block, half of it padding: half the rows)
        if _second_half_is_padding(sorted_ids_ptr, pid_m, num_assign, BLOCK_M):
            _down_tma_tile(
                h_half_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr,
                block_expert_ptr, D, F, num_assign, stride_out_a, pid_m, pid_n,
                BLOCK_M, BLOCK_M // 2, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            return
    _down_tma_tile(
        h_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, D, F,
        num_assign, stride_out_a, pid_m, pid_n, BLOCK_M, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.jit
def _down_tma_tile(
    h_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, D, F,
    num_assign, stride_out_a, pid_m, pid_n, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """down of the first ROWS rows of row block pid_m (h_desc's box: ROWS rows)."""
    first_w_row = tl.load(block_expert_ptr + pid_m) * F
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(F, BLOCK_K)):
        a = h_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        acc = tl.dot(a, w_desc.load([first_w_row + k * BLOCK_K, pid_n * BLOCK_N]), acc)
    _weighted_scatter(
        acc, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign, stride_out_a, pid_m, pid_n,
        BLOCK_M, ROWS, BLOCK_N,
    )  # fmt: skip


@triton.jit
def down_persistent_kernel(
    h_desc, w_desc, gate_weight_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_padded_ptr, D, F, num_assign, stride_out_a, num_programs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """`down_tma_kernel`'s tiles (without HALF_TAIL), a program walking every
    num_programs-th tile of the padded length's: one loop nest that Triton flattens and
    pipelines, so a tile's first weight and h loads are in flight during the previous
    tile's epilogue (the down GEMM's K loop is 12-32 steps: its fill and its epilogue are
    a large share of a tile)."""
    num_blocks_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)
    num_blocks_n = tl.cdiv(D, BLOCK_N)
    k_steps = tl.cdiv(F, BLOCK_K)
    # the epilogue's own tile counter: its coordinates do not wait on the next tile's
    epilogue_tile = tl.program_id(0) - num_programs
    for tile in tl.range(tl.program_id(0), num_blocks_m * num_blocks_n, num_programs, flatten=True):
        pid_m, pid_n = _block_coords(tile, num_blocks_m, num_blocks_n, GROUP_M)
        first_w_row = tl.load(block_expert_ptr + pid_m) * F
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, k_steps):
            a = h_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            acc = tl.dot(a, w_desc.load([first_w_row + k * BLOCK_K, pid_n * BLOCK_N]), acc)
        epilogue_tile += num_programs
        pid_m, pid_n = _block_coords(epilogue_tile, num_blocks_m, num_blocks_n, GROUP_M)
        _weighted_scatter(
            acc, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign, stride_out_a, pid_m,
            pid_n, BLOCK_M, BLOCK_M, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _weighted_scatter(
    acc, gate_weight_ptr, out_ptr, sorted_ids_ptr, D, num_assign, stride_out_a, pid_m, pid_n,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The TMA down tiles' epilogue: the first ROWS rows of row block pid_m (columns block
    pid_n of acc), each times its assignment's routing weight, to that assignment's row
    of out; padding rows write nothing."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(sorted_ids_ptr + offs_m)
    row_ok = ids < num_assign
    gate = tl.load(gate_weight_ptr + ids, mask=row_ok, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + ids[:, None].to(tl.int64) * stride_out_a + offs_n[None, :]
    store_ok = row_ok[:, None] & (offs_n[None, :] < D)
    tl.store(out_ptrs, (acc * gate[:, None]).to(out_ptr.dtype.element_ty), mask=store_ok)


KERNELS = (
    gather_rows_kernel,
    gate_up_tma_kernel,
    gate_up_persistent_kernel,
    down_tma_kernel,
    down_persistent_kernel,
)


def available(device: torch.device) -> bool:
    """TMA is Hopper's (capability 9 and up); Triton's interpreter runs it on a CPU, and
    an offline pass compiles for Hopper (`moebench.offline_compile`)."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        has_tma = _HAS_TMA.get(index)
        if has_tma is None:  # asked twice a forward: 30 us a query under cProfile
            has_tma = _HAS_TMA[index] = torch.cuda.get_device_capability(index)[0] >= 9
        return has_tma
    return bool(triton.knobs.runtime.interpret) or fast_launch.compiling_offline()


# By CUDA device index. A dict rather than functools.cache: an import above the kernels
# would move their lines, and with them every shipped choice's fingerprint.
_HAS_TMA: dict[int, bool] = {}


# Streaming multiprocessors by CUDA device index (`multiprocessors`).
_MULTIPROCESSORS: dict[int, int] = {}
# Where there is no device to ask: an H200's count for an offline compile, and a few
# programs under the interpreter, so that each walks several tiles (tests).
_OFFLINE_MULTIPROCESSORS = 132
_INTERPRETER_PROGRAMS = 3


def multiprocessors(device: torch.device) -> int:
    """How many programs a persistent kernel launches at most on `device`."""
    if device.type != "cuda":
        if fast_launch.compiling_offline():
            return _OFFLINE_MULTIPROCESSORS
        return _INTERPRETER_PROGRAMS
    index = torch.cuda.current_device() if device.index is None else device.index
    count = _MULTIPROCESSORS.get(index)
    if count is None:
        count = torch.cuda.get_device_properties(index).multi_processor_count
        _MULTIPROCESSORS[index] = count
    return count


def takes(*weights: torch.Tensor) -> bool:
    """Whether TMA tiles can read these weights: on a device that has TMA (`available`),
    each contiguous and 16-byte aligned (a descriptor's base)."""
    return available(weights[0].device) and all(
        w.is_contiguous() and w.data_ptr() % _ALIGN_BYTES == 0 for w in weights
    )


def fits(kernel: str, config: dict, D: int, F: int, element_bytes: int) -> bool:
    """Whether `kernel`'s ("gate_up" or "down") TMA tiles of `config` suit these widths:
    rows 16-byte aligned, and no K tile of down running into the next expert's rows of
    the (E F) x D weights, no N tile of gate_up from gate into up (out-of-range columns
    of D are zero-filled, so D needs no multiple)."""
    if (D * element_bytes) % _ALIGN_BYTES or (F * element_bytes) % _ALIGN_BYTES:
        return False
    if kernel == "gate_up":
        return F % config["BLOCK_N"] == 0
    return F % config["BLOCK_K"] == 0


def candidates(kernel: str, block_m: int, D: int, F: int, element_bytes: int) -> list[dict]:
    """The TMA configs (`"TMA": True`) the tuner races for `kernel` at `block_m` beside
    `tuning.candidates`: from 64-row blocks, those that `fits` these widths, each tile
    also with HALF_TAIL (as the pointer kernels': an expert's last block whose second
    half is padding alone computes half its rows) and, not with it, PERSISTENT (a program
    a streaming multiprocessor, walking tiles), and gate_up's also with ONE_DOT (gate and
    up as one product twice as wide), and with ONE_DOT also GATHER_A."""
    if block_m < 64:
        return []
    configs = [
        {"BLOCK_M": block_m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8,
         "num_warps": warps, "num_stages": stages, "TMA": True}
        for n, k, warps, stages in TILES[kernel]
    ]  # fmt: skip
    plain = configs
    configs = plain + [{**config, "HALF_TAIL": True} for config in plain]
    persistent = [{**config, "PERSISTENT": True} for config in plain]
    if kernel == "down":
        configs += persistent
    if kernel == "gate_up":
        one_dot = [{**config, "ONE_DOT": True} for config in configs + persistent]
        configs += persistent + one_dot + [{**config, "GATHER_A": True} for config in one_dot]
    return [config for config in configs if fits(kernel, config, D, F, element_bytes)]


def _descriptor(matrix: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(matrix, block)


def _row_descriptors(rows_PK: torch.Tensor, config: dict) -> tuple:
    """The A operand's descriptors: whole blocks of rows, and (what HALF_TAIL's first
    halves load; a TMA box has a fixed height) half blocks."""
    block_m, block_k = config["BLOCK_M"], config["BLOCK_K"]
    return (
        _descriptor(rows_PK, [block_m, block_k]),
        _descriptor(rows_PK, [block_m // 2, block_k]),
    )


def gathered_rows(x_TD: torch.Tensor, alignment, top_k: int) -> torch.Tensor:
    """x's rows in the alignment's order (P x D, `gather_rows_kernel`; padding rows
    zeros): the A operand a TMA descriptor reads."""
    rows, D = alignment.max_rows, x_TD.shape[1]
    a_PD = torch.empty(rows, D, device=x_TD.device, dtype=x_TD.dtype)
    block_rows, block_d = 16, min(triton.next_power_of_2(D), 512)
    launch(
        gather_rows_kernel, (ceil_div(rows, block_rows),),
        x_TD, a_PD, alignment.sorted_ids_P, alignment.num_padded_1, D,
        alignment.num_assign, top_k, rows, x_TD.stride(0), a_PD.stride(0),
        BLOCK_R=block_rows, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return a_PD


def launch_gate_up(
    x_TD: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    h_PF: torch.Tensor,
    alignment,
    top_k: int,
    config: dict,
    pre_activations: tuple[torch.Tensor, torch.Tensor] | None = None,
    tile_kernel=None,
) -> None:
    """`kernels.launch_gate_up`'s results (h_PF, and the pre-activations if given) through
    `gather_rows_kernel` (not with GATHER_A) and `gate_up_tma_kernel` (or `tile_kernel`,
    which takes its arguments: merge_tail.py's), or with PERSISTENT
    `gate_up_persistent_kernel` (a program a streaming multiprocessor, at most one a
    tile); w_gate_up_E2FD contiguous."""
    E, two_f, D = w_gate_up_E2FD.shape
    F = two_f // 2
    gather_a = bool(config.get("GATHER_A"))
    if gather_a:  # the kernel loads x's rows itself: no copy, and no A descriptors
        a_descriptors = (x_TD, x_TD)
    else:
        a_descriptors = _row_descriptors(gathered_rows(x_TD, alignment, top_k), config)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    num_blocks_m = alignment.max_blocks
    w_desc = (
        _descriptor(w_gate_up_E2FD.view(E, 2, F, D), [1, 2, block_n, block_k])
        if config.get("ONE_DOT")
        else _descriptor(w_gate_up_E2FD.view(E * two_f, D), [block_n, block_k])
    )
    if config.get("PERSISTENT"):
        tiles = num_blocks_m * ceil_div(F, block_n)
        programs = min(tiles, multiprocessors(x_TD.device))
        launch(
            gate_up_persistent_kernel, (programs,),
            a_descriptors[0], w_desc, x_TD, h_PF, *(pre_activations or (h_PF, h_PF)),
            alignment.sorted_ids_P, alignment.block_expert_B, alignment.num_padded_1, D, F,
            alignment.num_assign, top_k, x_TD.stride(0), h_PF.stride(0), programs,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
            STORE_PRE=pre_activations is not None, ONE_DOT=bool(config.get("ONE_DOT")),
            GATHER_A=gather_a, num_warps=config["num_warps"], num_stages=config["num_stages"],
        )  # fmt: skip
        return
    launch(
        tile_kernel or gate_up_tma_kernel, (num_blocks_m * ceil_div(F, block_n),),
        *a_descriptors, w_desc,
        x_TD, h_PF, *(pre_activations or (h_PF, h_PF)), alignment.sorted_ids_P,
        alignment.block_expert_B, alignment.num_padded_1, D, F, alignment.num_assign, top_k,
        num_blocks_m, x_TD.stride(0), h_PF.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
        STORE_PRE=pre_activations is not None, HALF_TAIL=bool(config.get("HALF_TAIL")),
        ONE_DOT=bool(config.get("ONE_DOT")), GATHER_A=gather_a,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip


def launch_down(
    h_PF: torch.Tensor,
    w_down_EFD: torch.Tensor,
    gate_weight_A: torch.Tensor,
    out_AD: torch.Tensor,
    alignment,
    config: dict,
    tile_kernel=None,
) -> None:
    """`kernels.launch_down`'s result through `down_tma_kernel` (or `tile_kernel`, which
    takes its arguments: merge_tail.py's), or with PERSISTENT through
    `down_persistent_kernel` (a program a streaming multiprocessor, at most one a tile);
    w_down_EFD contiguous."""
    E, F, D = w_down_EFD.shape
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    num_blocks_m = alignment.max_blocks
    w_desc = _descriptor(w_down_EFD.view(E * F, D), [block_k, block_n])
    if config.get("PERSISTENT"):
        tiles = num_blocks_m * ceil_div(D, block_n)
        programs = min(tiles, multiprocessors(h_PF.device))
        launch(
            down_persistent_kernel, (programs,),
            _descriptor(h_PF, [block_m, block_k]), w_desc, gate_weight_A, out_AD,
            alignment.sorted_ids_P, alignment.block_expert_B, alignment.num_padded_1, D, F,
            alignment.num_assign, out_AD.stride(0), programs,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )  # fmt: skip
        return
    launch(
        tile_kernel or down_tma_kernel, (num_blocks_m * ceil_div(D, block_n),),
        *_row_descriptors(h_PF, config), w_desc, gate_weight_A, out_AD,
        alignment.sorted_ids_P, alignment.block_expert_B, alignment.num_padded_1, D, F,
        alignment.num_assign, num_blocks_m, out_AD.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_M"],
        HALF_TAIL=bool(config.get("HALF_TAIL")),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
