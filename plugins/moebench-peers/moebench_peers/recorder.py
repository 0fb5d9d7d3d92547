"""`RoutingRecorder`: keeps the last forward's router logits and expert choices (references,
no copy, no sync) and turns them into moebench's `LayerStats` afterwards, for layers that
are not moebench `MoELayer`s.

Shape legend: T tokens, E routed experts, K top_k.
"""

from __future__ import annotations

import torch

from moebench.layer import LayerStats, routing_stats
from moebench.routing import switch_aux_loss


class RoutingRecorder:
    """Mixed into an adapter module; `record` in forward, `stats` after (syncs)."""

    num_experts: int
    scoring: str = "softmax"
    _routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def record(self, logits_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> None:
        self._routing = (logits_TE, expert_ids_TK)

    def stats(self) -> LayerStats | None:
        """Load of the last forward: tokens per expert and the Switch balancing loss over
        the router's score distribution (softmax, or sigmoid scores normalised per token)."""
        if self._routing is None:
            return None
        logits_TE, expert_ids_TK = (t.detach() for t in self._routing)
        if self.scoring == "softmax":
            probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE.float())
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        expert_ids_TK = expert_ids_TK.long()
        return routing_stats(
            expert_ids_TK,
            expert_ids_TK.shape[0],
            self.num_experts,
            probs_TE,
            aux_loss=float(switch_aux_loss(probs_TE, expert_ids_TK, self.num_experts)),
        )
