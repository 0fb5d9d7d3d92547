"""Time spent in each phase of one expert-parallel step: CUDA events on CUDA (so the
asynchronous device work is what is timed), perf_counter_ns on the CPU.

The layer wraps each phase in `timer.phase(name)`; in the timed latency loop its timer is
`NULL_TIMER`, whose phases cost one no-op context manager each.

Phases, in the order of a step: router (scores, top-k), permute (capacity mask, sort by
expert, gather rows; regroup received rows by local expert), dispatch (counts exchange and
token all-to-all), expert (the grouped expert GEMMs), combine (the all-to-all back),
unpermute (rows back to the received order; weighted scatter-add into tokens), shared
(shared experts), and exposed: time a rank sat in `wait()` on an asynchronous
all-to-all, i.e. communication that computation did not hide (overlapped schedule only).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

PHASES: tuple[str, ...] = (
    "router",
    "permute",
    "dispatch",
    "expert",
    "combine",
    "unpermute",
    "shared",
    "exposed",
)
_NULL = nullcontext()


class NullTimer:
    """Times nothing: the layer's timer outside the breakdown pass."""

    def phase(self, name: str) -> AbstractContextManager[None]:
        return _NULL


NULL_TIMER = NullTimer()


class PhaseTimer:
    """Sums the duration of each named phase over one step; `collect()` returns the sums."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._spans: list[tuple[str, object, object]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases: {PHASES}")
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter_ns()
            yield
            end = time.perf_counter_ns()
        self._spans.append((name, start, end))

    def collect(self) -> dict[str, float]:
        """Milliseconds per phase since the last collect (every phase present, 0 if unseen);
        synchronises the device on CUDA."""
        if self.cuda and self._spans:
            torch.cuda.synchronize()
        totals = dict.fromkeys(PHASES, 0.0)
        for name, start, end in self._spans:
            if self.cuda:
                totals[name] += start.elapsed_time(end)  # type: ignore[attr-defined]
            else:
                totals[name] += (end - start) / 1e6  # type: ignore[operator]
        self._spans = []
        return totals
