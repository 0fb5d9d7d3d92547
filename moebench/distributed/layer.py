"""`ExpertParallelMoE`: an MoE layer whose routed experts are sharded over the ranks of a
process group; tokens travel to their experts and back by all-to-all.

Shape legend: T tokens on this rank, D hidden, E experts in all, W ranks, L = E / W experts
on this rank, K top_k, A (token, slot) rows of one chunk sent by this rank, R rows it
received (ordered by source rank), N the same rows grouped by local expert.

Each rank holds the router and the shared experts whole (they are replicated, like data
parallel) and E / W routed experts. A step (see `dispatcher.py` for the exchange):
router -> [capacity mask] -> permute -> counts + token all-to-all -> local experts ->
all-to-all back -> unpermute, + shared experts. The local experts are computed by
`moebench.impls.grouped.GroupedMoE` on this rank's slice of the weights: the very code
the single-device `grouped` implementation runs, unaware of the parallelism.

Variants (flags, not subclasses, so the step is one function):
- dropless: every assignment is kept.
- capacity_factor: each expert keeps at most C = ceil(capacity_factor x T x K / E)
  assignments from each rank (GShard's per-group capacity, a group being one rank's
  tokens; first slots before second slots, then token order), dropped ones are not sent.
- chunks > 1 with overlap: the rank's tokens are split into chunks whose all-to-alls are
  issued asynchronously, so one chunk's dispatch (or combine) travels while another
  chunk's experts compute; the shared experts run while the first dispatch travels.
  With overlap off the same chunks run one after the other (the breakdown's reference).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
import torch.distributed as dist

from moebench.case import Case
from moebench.distributed.dispatcher import AllToAllDispatcher, Route, Splits, Traffic
from moebench.distributed.group import backend_for, ep_problem
from moebench.impls.capacity import expert_capacity, slot_positions
from moebench.impls.grouped import GroupedMoE
from moebench.layer import LayerStats, MoELayer
from moebench.measure.phases import NULL_TIMER, NullTimer, PhaseTimer
from moebench.weights import ExpertWeights


def local_weights(weights: ExpertWeights, rank: int, local_experts: int) -> ExpertWeights:
    """Rank `rank`'s experts as an ExpertWeights of L experts (expert tensors copied, so the
    full set can be freed; the router slice is a view and only fills the type's slot)."""
    experts = slice(rank * local_experts, (rank + 1) * local_experts)
    shape = weights.shape
    return ExpertWeights(
        shape=replace(
            shape,
            num_experts=local_experts,
            top_k=min(shape.top_k, local_experts),
            shared_experts=0,
        ),
        w_router_DE=weights.w_router_DE[:, experts],
        router_bias_E=weights.router_bias_E[experts],
        w_gate_EDF=weights.w_gate_EDF[experts].clone(),
        w_up_EDF=weights.w_up_EDF[experts].clone(),
        w_down_EFD=weights.w_down_EFD[experts].clone(),
    )


