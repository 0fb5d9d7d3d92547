"""`offload`: routed experts live in host memory; a device cache holds C of them (LRU).

Offloading changes where the weights live, not the function: the layer is exact (checked
against the reference). The router and the shared experts stay on the device; the E
routed experts are kept in host memory (pinned when the case runs on CUDA, so copies are
asynchronous DMA), and a cache of C device slots (option `cache_experts`) holds the
experts most recently used.

A forward routes on the device, then brings the expert ids to the host (one sync: the
host decides what to copy) and works through the experts its tokens chose, those already
cached first (all at once: one grouped GEMM per weight over the C slots, where the torch
build has one; else one by one), so that their slots are free and their compute overlaps
the copies of the missing ones, which are then computed one by one as they arrive:

- a missing expert is copied into a slot on a side CUDA stream, which first waits for the
  last compute that read the slot; every compute that reads a slot (a miss, a hit, the
  cached experts at once) first waits on the event of the last copy into that slot, so
  a copy issued at the end of one forward (the warm-up fill below) has landed before a
  later forward reads it; a compute waits on its own slots' copies, not on the others;
- the slot is that of the least recently used expert that this forward no longer needs
  (a free slot first): LRU with the experts still needed by this forward pinned. With
  C smaller than the experts one forward needs, slots are reused within the forward;
- slots still free at the end of a forward (only while the cache warms up) are filled
  with the lowest-id experts not cached, so the cache is full after the first forward and
  a cache of C = E never misses again.

On a machine without CUDA the same logic runs host to host: the "host" store and the
"device" slots are separate CPU tensors, copied with `.copy_()`, so it can be tested.
Forward mode only (a training step would need the weights a slot held at forward time).

Options: `cache_experts`: an int, the number of slots (1 <= C <= E), or a float in (0, 1],
a fraction of E (C = max(1, round(E x fraction)), half rounded up); default E // 2
(at least 1).

Columns (extra_metrics), per forward, averaged over the forwards after the first (the
cold one, which the harness spends on its correctness check; if only one forward ran,
over it): offload_h2d_bytes (host-to-device bytes), offload_copy_ms (time the copies took:
CUDA events around each copy on the side stream, or the wall time of the host copies),
offload_hit_rate (cached / needed experts, pooled over those forwards), offload_miss_count
(experts copied in because they were needed); the same copy time and bytes as the
harness's comm_ms and comm_bytes (the copies are this layer's communication); and
offload_cache_experts (C), offload_device_bytes (device memory the layer allocated
itself, its slots, as the CUDA caching allocator counted it at build; None without CUDA;
the router and shared experts it shares with the harness's weight set are in
weight_bytes), offload_cold_h2d_bytes (the first forward's bytes, warm-up fill
included), offload_forwards, offload_host_bytes (the host store), offload_pinned (1 if the
host store is pinned). Over a stack, _bytes/_ms/_count columns add up and the others are
averaged (moebench.layer.Stack).

Shape legend: T tokens, D hidden, F expert width, E routed experts, C cache slots,
K top_k, A = T x K (token, slot) assignments, H those of them sent to cached experts.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass, field

import torch

from moebench.case import Case
from moebench.impls.grouped import GROUPED_MM, grouped_mm_works
from moebench.layer import MoELayer, swiglu
from moebench.registry import register
from moebench.weights import ExpertWeights


def cache_slots(num_experts: int, option: int | float | None) -> int:
    """C for `cache_experts` = `option` (module docstring); raises ValueError if invalid."""
    if option is None:
        return max(1, num_experts // 2)
    if isinstance(option, bool) or not isinstance(option, int | float):
        raise ValueError(
            f"offload: option cache_experts={option!r}; allowed: an int 1..{num_experts} "
            "(slots) or a float in (0, 1] (fraction of num_experts)"
        )
    if isinstance(option, float):
        if not 0 < option <= 1:
            raise ValueError(
                f"offload: option cache_experts={option!r}: a float is a fraction of "
                f"num_experts; allowed: 0 < fraction <= 1, or an int 1..{num_experts}"
            )
        return max(1, math.floor(num_experts * option + 0.5))
    if not 1 <= option <= num_experts:
        raise ValueError(
            f"offload: option cache_experts={option}; allowed: an int 1..{num_experts} "
            f"(num_experts={num_experts}) or a float in (0, 1]"
        )
    return option


class NoFreeSlotError(RuntimeError):
    """Every slot holds an expert that the current forward still needs."""


class ExpertLRU:
    """Which expert sits in which of `capacity` slots, least recently used first. Holds no
    tensors: pure bookkeeping, so the policy is testable on its own."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._slot_of: OrderedDict[int, int] = OrderedDict()
        self._free: list[int] = list(range(capacity))

    def slot(self, expert: int) -> int | None:
        """The slot holding `expert`, or None (does not count as a use)."""
        return self._slot_of.get(expert)

    def use(self, expert: int) -> None:
        """Mark a cached expert as the most recently used."""
        self._slot_of.move_to_end(expert)

    def take(self, pinned: Container[int] = ()) -> tuple[int, int | None]:
        """(slot, evicted expert or None) for a new expert: a free slot if any, else the
        slot of the least recently used expert not in `pinned`, which is evicted."""
        if self._free:
            return self._free.pop(0), None
        for expert, slot in self._slot_of.items():
            if expert not in pinned:
                del self._slot_of[expert]
                return slot, expert
        raise NoFreeSlotError(f"all {self.capacity} slots hold experts still needed")

    def put(self, expert: int, slot: int) -> None:
        """Record `expert` in `slot` (from `take`) as the most recently used."""
        self._slot_of[expert] = slot

    def has_free(self) -> bool:
        return bool(self._free)

    def experts(self) -> list[int]:
        """Cached experts, least recently used first."""
        return list(self._slot_of)


