"""`ep-dropless`, `ep-capacity`, `ep-overlap`: expert parallelism on torch.distributed.

The routed experts are sharded over the ranks of a process group (num_experts / world_size
each); the router and shared experts are replicated. Each rank routes its own slice of
the batch, sends every (token, slot) row to its expert's rank with an all-to-all of
variable splits (after an all-to-all of the counts), computes its local experts with the
`grouped` implementation's code, and gets the outputs back with a second all-to-all. See
`moebench.distributed` for the layer, the dispatcher and how the ranks are launched;
`moebench run` starts the ranks itself (`--nproc N`) or runs under `torchrun`.

A layer is built on the group of `moebench.distributed.group.use_group`, else the default
process group, so it also works in a script of one's own:

    torch.distributed.init_process_group("gloo")        # under torchrun
    layer = registry.get("ep-dropless").build(weights, case)   # case.world_size == W
    y_TD = layer(x_TD)   # x_TD: this rank's tokens; y_TD: their outputs

Shape legend: T tokens, D hidden.
"""

from __future__ import annotations

from moebench.case import Case
from moebench.distributed.group import EP_FAMILY, current_group
from moebench.distributed.layer import ExpertParallelMoE
from moebench.registry import register
from moebench.weights import ExpertWeights

DEFAULT_CHUNKS = 2


@register(
    "ep-dropless",
    family=EP_FAMILY,
    description="experts sharded over ranks; all-to-all dispatch/combine; grouped GEMM experts",
    modes=("forward",),
)
def build_dropless(weights: ExpertWeights, case: Case) -> ExpertParallelMoE:
    return ExpertParallelMoE(weights, case, current_group())


@register(
    "ep-capacity",
    family=EP_FAMILY,
    description="expert parallel with capacity_factor slots per expert per rank; overflow "
    "dropped before dispatch",
    exact=False,
    modes=("forward",),
)
def build_capacity(weights: ExpertWeights, case: Case) -> ExpertParallelMoE:
    return ExpertParallelMoE(
        weights, case, current_group(), capacity_factor=case.shape.capacity_factor
    )


@register(
    "ep-overlap",
    family=EP_FAMILY,
    description="dropless expert parallel in `chunks` chunks (option, default 2): a chunk's "
    "all-to-all overlaps another chunk's experts",
    modes=("forward",),
    options=("chunks",),
)
def build_overlap(weights: ExpertWeights, case: Case) -> ExpertParallelMoE:
    chunks = int(case.option("chunks", DEFAULT_CHUNKS))
    return ExpertParallelMoE(weights, case, current_group(), chunks=chunks, overlap=True)
