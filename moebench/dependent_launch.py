"""Programmatic dependent launch (PDL) for moebench's own Triton kernels on Hopper and later.

A layer's forward is a chain of kernels on one stream (router logits, top-k, alignment,
two GEMMs, the sum over slots). Launched plainly, each kernel starts only when the one
before it has finished: its launch, the scheduling of its programs and their prologues
come after the predecessor's last program, on an idle card. At one token a fused layer
spends most of a 35 us call in kernels of 2-15 us each, so those boundaries are a large
part of it. With PDL a kernel is launched while its predecessor still runs, its
programs take the SMs the predecessor's last wave leaves free, and each waits for the
predecessor's memory (`griddepcontrol.wait`) before reading anything.

The contract every kernel launched with `launch_pdl` keeps here:

- `wait_for_predecessor` comes before its first read of anything an earlier kernel of
  the stream wrote, and before its first write (the predecessor may still read memory
  that the allocator hands this kernel).
- `release_dependents` comes after that wait. The next kernel can then start only once
  this kernel's every program has passed its wait, so whatever ran two or more kernels
  back has finished when any later kernel starts. The small kernels release at once;
  the two GEMMs after their main loop, so the next kernel's launch falls under their
  epilogues (at once, Mixtral-8x7B's one-token call was 0.8% slower than plain; after
  the loop, 2.4% faster).

Both are no-ops when the kernel was launched plainly, so a plain launch of the same
compiled kernel stays correct. A kernel without them must not be launched with PDL
(the backward's kernels launch plainly).

`enabled` says whether a device gets PDL: NVIDIA compute capability 9.0 or later and a
Triton that has it (`gdc_wait` and the `launch_pdl` option: 3.6 does), unless
`$MOEBENCH_PDL=0` (read once, `refresh_switch`) turns it off. `for_tokens` adds the rule:
calls of at most MAX_TOKENS tokens, where it was measured to pay. Under CUDA graph
capture the dependencies become the graph's programmatic edges. A call's first kernel
may launch under whatever ran before it: the previous layer, the timer's L2 flush.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moebench.env import switch_off

ENV_SWITCH = "MOEBENCH_PDL"
# The most tokens of a call whose kernels launch with PDL. The fused layer's graphed
# forward on an H200, plain against PDL in turns (scripts/dependent_launch_probe.py;
# triton/NOTES.md, version 13): at 1 token 1-7% faster (Qwen3-30B-A3B 34.8 -> 32.4 us),
# at 64 tokens 0-1%, at 1024 tokens 1.6-3.5% slower (OLMoE-1B-7B 317 -> 328 us).
MAX_TOKENS = 64


def switched_off() -> bool:
    """Whether `$MOEBENCH_PDL` turns dependent launch off ("0", "off", "false", "no")."""
    return switch_off(ENV_SWITCH)


@functools.cache
def _capable(device_index: int) -> bool:
    if torch.version.hip is not None:  # ROCm reports its own "capability" (9.4 on MI300)
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9 and triton_has_it()


@functools.cache
def triton_has_it() -> bool:
    """Whether this Triton can wait in a kernel and launch with PDL (older ones would fail
    to compile the wait, or take `launch_pdl` for a kernel argument)."""
    import dataclasses

    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    options = {field.name for field in dataclasses.fields(CUDAOptions)}
    return hasattr(tl.extra.cuda, "gdc_wait") and "launch_pdl" in options


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL (module docstring)."""
    if device.type != "cuda" or _off:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capable(index)


def for_tokens(device: torch.device, tokens: int) -> bool:
    """Whether the kernels of a call of `tokens` tokens on `device` launch with PDL:
    `enabled`, and at most MAX_TOKENS tokens."""
    return tokens <= MAX_TOKENS and enabled(device)


def state() -> str | None:
    """The run's environment record: "on" or "off" where CUDA is present (the first
    GPU's capability and the switch), else None. `moebench compare` sets it side by side,
    since it moves the latency of small calls."""
    if not torch.cuda.is_available():
        return None
    return "on" if enabled(torch.device("cuda", 0)) else "off"


@triton.jit
def wait_for_predecessor(ON: tl.constexpr):
    """Block until the kernel launched before this one has finished and its writes are
    visible (a no-op unless ON and launched with PDL)."""
    if ON:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_dependents(ON: tl.constexpr):
    """Let the next kernel launch once every program of this one has passed here."""
    if ON:
        tl.extra.cuda.gdc_launch_dependents()


# The switch, read once per process and again by `refresh_switch`, as fast_launch reads
# its own: read on every call, it was about 9 us of a one-token forward's 200 us of host.
_off = switched_off()


def refresh_switch() -> None:
    """Read `$MOEBENCH_PDL` again (for tests and probes that flip it)."""
    global _off
    _off = switched_off()
