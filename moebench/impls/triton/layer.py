"""The fused layer: moebench's Router, then alignment and two fused Triton GEMMs.

Shape legend: T tokens, D hidden, F expert width, E routed experts, K top_k,
A = T x K assignments, P padded sorted rows.

The layer keeps gate and up stacked in one E x 2F x D parameter (K-major, as Hugging
Face's gate_up_proj and vLLM's w13 are) and the down projection as the weight set holds
it, E x F x D (N-major). Measured on an H200 (NOTES.md, version 6), the gate_up kernel
is 5-10% faster at large token counts from K-major weights and the down kernel 8-17%
slower, so each GEMM gets the layout it runs fastest on. The forward reads both halves
of gate|up from one tensor, and the backward takes dx and the weight gradient of both
projections in one grouped GEMM each.

Forward (no device-to-host sync): align (align.py) -> gate_up kernel (gathered token
loads, SwiGLU epilogue) -> down kernel (routing weight in the epilogue, rows scattered to
their assignments) -> sum over the K slots of each token (`token_sum_kernel`). A single
token at inference skips the alignment: one row block per assignment (its K experts are
distinct, so each expert's weights are still read once). Training keeps the gate and up
pre-activations and the SwiGLU output per padded row; the backward (backward.py) runs
each GEMM over that layout as a Triton kernel or torch's grouped GEMM, whichever the
tuner found faster (dh and dx: the down kernel without its scatter; the weight gradients:
weight_grad.py), with Triton kernels between them (the SwiGLU backward, the per-token
sums of dx); nothing recomputed. Calls of at most 64 tokens launch their kernels with
programmatic dependent launch on Hopper (`moebench.dependent_launch`): each starts under
its predecessor's tail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from moebench import dependent_launch
from moebench.case import Case
from moebench.env import (
    GLUON_WS_SWITCH,
    MERGE_TAIL_SWITCH,
    SHARED_STREAM_SWITCH,
    layer_switch_on,
    switch_on,
)
from moebench.impls.triton import kernels, merge_tail, tma, tuning
from moebench.impls.triton.align import align_to_blocks, per_assignment_blocks
from moebench.impls.triton.backward import Saved, fused_backward, token_sum
from moebench.layer import MoELayer
from moebench.measure.graph import graphed_step
from moebench.measure.phases import NULL_TIMER, Timer
from moebench.weights import ExpertWeights

# The kernels each forward tuning's choice depends on (`tuning.code_fingerprint`): a
# change to them, or a line moved above them in their file, tunes again, and leaves the
# shipped choices (tuned/) unmatched (tests/test_shipped_tuning.py checks those).
POINTER_CODE = {"gate_up": (kernels.gate_up_kernel,), "down": (kernels.down_kernel,)}
TMA_CODE = {
    "gate_up": (tma.gather_rows_kernel, tma.gate_up_tma_kernel, tma.gate_up_persistent_kernel),
    "down": (tma.down_tma_kernel, tma.down_persistent_kernel),
}
BLOCK_M_CODE = (kernels.gate_up_kernel, kernels.down_kernel, *tma.KERNELS)
# The most tokens a call runs its shared experts beside the routed ones in (NOTES.md,
# version 42): at 1024 and 8192 tokens the routed GEMMs' programs hold every
# multiprocessor, and shared GEMMs beside them only delay those programs.
SHARED_STREAM_TOKENS = 64


def races_gluon(with_tma: bool, x_TD: torch.Tensor) -> bool:
    """Whether the down GEMM races gluon_down.py's kernels and inference's gate_up
    gluon_gate_up.py's: where the TMA tiles race, on Hopper, for 16-bit inputs, unless
    turned off (`$MOEBENCH_GLUON_WS=0`, `env.GLUON_WS_SWITCH`; on by default since
    triton/NOTES.md's version 31). A Triton without Gluon races without them, unless
    they were asked for (`=1`): that is an error that says what to install."""
    if not with_tma or not layer_switch_on(GLUON_WS_SWITCH):
        return False
    try:
        from moebench.impls.triton import gluon_common
    except ImportError as exc:  # Gluon is Triton 3.4's and later
        if not switch_on(GLUON_WS_SWITCH):
            return False
        raise ImportError(
            f"{GLUON_WS_SWITCH}=1 races Gluon kernels, which this Triton lacks"
            f" ({exc}): pip install 'triton>=3.6', or unset {GLUON_WS_SWITCH}"
        ) from exc
    return gluon_common.available(x_TD.device) and gluon_common.takes(x_TD.dtype)


def races_merged_tails(with_tma: bool) -> bool:
    """Whether both GEMMs race merge_tail.py's tiles: where the TMA tiles race, unless
    turned off (`$MOEBENCH_MERGE_TAIL=0`, `env.MERGE_TAIL_SWITCH`; on by default since
    triton/NOTES.md's version 31)."""
    return with_tma and layer_switch_on(MERGE_TAIL_SWITCH)


def gemm_code(
    name: str, with_tma: bool, with_gluon: bool = False, with_merged: bool = False
) -> tuple:
    """The kernels whose code a choice for the forward's `name` GEMM depends on: the
    pointer kernel's, and the TMA kernels' where their tiles race (`with_tma`), so that
    an edit of a TMA kernel leaves the choices made without them (decode) matched; the
    GEMM's Gluon kernels where they race (`with_gluon`), the merged-tail tiles where they
    race (`with_merged`)."""
    code = POINTER_CODE[name] + (TMA_CODE[name] if with_tma else ())
    if with_gluon:
        code += _gluon_gemm(name).KERNELS
    if with_merged:
        code += merge_tail.KERNELS[name]
    return code


def _gluon_gemm(name: str) -> ModuleType:
    """The module of the forward's `name` GEMM in Gluon (imported only where it races)."""
    if name == "down":
        from moebench.impls.triton import gluon_down

        return gluon_down
    from moebench.impls.triton import gluon_gate_up

    return gluon_gate_up


def gemm_candidates(
    name: str,
    block_m: int,
    D: int,
    F: int,
    element_bytes: int,
    with_tma: bool,
    with_gluon: bool = False,
    with_merged: bool = False,
) -> list[dict]:
    """The configs the forward's `name` GEMM ("gate_up" or "down") races at `block_m`
    for hidden D and expert width F: the pointer kernel's, TMA tiles `with_tma`, its
    Gluon kernels `with_gluon` (inference's gate_up only) and the merged-tail tiles
    `with_merged`."""
    configs = tuning.candidates(name, block_m)
    if with_tma:
        configs += tma.candidates(name, block_m, D, F, element_bytes)
    if with_gluon:
        configs += _gluon_gemm(name).candidates(block_m, D, F, element_bytes)
    if with_merged:
        configs += merge_tail.candidates(name, block_m, D, F, element_bytes)
    return configs


def shipped_fingerprints(
    kind: str, block_m: int, D: int, F: int, tokens: int, element_bytes: int = 2
) -> list[str]:
    """Every fingerprint a choice for the forward GEMM key `kind` ("gate_up",
    "gate_up_train" or "down") at `tokens` and `block_m` may carry and still be taken:
    made with the Gluon and merged-tail races in any of their states (each may be turned
    off) and timed from a CUDA graph by one pass or with the run-off; today's defaults
    first. The TMA tiles (and with them the other two races) are taken to race past 64
    tokens, where dependent launch stops."""
    name = "gate_up" if kind.startswith("gate_up") else "down"
    with_tma = tokens > 64
    switch_states = (True, False) if with_tma else (False,)
    races = dict.fromkeys(  # (a key's race may be the same in two states: once)
        gemm_race(kind, with_tma, with_gluon, with_merged)
        for with_merged in switch_states
        for with_gluon in switch_states
    )
    fingerprints = []
    for race in races:
        configs = gemm_candidates(name, block_m, D, F, element_bytes, *race)
        code = gemm_code(name, *race)
        for runoff in (True, False):
            timed_by = tuning.timing_way(graphed=True, runoff=runoff)
            fingerprints.append(tuning.code_fingerprint(code, configs, timed_by))
    return fingerprints


def gemm_race(
    key: str, with_tma: bool, with_gluon: bool, with_merged: bool
) -> tuple[bool, bool, bool]:
    """(TMA tiles, Gluon kernels, merged-tail tiles) in the race of the forward GEMM key
    `key` ("gate_up", "gate_up_train" or "down"), given the layer's states: training's
    gate_up stores the pre-activations, which the Gluon one does not, so it races none."""
    return with_tma, with_gluon and key != "gate_up_train", with_merged


def launch_gate_up(
    config: dict,
    x_TD: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    h_PF: torch.Tensor,
    alignment,
    top_k: int,
    pre_activations: tuple[torch.Tensor, torch.Tensor] | None = None,
    pdl: bool = False,
) -> None:
    """The forward's gate_up GEMM through the kernel `config` names: a Gluon one
    (`GLUON_WS`, inference only), a TMA tile (`TMA`) or the pointer kernel (`pdl` as
    there), either's merged-tail kernel with `MERGE_TAIL`."""
    merged_tma, merged_pointer = merge_tail.KERNELS["gate_up"]
    merged = config.get("MERGE_TAIL")
    if config.get("GLUON_WS"):
        from moebench.impls.triton import gluon_gate_up

        assert pre_activations is None, "the Gluon gate_up stores no pre-activations"
        programs_max = tma.multiprocessors(h_PF.device)
        gluon_gate_up.launch_gate_up(
            x_TD, w_gate_up_E2FD, h_PF, alignment, top_k, config, programs_max
        )
    elif config.get("TMA"):
        tma.launch_gate_up(
            x_TD, w_gate_up_E2FD, h_PF, alignment, top_k, config, pre_activations,
            merged_tma if merged else None,
        )  # fmt: skip
    else:  # E x D x F views of the K-major storage: the kernel takes any strides
        F = h_PF.shape[1]
        w_gate_EDF = w_gate_up_E2FD[:, :F].transpose(1, 2)
        w_up_EDF = w_gate_up_E2FD[:, F:].transpose(1, 2)
        kernels.launch_gate_up(
            x_TD, w_gate_EDF, w_up_EDF, h_PF, alignment, top_k, config, pre_activations, pdl,
            merged_pointer if merged else None,
        )  # fmt: skip


def launch_down(
    config: dict,
    h_PF: torch.Tensor,
    w_down_EFD: torch.Tensor,
    gate_weight_A: torch.Tensor,
    out_AD: torch.Tensor,
    alignment,
    pdl: bool = False,
) -> None:
    """The forward's down GEMM through the kernel `config` names: a Gluon one
    (`GLUON_WS`), a merged-tail tile (`MERGE_TAIL`), a TMA tile (`TMA`) or the pointer
    kernel (`pdl` as there)."""
    if config.get("GLUON_WS"):
        from moebench.impls.triton import gluon_down

        programs_max = tma.multiprocessors(h_PF.device)
        gluon_down.launch_down(
            h_PF, w_down_EFD, gate_weight_A, out_AD, alignment, config, programs_max
        )
    elif config.get("TMA"):
        merged = merge_tail.KERNELS["down"][0] if config.get("MERGE_TAIL") else None
        tma.launch_down(h_PF, w_down_EFD, gate_weight_A, out_AD, alignment, config, merged)
    else:
        kernels.launch_down(h_PF, w_down_EFD, gate_weight_A, out_AD, alignment, config, pdl)


@dataclass(frozen=True)
class ForwardPlan:
    """What `fused_experts` decides before it launches, the same for every call of one
    signature (`plans`): the rows per block and both GEMMs' configs."""

    block_m: int
    gate_up: dict
    down: dict


def fused_experts(
    x_TD: torch.Tensor,
    gate_weights_TK: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    w_down_EFD: torch.Tensor,
    keep_for_backward: bool = False,
    timer: Timer = NULL_TIMER,
    block_m: int | None = None,
    plans: dict[tuple, ForwardPlan] | None = None,
) -> tuple[torch.Tensor, Saved | None]:
    """(sum_k gate_weights_TK[t, k] * SwiGLU_{expert_ids_TK[t, k]}(x_TD[t]) as T x D,
    what the backward needs if `keep_for_backward` else None), with gate and up stacked
    in w_gate_up_E2FD (rows [0, F) gate, [F, 2F) up) and the down projection in
    w_down_EFD. `timer` marks the phases (moebench.measure.phases): alignment is permute,
    the two fused GEMMs (gathered loads, weighted scatter in the epilogue) expert, the sum
    over slots unpermute. `block_m` (rows per block of the sorted token list) defaults to
    the tuner's choice (`_block_m`).

    `plans` (a layer's own dict): the first call of a signature (token count, top_k,
    dtype, device, training or not, `block_m`, dependent launch on or off, the weights'
    storage) keeps its decisions there as a `ForwardPlan`, and later calls take them
    instead of building the tuner's keys and looking them up, the weights' layout and
    what the TMA tiles take: host time, which bounds an un-graphed call of a few hundred
    tokens. The switches read then ($MOEBENCH_GLUON_WS, $MOEBENCH_MERGE_TAIL) hold for the
    plan's life."""
    T, D = x_TD.shape
    E, F, _ = w_down_EFD.shape
    K = expert_ids_TK.shape[1]
    x_TD = x_TD.contiguous()
    pdl = dependent_launch.for_tokens(x_TD.device, T)
    plan_key = (
        T, K, x_TD.dtype, x_TD.device, keep_for_backward, block_m, pdl,
        w_gate_up_E2FD.data_ptr(), w_down_EFD.data_ptr(),
    )  # fmt: skip
    plan = None if plans is None else plans.get(plan_key)
    per_assignment = T == 1 and not keep_for_backward
    if plan is not None:
        block_m = plan.block_m
    else:
        # gate and up as E x D x F weights: the layout of both halves' views
        gate_up_layout = tuning.weight_layout(w_gate_up_E2FD.transpose(1, 2))
        if block_m is None and (keep_for_backward or per_assignment):  # not raced
            block_m = tuning.block_m_for(T, K, E)
        elif block_m is None:
            block_m = _block_m(
                x_TD, gate_weights_TK, expert_ids_TK, w_gate_up_E2FD, w_down_EFD,
                gate_up_layout,
            )  # fmt: skip
    with timer.phase("permute"):
        if per_assignment:
            alignment = per_assignment_blocks(expert_ids_TK, block_m)
        else:
            alignment = align_to_blocks(expert_ids_TK, E, block_m, pdl)
    rows = alignment.max_rows

    def buffer(width: int) -> torch.Tensor:
        return torch.empty(rows, width, device=x_TD.device, dtype=x_TD.dtype)

    h_PF = buffer(F)
    pre_activations = (buffer(F), buffer(F)) if keep_for_backward else None
    out_AD = torch.empty(T * K, D, device=x_TD.device, dtype=x_TD.dtype)
    gate_weight_A = gate_weights_TK.to(x_TD.dtype).contiguous().view(-1)

    def gate_up(config: dict) -> None:
        launch_gate_up(config, x_TD, w_gate_up_E2FD, h_PF, alignment, K, pre_activations, pdl)

    def down(config: dict) -> None:
        launch_down(config, h_PF, w_down_EFD, gate_weight_A, out_AD, alignment, pdl)

    with timer.phase("expert"):
        if plan is not None:
            gate_up(plan.gate_up)
            down(plan.down)
        else:
            configs = _tuned_gemms(
                x_TD, w_gate_up_E2FD, w_down_EFD, alignment, K, keep_for_backward, pdl,
                gate_up_layout, gate_up, down,
            )  # fmt: skip
            if plans is not None:
                plans[plan_key] = ForwardPlan(block_m, *configs)
    with timer.phase("unpermute"):
        y_TD = out_AD if K == 1 else token_sum(out_AD, K, pdl=pdl)
    saved = None
    if pre_activations is not None:
        saved = Saved(alignment, *pre_activations, h_PF, K)
    return y_TD, saved


def _tuned_gemms(
    x_TD: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    w_down_EFD: torch.Tensor,
    alignment,
    K: int,
    keep_for_backward: bool,
    pdl: bool,
    gate_up_layout: str,
    gate_up: Callable[[dict], None],
    down: Callable[[dict], None],
) -> tuple[dict, dict]:
    """Both GEMMs launched with the tuner's configs (tuned first if need be), which
    are returned: (gate_up's, down's)."""
    F, D = w_down_EFD.shape[1:]
    block_m = alignment.block_m
    # TMA tiles (tma.py) race the pointer kernels' on Hopper where a row list is walked
    # without dependent launch (64- and 128-row blocks: the compute-bound calls)
    with_tma = not (alignment.per_assignment or pdl) and tma.takes(w_gate_up_E2FD, w_down_EFD)
    with_gluon = races_gluon(with_tma, x_TD)
    with_merged = races_merged_tails(with_tma)
    # Tuned in order: the down kernel's trials read the h that gate_up wrote. Training's
    # gate_up also stores the pre-activations: a different kernel, tuned apart.
    gate_up_key = "gate_up_train" if keep_for_backward else "gate_up"
    steps = (
        ("gate_up", gate_up_key, gate_up_layout, gate_up),
        ("down", "down", tuning.weight_layout(w_down_EFD), down),
    )
    configs = []
    for name, key, layout, launch in steps:
        race = gemm_race(key, with_tma, with_gluon, with_merged)
        config = tuning.TUNER.choose(
            x_TD.device,
            tuning.key(key, x_TD, w_down_EFD, K, layout, block_m),
            lambda name=name, race=race: gemm_candidates(
                name, block_m, D, F, x_TD.element_size(), *race
            ),
            launch,
            code=gemm_code(name, *race),
            graphed=True,  # kernels of a few us: the graph times the GPU, not the host
            precompile=True,
        )
        launch(config)
        configs.append(config)
    return configs[0], configs[1]


def _block_m(
    x_TD: torch.Tensor,
    gate_weights_TK: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    w_down_EFD: torch.Tensor,
    gate_up_layout: str,
) -> int:
    """The forward's rows per block (`gate_up_layout`: `tuning.weight_layout` of the gate
    and up weights as E x D x F): where `tuning.block_m_choices` offers more than one,
    the fastest whole forward (alignment, both GEMMs with their own tuned tiles, token
    sum) of them, tuned once per shape and token bucket. Training keeps `block_m_for`:
    its backward runs on the forward's blocks, and the race times the forward alone.

    Each forward is raced as a CUDA graph. Launched one kernel at a time, a forward of
    1024 tokens of a small layer is bound by the host's launches, and the race picked
    block sizes whose kernels were the slower ones (NOTES.md, version 11)."""
    T, K, E = x_TD.shape[0], expert_ids_TK.shape[1], w_down_EFD.shape[0]
    choices = tuning.block_m_choices(T, K, E)
    if len(choices) == 1:
        return choices[0]
    graphed: dict[int, Callable[[int], object]] = {}

    def forward(config: dict) -> None:
        block_m = config["BLOCK_M"]
        if block_m not in graphed:  # its warm-up tunes this block size's tiles
            graphed[block_m] = graphed_step(
                lambda _: fused_experts(
                    x_TD, gate_weights_TK, expert_ids_TK, w_gate_up_E2FD, w_down_EFD,
                    block_m=block_m,
                ),
                1, x_TD.device, "triton",
            )  # fmt: skip
        graphed[block_m](0)

    config = tuning.TUNER.choose(
        x_TD.device,
        tuning.key("block_m", x_TD, w_down_EFD, K, gate_up_layout),
        lambda: [{"BLOCK_M": block_m} for block_m in choices],
        forward,
        code=BLOCK_M_CODE,
    )
    return config["BLOCK_M"]


class _FusedExpertsFunction(torch.autograd.Function):
    """The fused forward, keeping its activations; the grouped-GEMM backward."""

    @staticmethod
    def forward(ctx, x_TD, gate_weights_TK, expert_ids_TK, w_gate_up, w_down, plans):
        y_TD, ctx.fused = fused_experts(
            x_TD, gate_weights_TK, expert_ids_TK, w_gate_up, w_down, keep_for_backward=True,
            plans=plans,
        )  # fmt: skip
        ctx.save_for_backward(x_TD, gate_weights_TK, w_gate_up, w_down)
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):
        x_TD, gate_weights_TK, w_gate_up, w_down = ctx.saved_tensors
        dx, dgate, dw_gate_up, dw_down = fused_backward(
            ctx.fused, grad_y_TD, x_TD, gate_weights_TK, w_gate_up, w_down
        )
        ctx.fused = None  # free the activations now, not when the graph goes
        return dx, dgate, None, dw_gate_up, dw_down, None


class TritonMoE(MoELayer):
    """Dropless top-k MoE on fused Triton kernels."""

    impl_detail = (
        "triton fused fwd (gate|up one tensor); bwd: triton or grouped_mm per GEMM (tuned),"
        " triton SwiGLU, token-sum"
    )

    def __init__(self, weights: ExpertWeights, case: Case):
        super().__init__(weights, case)
        # gate|up: a copy in the layer's own layout (the weight set stays as it is for the
        # other layers); the check finds both halves in it by value, transposed
        # (check.weight_grads). The down projection is the weight set's, not copied.
        gate_up_E2FD = torch.cat(
            [weights.w_gate_EDF.transpose(1, 2), weights.w_up_EDF.transpose(1, 2)], dim=1
        )  # one copy, written in the K-major layout
        self.w_gate_up_E2FD = torch.nn.Parameter(gate_up_E2FD)
        self.w_down_EFD = torch.nn.Parameter(weights.w_down_EFD)
        self._plans: dict[tuple, ForwardPlan] = {}  # `fused_experts`' forward plans

    def overlaps_shared(self, x_TD: torch.Tensor) -> bool:
        """The shared experts on a side stream in calls of at most SHARED_STREAM_TOKENS
        tokens, unless `$MOEBENCH_SHARED_STREAM=0` (`env.SHARED_STREAM_SWITCH`, read at
        each call, so that a graph captures its state then)."""
        return x_TD.shape[0] <= SHARED_STREAM_TOKENS and layer_switch_on(SHARED_STREAM_SWITCH)

    def routed(
        self, x_TD: torch.Tensor, gate_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        weights = (self.w_gate_up_E2FD, self.w_down_EFD)
        wants_grad = torch.is_grad_enabled() and (
            x_TD.requires_grad
            or gate_weights_TK.requires_grad
            or any(w.requires_grad for w in weights)
        )
        if wants_grad:
            with self.timer.phase("expert"):  # one autograd op: align, GEMMs and sum
                return _FusedExpertsFunction.apply(
                    x_TD, gate_weights_TK, expert_ids_TK, *weights, self._plans
                )
        return fused_experts(
            x_TD, gate_weights_TK, expert_ids_TK, *weights, timer=self.timer, plans=self._plans
        )[0]
