"""Programmatic dependent launch (PDL) for moebench's Triton kernels (imports Triton).

A one-token MoE layer is a chain of short kernels (router logits, top-k, the two expert
GEMMs), each waiting for the one before. Normally a kernel's programs are only scheduled
once the previous kernel has finished, which on an H200 leaves about 2 us idle between
kernels even inside a CUDA graph: a fifth of a graphed Qwen3-30B-A3B decode step.

With PDL (compute capability 9.0 and later) a kernel launched with `launch_pdl=True` may
be scheduled as soon as every program of the kernel before it has executed
`griddepcontrol.launch_dependents`; its programs then block in `griddepcontrol.wait`
until that kernel has finished and its writes are visible. `after_previous_kernel` does
both, first thing in a program, the wait first: every read of the previous kernel's
output comes after it, a kernel that ends implies that all kernels before it ended (every
program waited), and at most the next kernel is scheduled early, never a chain of them.
Stream capture keeps these programmatic edges in a CUDA graph.

Kernels take a `USE_PDL` constexpr and call `after_previous_kernel(USE_PDL)` before any
global memory access; launchers pass `launch_pdl=use_pdl(tensor)` and `USE_PDL` alike.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(tensor: torch.Tensor) -> bool:
    """Whether kernels on `tensor`'s device launch with PDL: CUDA of compute capability
    9.0 or later, not Triton's interpreter, and not turned off by MOEBENCH_PDL=0."""
    if tensor.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("MOEBENCH_PDL", "1") == "0":
        return False
    return _device_has_pdl(tensor.device.index or 0)


@triton.jit
def after_previous_kernel(USE_PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has finished and its writes are visible,
    then let the next kernel be scheduled (module docstring). Without: nothing."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