class ExpertParallelMoE(MoELayer):
    """Router and shared experts replicated, routed experts sharded over `group`."""

    def __init__(
        self,
        weights: ExpertWeights,
        case: Case,
        group: dist.ProcessGroup,
        *,
        capacity_factor: float | None = None,
        chunks: int = 1,
        overlap: bool = False,
    ):
        super().__init__(weights, case)
        world_size = dist.get_world_size(group)
        problem = ep_problem(self.num_experts, world_size)
        if problem is None and case.world_size != world_size:
            problem = f"case world_size={case.world_size}, process group of {world_size} ranks"
        if problem is not None:
            raise ValueError(f"{case.impl}: {problem}")
        if chunks < 1:
            raise ValueError(f"{case.impl}: chunks must be >= 1, got {chunks}")
        self.dispatcher = AllToAllDispatcher(group, self.num_experts)
        self.world_size = world_size
        self.rank = dist.get_rank(group)
        self.local_experts = self.num_experts // world_size
        # The local experts: the grouped implementation itself, on this rank's slice.
        self.experts = GroupedMoE(local_weights(weights, self.rank, self.local_experts), case)
        self.capacity_factor = capacity_factor
        self.chunks = chunks
        self.overlap = overlap
        self.timer: NullTimer | PhaseTimer = NULL_TIMER
        backend = backend_for(weights.device.type)
        detail = f"{backend} x{world_size}, {self.local_experts} experts/rank, "
        detail += self.experts.impl_detail
        if chunks > 1:
            detail += f", {chunks} chunks" + (" overlapped" if overlap else "")
        self.impl_detail = detail

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with self.timer.phase("router"):
            gate_weights_TK, expert_ids_TK, probs_TE = self.router(x_TD)
        self._last = (expert_ids_TK, probs_TE)
        return self._step(x_TD, gate_weights_TK, expert_ids_TK, with_shared=True)

    def routed(
        self, x_TD: torch.Tensor, gate_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        return self._step(x_TD, gate_weights_TK, expert_ids_TK, with_shared=False)

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        if self.shared is None:
            return None
        with self.timer.phase("shared"):
            return self.shared_output(x_TD)

    def _experts(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        with self.timer.phase("expert"):
            if x_ND.shape[0] == 0:  # nothing routed here this step
                return x_ND.new_empty(0, x_ND.shape[1])
            return self.experts._experts(x_ND, counts_L)

    def _step(
        self,
        x_TD: torch.Tensor,
        gate_weights_TK: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        with_shared: bool,
    ) -> torch.Tensor:
        timer, dispatcher = self.timer, self.dispatcher
        T = x_TD.shape[0]
        with timer.phase("permute"):
            keep_TK = None
            if self.capacity_factor is not None:
                capacity = expert_capacity(T, self.top_k, self.num_experts, self.capacity_factor)
                keep_TK = slot_positions(expert_ids_TK, self.num_experts) < capacity
                self._last_dropped_TK = ~keep_TK
            chunks = max(1, min(self.chunks, T))
            starts = [round(i * T / chunks) for i in range(chunks + 1)]
            routes = [
                dispatcher.permute(
                    x_TD[a:b],
                    gate_weights_TK[a:b],
                    expert_ids_TK[a:b],
                    None if keep_TK is None else keep_TK[a:b],
                    token_offset=a,
                )
                for a, b in itertools.pairwise(starts)
            ]
        with timer.phase("exposed" if self.overlap else "dispatch"):
            splits = dispatcher.exchange_counts(routes)
        shared_TD = None
        if self.overlap:
            outputs, shared_TD = self._overlapped(x_TD if with_shared else None, routes, splits)
        else:
            outputs = [self._one_chunk(route, split) for route, split in zip(routes, splits)]
        y_TD = torch.zeros_like(x_TD)
        with timer.phase("unpermute"):
            for route, out_AD in zip(routes, outputs):
                dispatcher.unpermute(y_TD, route, out_AD)
        if with_shared and not self.overlap:
            shared_TD = self._shared(x_TD)
        return y_TD if shared_TD is None else y_TD + shared_TD

    def _one_chunk(self, route: Route, splits: Splits) -> torch.Tensor:
        """Dispatch, compute, combine one chunk, each exchange waited for at once."""
        timer, dispatcher = self.timer, self.dispatcher
        with timer.phase("dispatch"):
            recv_RD, _ = dispatcher.dispatch(route, splits)
        with timer.phase("permute"):
            x_ND, order_R, counts_L = dispatcher.regroup(recv_RD, splits)
        out_ND = self._experts(x_ND, counts_L)
        with timer.phase("unpermute"):
            out_RD = dispatcher.ungroup(out_ND, order_R)
        with timer.phase("combine"):
            out_AD, _ = dispatcher.combine(out_RD, splits)
        return out_AD

    def _overlapped(
        self, x_TD: torch.Tensor | None, routes: list[Route], splits: list[Splits]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Every chunk's dispatch in flight at once; the shared experts (of x_TD, if given)
        run while the first one travels; each chunk's experts run as soon as its rows are
        in, and its combine is issued at once, to travel while the next chunk computes.
        Only the waits are timed, as "exposed" communication."""
        timer, dispatcher = self.timer, self.dispatcher
        pending = [
            dispatcher.dispatch(route, split, async_op=True) for route, split in zip(routes, splits)
        ]
        shared_TD = None if x_TD is None else self._shared(x_TD)
        combines = []
        for (recv_RD, work), split in zip(pending, splits):
            with timer.phase("exposed"):
                _wait(work)
            with timer.phase("permute"):
                x_ND, order_R, counts_L = dispatcher.regroup(recv_RD, split)
            out_ND = self._experts(x_ND, counts_L)
            with timer.phase("unpermute"):
                out_RD = dispatcher.ungroup(out_ND, order_R)
            combines.append(dispatcher.combine(out_RD, split, async_op=True))
        outputs = []
        for out_AD, work in combines:
            with timer.phase("exposed"):
                _wait(work)
            outputs.append(out_AD)
        return outputs, shared_TD

    def global_stats(self) -> LayerStats | None:
        """Load of the last forward over every rank of the group (a collective: every rank
        calls it; syncs the device)."""
        if self._last is None:
            return None
        expert_ids_TK, probs_TE = self._last
        kept_ids, dropped = self.kept_assignments()
        E = self.num_experts
        summed = torch.cat(
            [
                torch.bincount(kept_ids.flatten(), minlength=E).double(),
                torch.bincount(expert_ids_TK.flatten(), minlength=E).double(),
                probs_TE.double().sum(0),
                torch.tensor(
                    [dropped, expert_ids_TK.numel(), expert_ids_TK.shape[0]],
                    dtype=torch.float64,
                    device=probs_TE.device,
                ),
                torch.special.entr(probs_TE.double()).sum().view(1),  # router entropy
            ]
        )
        dist.all_reduce(summed, group=self.dispatcher.group)
        kept_E, all_E, probs_sum_E = summed[:E], summed[E : 2 * E], summed[2 * E : 3 * E]
        dropped_all, slots, tokens, entropy_all = summed[3 * E :].tolist()
        # Switch aux loss over the whole batch: E x sum_e (slots to e / slots) x mean prob.
        aux_loss = E * float((all_E / max(slots, 1) * probs_sum_E / max(tokens, 1)).sum())
        return LayerStats(
            tokens_per_expert=[int(n) for n in kept_E.tolist()],
            demand_per_expert=[int(n) for n in all_E.tolist()],
            dropped_slots=int(dropped_all),
            total_slots=int(slots),
            aux_loss=aux_loss,
            experts_per_token=slots / tokens if tokens else float("nan"),
            router_entropy=entropy_all / tokens if tokens else float("nan"),
        )

    def traffic(self) -> Traffic:
        """What this rank sent and received in the last forward."""
        return self.dispatcher.traffic()


def _wait(work: dist.Work | None) -> None:
    if work is not None:
        work.wait()
