"""`dense`: a dense SwiGLU FFN with the same active parameters per token as the MoE layer
(width top_k x ffn, plus the shared experts): the baseline people weigh MoE against.

Its weights are the first top_k experts' weights side by side, so it is a different
function from the MoE layer (a variant): its distance from it is `fidelity_err`.
"""

from __future__ import annotations

import torch
from torch import nn

from moebench.case import Case
from moebench.layer import swiglu
from moebench.measure.counters import ParamCounts
from moebench.measure.phases import NULL_TIMER, Timer
from moebench.registry import register
from moebench.weights import ExpertWeights


class DenseFFN(nn.Module):
    """Not a MoELayer: it marks its one phase itself (the phase API of
    moebench.measure.phases), as a plugin's own module would."""

    timer: Timer = NULL_TIMER

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__()
        k = weights.shape.top_k
        gate = [weights.w_gate_EDF[e] for e in range(k)]
        up = [weights.w_up_EDF[e] for e in range(k)]
        down = [weights.w_down_EFD[e] for e in range(k)]
        if weights.w_shared_gate_DS is not None:
            gate.append(weights.w_shared_gate_DS)
            up.append(weights.w_shared_up_DS)
            down.append(weights.w_shared_down_SD)
        self.w_gate_DF = nn.Parameter(torch.cat(gate, dim=1))
        self.w_up_DF = nn.Parameter(torch.cat(up, dim=1))
        self.w_down_FD = nn.Parameter(torch.cat(down, dim=0))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with self.timer.phase("expert"):
            return swiglu(x_TD, self.w_gate_DF, self.w_up_DF, self.w_down_FD)

    def own_param_counts(self) -> ParamCounts:
        """The whole layer (it routes nothing): every parameter used by every token."""
        total = sum(p.numel() for p in self.parameters())
        return ParamCounts(total=total, active=total, touched=total, router=0)


@register(
    "dense",
    family="dense",
    description="dense SwiGLU FFN of width top_k x ffn (+ shared): the no-MoE baseline",
    exact=False,
    dtypes=("float32", "bfloat16", "float16", "float64"),
)
def build(weights: ExpertWeights, case: Case) -> DenseFFN:
    return DenseFFN(weights, case)
