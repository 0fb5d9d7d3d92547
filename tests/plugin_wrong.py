"""Implementations that are wrong the way a kernel author's first try is wrong, loaded
with --plugin in the check tests: each must end as `mismatch`, never timed; and one that
is right within rounding (`test-jitter-later`), which must not.

Shape legend: T tokens, D hidden, K top_k.
"""

import torch

from moebench import register
from moebench.impls.grouped import GroupedMoE
from moebench.impls.moepp import MoEPPLayer, moepp_reference


class _DetachedRouter(GroupedMoE):
    """Right output, but no gradient reaches the router (a fused kernel whose backward
    forgot the gate weights)."""

    def routed(self, x_TD, gate_weights_TK, expert_ids_TK):
        return super().routed(x_TD, gate_weights_TK.detach(), expert_ids_TK)


@register("test-detached-router", family="test", description="router gets no gradient")
def build_detached_router(weights, case):
    return _DetachedRouter(weights, case)


ZEROED_TOKEN = 5


class _ZeroedToken(GroupedMoE):
    """One token's output is zero (an off-by-one at a tile edge): 1 of T tokens."""

    def forward(self, x_TD):
        y_TD = super().forward(x_TD)
        keep_T1 = torch.ones(y_TD.shape[0], 1, dtype=y_TD.dtype, device=y_TD.device)
        keep_T1[ZEROED_TOKEN] = 0
        return y_TD * keep_T1


@register("test-zeroed-token", family="test", description="one token's output is zero")
def build_zeroed_token(weights, case):
    return _ZeroedToken(weights, case)


class _WrongAfterFirstCall(GroupedMoE):
    """Right on its first call; from the second on, the last expert reads as zeros (a
    cache slot read before its copy landed)."""

    calls = 0

    def routed(self, x_TD, gate_weights_TK, expert_ids_TK):
        self.calls += 1
        if self.calls == 1:
            return super().routed(x_TD, gate_weights_TK, expert_ids_TK)
        unloaded_TK = (expert_ids_TK == self.num_experts - 1).to(gate_weights_TK.dtype)
        return super().routed(x_TD, gate_weights_TK * (1 - unloaded_TK), expert_ids_TK)


@register("test-wrong-later", family="test", description="right once, wrong afterwards")
def build_wrong_later(weights, case):
    return _WrongAfterFirstCall(weights, case)


class _RoutingKeptFromFirstCall(GroupedMoE):
    """Routes its first batch, then keeps that routing for every later batch of the same
    shape (a dispatch plan cached by shape, as for a CUDA graph): right on the batch it
    was first called with, wrong on any other."""

    plan = None

    def routed(self, x_TD, gate_weights_TK, expert_ids_TK):
        if self.plan is None or self.plan[0].shape != gate_weights_TK.shape:
            self.plan = (gate_weights_TK, expert_ids_TK)
        return super().routed(x_TD, *self.plan)


@register("test-routing-kept", family="test", description="first batch's routing, kept")
def build_routing_kept(weights, case):
    return _RoutingKeptFromFirstCall(weights, case)


class _InputAsScratch(GroupedMoE):
    """Right output, then x's buffer reused as scratch space (zeroed): the references
    computed after the call, and every later call, would see another batch."""

    def forward(self, x_TD):
        y_TD = super().forward(x_TD)
        x_TD.zero_()
        return y_TD


@register("test-input-scratch", family="test", description="writes into its input")
def build_input_scratch(weights, case):
    return _InputAsScratch(weights, case)


class _Float32Output(GroupedMoE):
    """Computes in the case's dtype and hands back float32 (an upcast epilogue)."""

    def forward(self, x_TD):
        return super().forward(x_TD).float()


@register("test-float32-output", family="test", description="returns float32")
def build_float32_output(weights, case):
    return _Float32Output(weights, case)


class _LastTokenLost(GroupedMoE):
    """One row short (a grid that rounds the token count down)."""

    def forward(self, x_TD):
        return super().forward(x_TD)[:-1]


@register("test-last-token-lost", family="test", description="one row short", exact=False)
def build_last_token_lost(weights, case):
    return _LastTokenLost(weights, case)


class _AccumulatedBackward(torch.autograd.Function):
    """Passes the output's gradient on times the number of backwards so far: a backward
    workspace added into and never cleared between steps."""

    @staticmethod
    def forward(ctx, y_TD, layer):
        ctx.layer = layer
        return y_TD.clone()

    @staticmethod
    def backward(ctx, grad_TD):
        ctx.layer.backwards += 1
        return grad_TD * ctx.layer.backwards, None


class _GradientsRightOnce(GroupedMoE):
    """Right forward; right gradients on the first training step, wrong on the later."""

    backwards = 0

    def forward(self, x_TD):
        return _AccumulatedBackward.apply(super().forward(x_TD), self)


@register("test-gradients-right-once", family="test", description="backward right once")
def build_gradients_right_once(weights, case):
    return _GradientsRightOnce(weights, case)


class _JitterAfterFirstCall(MoEPPLayer):
    """MoE++, right on every call within bfloat16's tolerance: from the second call on its
    output carries 1% noise, as another summation order's rounding would. Stacked, the
    next layer's router sees it (MoE++'s outputs dwarf their inputs), and near-tied
    choices flip against the first call's layer inputs."""

    calls = 0

    def forward_with_carry(self, x_TD, carry_TN):
        self.calls += 1
        y_TD, logits_TN = super().forward_with_carry(x_TD, carry_TN)
        if self.calls == 1:
            return y_TD, logits_TN
        noise = torch.randn(y_TD.shape, generator=torch.Generator().manual_seed(self.calls))
        return y_TD * (1 + 0.01 * noise.to(y_TD)), logits_TN


@register(
    "test-jitter-later",
    family="test",
    description="MoE++ within tolerance, jittering after its first call",
    exact=False,
    options=("zero_experts", "copy_experts", "const_experts"),
    reference=moepp_reference,
)
def build_jitter_later(weights, case):
    return _JitterAfterFirstCall(weights, case)
