"""The all-to-all token dispatcher: rows of (token, slot) assignments go to the rank that
holds their expert and come back, with `torch.distributed.all_to_all_single` and variable
splits (torchtitan's / Megatron's alltoall dispatcher).

Shape legend: T tokens on this rank, D hidden, E experts in all, W ranks, L = E / W experts
per rank (rank w holds experts w*L .. w*L + L - 1), K top_k, A = T x K assignments of this
rank, C chunks of one step, R rows received by this rank, N rows of one local expert group.

One step, per chunk of this rank's tokens:

1. `permute`: sort the assignments by expert (so by destination rank too), dropped ones last;
   gather their token rows into x_AD.
2. `exchange_counts`: one all-to-all of the per-expert counts (int64, L per chunk per peer),
   then one host sync so the split sizes are known.
3. `dispatch`: the token all-to-all; rows arrive ordered by source rank, then local expert.
4. `regroup`: reorder them by local expert (a no-op when W or L is 1), ready for the grouped
   GEMM; `ungroup` undoes it after the experts.
5. `combine`: the all-to-all back, splits swapped; rows return in their sorted order.
6. `unpermute`: scale by the gate weight and scatter-add into the rows' tokens.

Bytes on the wire (`Traffic`): a row that stays on its own rank is a local copy and is not
counted; every other row costs D x element size on the way out and again on the way back;
the counts cost 8 bytes x L x C per peer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

COUNT_BYTES = 8  # int64 per count


@dataclass
class Route:
    """One chunk's assignments on the sending rank, sorted by expert; dropped ones last."""

    x_AD: torch.Tensor
    token_A: torch.Tensor  # index of each row's token in this rank's batch
    gate_A: torch.Tensor
    counts_E: torch.Tensor  # kept rows per expert (int64, on the device)


@dataclass
class Splits:
    """The sizes of one chunk's exchange, known after the counts all-to-all."""

    send_W: list[int]  # rows this rank sends to each rank
    recv_W: list[int]  # rows it receives from each rank
    recv_counts_WL: torch.Tensor  # rows received from each rank for each local expert

    @property
    def sent(self) -> int:
        return sum(self.send_W)

    @property
    def received(self) -> int:
        return sum(self.recv_W)


@dataclass(frozen=True)
class Traffic:
    """What one rank moved in its last step (summed over its chunks)."""

    rows_sent_remote: int  # rows dispatched to other ranks (combine returns as many)
    rows_received: int  # rows its experts computed, its own included
    count_bytes_sent: int  # counts sent to other ranks


class AllToAllDispatcher:
    """Moves rows between the ranks of `group` for experts sharded evenly over them."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.local_experts = num_experts // self.world_size
        self.last_splits: list[Splits] = []

    def permute(
        self,
        x_TD: torch.Tensor,
        gate_TK: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        keep_TK: torch.Tensor | None,
        token_offset: int = 0,
    ) -> Route:
        """Sort one chunk's assignments by expert; `keep_TK` (bool) marks the ones not
        dropped; token indices are offset by `token_offset` (the chunk's first token)."""
        K = expert_ids_TK.shape[1]
        expert_ids_A = expert_ids_TK.flatten()
        if keep_TK is not None:  # dropped assignments sort last, past every expert
            expert_ids_A = torch.where(keep_TK.flatten(), expert_ids_A, self.num_experts)
        order_A = torch.argsort(expert_ids_A, stable=True)
        counts_E = torch.bincount(expert_ids_A, minlength=self.num_experts + 1)[: self.num_experts]
        token_A = order_A // K
        return Route(
            x_AD=x_TD[token_A],
            token_A=token_A + token_offset,
            gate_A=gate_TK.flatten()[order_A],
            counts_E=counts_E,
        )

    def exchange_counts(self, routes: list[Route]) -> list[Splits]:
        """All chunks' counts in one all-to-all, then one host sync for the split sizes."""
        W, L, C = self.world_size, self.local_experts, len(routes)
        send_CWL = torch.stack([route.counts_E for route in routes]).view(C, W, L)
        send_WCL = send_CWL.transpose(0, 1).contiguous()
        recv_WCL = torch.empty_like(send_WCL)
        dist.all_to_all_single(recv_WCL, send_WCL, group=self.group)
        sizes = torch.stack([send_WCL.sum(2), recv_WCL.sum(2)]).tolist()  # 2 x W x C
        splits = [
            Splits(
                send_W=[sizes[0][w][c] for w in range(W)],
                recv_W=[sizes[1][w][c] for w in range(W)],
                recv_counts_WL=recv_WCL[:, c],
            )
            for c in range(C)
        ]
        self.last_splits = splits
        return splits

    def dispatch(
        self, route: Route, splits: Splits, async_op: bool = False
    ) -> tuple[torch.Tensor, dist.Work | None]:
        """Send the kept rows to their experts' ranks: (received rows, handle or None)."""
        recv_RD = route.x_AD.new_empty(splits.received, route.x_AD.shape[1])
        work = dist.all_to_all_single(
            recv_RD,
            route.x_AD[: splits.sent],
            output_split_sizes=splits.recv_W,
            input_split_sizes=splits.send_W,
            group=self.group,
            async_op=async_op,
        )
        return recv_RD, work

    def regroup(
        self, recv_RD: torch.Tensor, splits: Splits
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Received rows ordered by local expert: (rows, the reordering or None, rows per
        local expert)."""
        counts_L = splits.recv_counts_WL.sum(0)
        if self.world_size == 1 or self.local_experts == 1:
            return recv_RD, None, counts_L  # already grouped by local expert
        local_ids_WL = torch.arange(self.local_experts, device=recv_RD.device).repeat(
            self.world_size
        )
        expert_of_R = torch.repeat_interleave(
            local_ids_WL, splits.recv_counts_WL.flatten(), output_size=splits.received
        )
        order_R = torch.argsort(expert_of_R, stable=True)
        return recv_RD[order_R], order_R, counts_L

    @staticmethod
    def ungroup(out_RD: torch.Tensor, order_R: torch.Tensor | None) -> torch.Tensor:
        """Undo `regroup`: rows back in the order they were received."""
        if order_R is None:
            return out_RD
        restored_RD = torch.empty_like(out_RD)
        restored_RD[order_R] = out_RD
        return restored_RD

    def combine(
        self, out_RD: torch.Tensor, splits: Splits, async_op: bool = False
    ) -> tuple[torch.Tensor, dist.Work | None]:
        """Send the experts' outputs back to the rows' ranks: (rows in sorted order, handle)."""
        out_AD = out_RD.new_empty(splits.sent, out_RD.shape[1])
        work = dist.all_to_all_single(
            out_AD,
            out_RD,
            output_split_sizes=splits.send_W,
            input_split_sizes=splits.recv_W,
            group=self.group,
            async_op=async_op,
        )
        return out_AD, work

    @staticmethod
    def unpermute(y_TD: torch.Tensor, route: Route, out_AD: torch.Tensor) -> None:
        """Add the gate-weighted rows into their tokens (in place)."""
        kept = out_AD.shape[0]
        y_TD.index_add_(0, route.token_A[:kept], out_AD * route.gate_A[:kept, None])

    def traffic(self) -> Traffic:
        """Rows and count bytes of the last step (host numbers, no device sync)."""
        peers = self.world_size - 1
        remote = sum(sum(s.send_W) - s.send_W[self.rank] for s in self.last_splits)
        return Traffic(
            rows_sent_remote=remote,
            rows_received=sum(s.received for s in self.last_splits),
            count_bytes_sent=peers * self.local_experts * len(self.last_splits) * COUNT_BYTES,
        )