@dataclass
class OffloadCounters:
    """Traffic since build: the first (cold) forward apart from the rest."""

    forwards: int = 0
    cold_h2d_bytes: int = 0
    cold_copy_ms: float = 0.0
    cold_hits: int = 0
    cold_needed: int = 0
    h2d_bytes: int = 0
    copy_ms: float = 0.0
    hits: int = 0
    needed: int = 0
    # CUDA copies whose duration is not read yet: (forward index, start, end) events.
    pending: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def add_copy_ms(self, forward: int, ms: float) -> None:
        if forward == 1:
            self.cold_copy_ms += ms
        else:
            self.copy_ms += ms

    def drain(self, wait: bool) -> None:
        """Fold finished copies' times in; with `wait`, all of them (synchronizes)."""
        keep = []
        for forward, start, end in self.pending:
            if wait:
                end.synchronize()
            if wait or end.query():
                self.add_copy_ms(forward, start.elapsed_time(end))
            else:
                keep.append((forward, start, end))
        self.pending = keep


class OffloadMoE(MoELayer):
    """Experts in host memory, C device slots (LRU), copies on a side stream."""

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        device = weights.device
        self.on_cuda = device.type == "cuda"
        capacity = cache_slots(self.num_experts, case.option("cache_experts"))
        self.lru = ExpertLRU(capacity)
        # Host store: copies, never views of the harness's tensors (on CPU they would be
        # the same memory, and the copies would copy nothing).
        host = [
            t.detach().to("cpu", copy=True)
            for t in (weights.w_gate_EDF, weights.w_up_EDF, weights.w_down_EFD)
        ]
        self.pinned = self.on_cuda
        if self.pinned:
            host = [t.pin_memory() for t in host]
        self.host_gate_EDF, self.host_up_EDF, self.host_down_EFD = host
        # Device slots: buffers, so weight_bytes counts them (and not the host store).
        allocated_before = torch.cuda.memory_allocated(device) if self.on_cuda else 0
        self.register_buffer("cache_gate_CDF", torch.empty_like(host[0][:capacity], device=device))
        self.register_buffer("cache_up_CDF", torch.empty_like(host[1][:capacity], device=device))
        self.register_buffer("cache_down_CFD", torch.empty_like(host[2][:capacity], device=device))
        self.device_bytes = (
            torch.cuda.memory_allocated(device) - allocated_before if self.on_cuda else None
        )
        self.expert_bytes = sum(t[0].numel() * t.element_size() for t in host)
        self.copy_stream = torch.cuda.Stream(device) if self.on_cuda else None
        if self.copy_stream is not None:
            # Freed with copies still queued (a layer dropped after a failed check): the
            # allocator must not hand the slots out before those copies finish.
            for cache in (self.cache_gate_CDF, self.cache_up_CDF, self.cache_down_CFD):
                cache.record_stream(self.copy_stream)
        # Per slot: event recorded after the last compute that read it, and after the last
        # copy into it (None: nothing yet, or no CUDA).
        self._slot_read: list[torch.cuda.Event | None] = [None] * capacity
        self._slot_ready: list[torch.cuda.Event | None] = [None] * capacity
        self.counters = OffloadCounters()
        self.use_grouped_mm = grouped_mm_works(device, weights.dtype, backward=False)
        where = "cuda side stream" if self.on_cuda else "host-to-host (no CUDA)"
        hits = "grouped_mm" if self.use_grouped_mm else "per-expert"
        self.impl_detail = f"{where}, cached experts {hits}"

    @property
    def cache_experts(self) -> int:
        return self.lru.capacity

    def _copy_in(self, expert: int, slot: int) -> None:
        """Copy `expert` into `slot`; on CUDA asynchronously (`_wait_ready` before a read)."""
        pairs = (
            (self.cache_gate_CDF, self.host_gate_EDF),
            (self.cache_up_CDF, self.host_up_EDF),
            (self.cache_down_CFD, self.host_down_EFD),
        )
        forward = self.counters.forwards
        if forward == 1:
            self.counters.cold_h2d_bytes += self.expert_bytes
        else:
            self.counters.h2d_bytes += self.expert_bytes
        if self.copy_stream is None:
            started = time.perf_counter_ns()
            for cache, host in pairs:
                cache[slot].copy_(host[expert])
            self.counters.add_copy_ms(forward, (time.perf_counter_ns() - started) / 1e6)
            return
        with torch.cuda.stream(self.copy_stream):
            if self._slot_read[slot] is not None:
                self.copy_stream.wait_event(self._slot_read[slot])
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(self.copy_stream)
            for cache, host in pairs:
                cache[slot].copy_(host[expert], non_blocking=True)
            end.record(self.copy_stream)
        self.counters.pending.append((forward, start, end))
        self._slot_ready[slot] = end

    def _wait_ready(self, slots: list[int]) -> None:
        """Make the compute stream wait for the copies into `slots` still pending."""
        for slot in slots:
            event = self._slot_ready[slot]
            if event is not None:
                # Kept (not cleared): a later forward may run on another stream.
                torch.cuda.current_stream(self.cache_gate_CDF.device).wait_event(event)

    def routed(
        self, x_TD: torch.Tensor, gate_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        counters = self.counters
        counters.forwards += 1
        counters.drain(wait=False)
        with self.timer.phase("permute"):
            expert_ids_A = expert_ids_TK.flatten()
            order_A = torch.argsort(expert_ids_A, stable=True)
            token_of_A = order_A // self.top_k
            x_AD = x_TD[token_of_A]
            sorted_ids_A = expert_ids_A[order_A]
            counts = torch.bincount(expert_ids_A, minlength=self.num_experts).tolist()  # sync
        with self.timer.phase("expert"):  # copies in, cached experts first, LRU upkeep
            out_AD = self._compute(x_AD, sorted_ids_A, counts)
        with self.timer.phase("unpermute"):
            out_AD = out_AD * gate_weights_TK.flatten()[order_A, None]
            return torch.zeros_like(x_TD).index_add(0, token_of_A, out_AD)

    def _compute(
        self, x_AD: torch.Tensor, sorted_ids_A: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """Every routed expert's rows of x_AD (sorted by expert, `counts` rows each)
        through it: missing experts copied into free or least recently used slots while
        cached ones compute."""
        counters = self.counters
        starts = [0] * self.num_experts
        for e in range(1, self.num_experts):
            starts[e] = starts[e - 1] + counts[e - 1]
        needed = [e for e in range(self.num_experts) if counts[e]]
        hits = [e for e in needed if self.lru.slot(e) is not None]
        misses = [e for e in needed if self.lru.slot(e) is None]
        if counters.forwards == 1:
            counters.cold_hits += len(hits)
            counters.cold_needed += len(needed)
        else:
            counters.hits += len(hits)
            counters.needed += len(needed)

        pinned = set(needed)  # experts this forward still has to compute
        next_miss = 0

        def issue_copies() -> None:
            nonlocal next_miss
            while next_miss < len(misses):
                try:
                    slot, _evicted = self.lru.take(pinned)
                except NoFreeSlotError:
                    return  # the next computed expert frees one
                expert = misses[next_miss]
                self._copy_in(expert, slot)
                self.lru.put(expert, slot)
                next_miss += 1

        issue_copies()
        out_AD = torch.empty_like(x_AD)
        batched = self.use_grouped_mm and len(hits) > 1
        if batched:  # every cached expert at once: their slots free for copies sooner
            self._hits_at_once(x_AD, out_AD, sorted_ids_A, hits, counts)
            for expert in hits:
                self.lru.use(expert)
                pinned.discard(expert)
            issue_copies()
        for expert in misses if batched else hits + misses:
            slot = self.lru.slot(expert)
            if slot is None:  # cannot happen: each computed expert frees a slot for it
                raise RuntimeError(f"offload: expert {expert} was not copied in")
            self._wait_ready([slot])
            rows = slice(starts[expert], starts[expert] + counts[expert])
            out_AD[rows] = swiglu(
                x_AD[rows],
                self.cache_gate_CDF[slot],
                self.cache_up_CDF[slot],
                self.cache_down_CFD[slot],
            )
            self._mark_read([slot])
            self.lru.use(expert)
            pinned.discard(expert)
            issue_copies()
        self._fill_free_slots()
        return out_AD

    def _mark_read(self, slots: list[int]) -> None:
        """Record that the compute stream has read `slots` (a later copy into one waits)."""
        if self.on_cuda:
            read = torch.cuda.Event()
            read.record(torch.cuda.current_stream(self.cache_gate_CDF.device))
            for slot in slots:
                self._slot_read[slot] = read

    def _hits_at_once(
        self,
        x_AD: torch.Tensor,
        out_AD: torch.Tensor,
        sorted_ids_A: torch.Tensor,
        hits: list[int],
        counts: list[int],
    ) -> None:
        """The cached experts' rows of x_AD (sorted by expert) through one grouped GEMM
        per weight over the C slots, written to the same rows of out_AD."""
        C = self.cache_experts
        slot_key_E = torch.full((self.num_experts,), C, dtype=torch.long)
        for expert in hits:
            slot_key_E[expert] = self.lru.slot(expert)
        slot_key_A = slot_key_E.to(x_AD.device)[sorted_ids_A]  # C: not cached
        rows = sum(counts[expert] for expert in hits)
        hit_rows_H = torch.argsort(slot_key_A, stable=True)[:rows]  # grouped by slot
        counts_C = torch.bincount(slot_key_A, minlength=C + 1)[:C]
        offsets_C = torch.cumsum(counts_C, dim=0, dtype=torch.int32)
        x_HD = x_AD[hit_rows_H]
        self._wait_ready([self.lru.slot(expert) for expert in hits])
        gate_HF = GROUPED_MM(x_HD, self.cache_gate_CDF, offs=offsets_C)
        up_HF = GROUPED_MM(x_HD, self.cache_up_CDF, offs=offsets_C)
        out_AD[hit_rows_H] = GROUPED_MM(
            torch.nn.functional.silu(gate_HF) * up_HF, self.cache_down_CFD, offs=offsets_C
        )
        self._mark_read([self.lru.slot(expert) for expert in hits])

    def _fill_free_slots(self) -> None:
        """Warm-up: copy the lowest-id uncached experts into slots no expert holds yet."""
        for expert in range(self.num_experts):
            if not self.lru.has_free():
                return
            if self.lru.slot(expert) is None:
                slot, _ = self.lru.take()
                self._copy_in(expert, slot)
                self.lru.put(expert, slot)

    def extra_metrics(self) -> dict[str, float | int | list]:
        """Offloading's columns (module docstring); synchronizes, so call outside timing."""
        counters = self.counters
        counters.drain(wait=True)
        if counters.forwards > 1:
            warm = counters.forwards - 1
            h2d, copy_ms = counters.h2d_bytes / warm, counters.copy_ms / warm
            hits, needed = counters.hits, counters.needed
        else:
            warm = counters.forwards
            h2d, copy_ms = counters.cold_h2d_bytes, counters.cold_copy_ms
            hits, needed = counters.cold_hits, counters.cold_needed
        host_bytes = sum(
            t.numel() * t.element_size()
            for t in (self.host_gate_EDF, self.host_up_EDF, self.host_down_EFD)
        )
        return {
            "offload_cache_experts": self.cache_experts,
            "offload_device_bytes": self.device_bytes,
            "offload_h2d_bytes": h2d,
            "offload_copy_ms": copy_ms,
            "offload_hit_rate": hits / needed if needed else math.nan,
            "offload_miss_count": (needed - hits) / warm if warm else math.nan,
            "offload_cold_h2d_bytes": counters.cold_h2d_bytes,
            "offload_forwards": counters.forwards,
            "offload_host_bytes": host_bytes,
            "offload_pinned": int(self.pinned),
            "comm_ms": copy_ms,
            "comm_bytes": round(h2d),
        }


@register(
    "offload",
    family="offloading",
    description="experts in (pinned) host memory, an LRU device cache of cache_experts "
    "experts, missing ones copied on a side stream while cached ones compute",
    modes=("forward",),
    options=("cache_experts",),
)
def build(weights: ExpertWeights, case: Case) -> OffloadMoE:
    return OffloadMoE(weights, case)
