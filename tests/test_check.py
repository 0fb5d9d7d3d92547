"""The checks before and after timing (moebench.measure.check): wrong plugins of the kinds
a kernel author writes end as `mismatch` rows, never timed; right ones pass."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from moebench import registry
from moebench.impls.reference import ReferenceMoE
from moebench.layer import Stack
from moebench.measure import check
from moebench.plugins import import_plugin
from moebench.runner import run_cases
from moebench.store import read_run
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs
from tests.conftest import FAST_PLAN, tiny_case

WRONG = str(Path(__file__).with_name("plugin_wrong.py"))


def _run(cases, tmp_path) -> pd.DataFrame:
    import_plugin(WRONG)
    outcome = run_cases(
        cases, suite_name="t", plan=FAST_PLAN, timeout_s=120, out_root=tmp_path, isolate=False
    )
    return read_run(outcome.results_path).set_index("impl")


def test_wrong_plugins_are_mismatches_and_never_timed(tmp_path):
    frame = _run(
        [
            tiny_case("test-detached-router", mode="train"),
            tiny_case("test-zeroed-token", dtype="bfloat16", batch=1, seq_len=4096),
            tiny_case("test-wrong-later"),
            tiny_case("grouped", mode="train"),
            tiny_case("grouped", dtype="bfloat16", batch=1, seq_len=4096),
        ],
        tmp_path,
    )
    router = frame.loc["test-detached-router"]
    assert router["status"] == "mismatch"
    assert "gradient of w_router_DE" in router["error"] and "no gradient" in router["error"]
    token = frame.loc["test-zeroed-token"]
    assert token["status"] == "mismatch" and "token 5 of 4096" in token["error"]
    assert token["rel_err"] < check.TOLERANCE["bfloat16"]  # the global norm alone passes it
    assert token["max_token_err"] == pytest.approx(1.0)
    later = frame.loc["test-wrong-later"]
    assert later["status"] == "mismatch" and "drifted during timing" in later["error"]
    for impl in ("test-detached-router", "test-zeroed-token", "test-wrong-later"):
        assert pd.isna(frame.loc[impl, "latency_ms"]), impl
    good = frame.loc["grouped"]
    assert set(good["status"]) == {"ok"}
    assert (good["max_token_err"] <= good["tolerance"] * 10).all()
    train = good[good["mode"] == "train"].iloc[0]
    assert train["grad_err"] <= check.GRAD_TOLERANCE["float32"]
    assert train["grad_check"].startswith("ok")


def test_a_layer_right_only_on_its_first_input_is_a_mismatch(tmp_path):
    """A layer that keeps its first batch's routing is right on that batch, where the
    first-call and drift checks look, whichever batches the timed calls rotate through:
    an input no call has seen, checked after timing, fails it."""
    frame = _run(
        [
            tiny_case("test-routing-kept"),
            tiny_case("test-routing-kept", batch=1, seq_len=4096),  # one timed batch
            tiny_case("grouped"),
        ],
        tmp_path,
    )
    kept = frame.loc["test-routing-kept"]
    assert set(kept["status"]) == {"mismatch"}
    assert all(error.startswith("wrong on an input it was not timed on") for error in kept["error"])
    assert kept["latency_ms"].isna().all()
    assert frame.loc["grouped", "status"] == "ok"


def test_a_layer_that_writes_into_its_input_is_a_mismatch_and_spoils_no_other(tmp_path):
    """Run first for its shape, a layer zeroing its input after use had the shared
    reference computed on zeros: it passed, and the exact layers after it failed."""
    frame = _run([tiny_case("test-input-scratch"), tiny_case("grouped")], tmp_path)
    scratch = frame.loc["test-input-scratch"]
    assert scratch["status"] == "mismatch" and "wrote into its input x" in scratch["error"]
    assert scratch["rel_err"] < check.TOLERANCE["float32"]  # its output was right
    assert frame.loc["grouped", "status"] == "ok"


def test_an_output_of_another_shape_or_dtype_is_a_mismatch(tmp_path):
    """The output is the input's shape, dtype and device: a bfloat16 case answered in
    float32 passed the numbers; a variant one row short ended in a broadcasting error."""
    frame = _run(
        [tiny_case("test-float32-output", dtype="bfloat16"), tiny_case("test-last-token-lost")],
        tmp_path,
    )
    upcast = frame.loc["test-float32-output"]
    assert upcast["status"] == "mismatch"
    assert upcast["error"] == (
        "its output is (16, 32) float32 on cpu; a layer returns its input's shape, dtype "
        "and device: (16, 32) bfloat16 on cpu"
    )
    short = frame.loc["test-last-token-lost"]
    assert short["status"] == "mismatch" and short["error"].startswith("its output is (15, 32)")


def test_gradients_right_on_the_checked_step_alone_are_a_mismatch(tmp_path):
    """A backward that accumulates into a workspace it never clears is right on the one
    step the gradient check sees; after timing, one more step is held to that one."""
    frame = _run(
        [tiny_case("test-gradients-right-once", mode="train"), tiny_case("grouped", mode="train")],
        tmp_path,
    )
    wrong = frame.loc["test-gradients-right-once"]
    assert wrong["grad_check"].startswith("ok")  # the checked step was right
    assert wrong["status"] == "mismatch" and pd.isna(wrong["latency_ms"])
    assert wrong["error"].startswith("gradients drifted during timing: gradient of ")
    assert "against the checked step's" in wrong["error"]
    assert frame.loc["grouped", "status"] == "ok"


def test_variants_skip_the_gradient_check_with_a_reason(tmp_path):
    frame = _run([tiny_case("dense", mode="train"), tiny_case("capacity", mode="train")], tmp_path)
    assert set(frame["status"]) == {"ok"}
    assert all(text.startswith("skipped: a variant") for text in frame["grad_check"])


def test_max_token_error_finds_the_one_bad_token():
    ref = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    y = ref.clone()
    y[77] = 0
    err, token = check.max_token_error(y, ref)
    assert token == 77 and err == pytest.approx(1.0)
    assert check.relative_error(y, ref) < 0.02
    skip = torch.zeros(4096, dtype=torch.bool)
    skip[77] = True
    assert check.max_token_error(y, ref, skip)[0] == 0.0
    y[3, 0] = float("nan")
    assert check.max_token_error(y, ref) == (float("inf"), 3)


def test_a_token_whose_output_nearly_cancels_is_judged_against_the_typical_norm():
    ref = torch.ones(100, 8)
    ref[10] = 1e-6  # nearly zero: its own norm would turn rounding into a huge error
    y = ref.clone()
    y[10] += 1e-3
    # 2.8e-3 off, judged against a tenth of the typical norm 2.8 (not against 2.8e-6)
    assert check.max_token_error(y, ref)[0] == pytest.approx(0.01, rel=0.01)


class _FusedUpGate(torch.nn.Module):
    """Weights in another layout: up and gate fused along F (up first), kept as a copy."""

    def __init__(self, weights, case, order=("w_up_EDF", "w_gate_EDF")):
        super().__init__()
        self.inner = registry.get("grouped").build(weights, case)
        fused = torch.cat([getattr(weights, name) for name in order], dim=-1).clone()
        self.w_fused_ED2F = torch.nn.Parameter(fused)
        del self.inner.w_gate_EDF, self.inner.w_up_EDF
        self.ffn = weights.w_gate_EDF.shape[-1]
        self.order = order

    def forward(self, x_TD):
        first, second = self.w_fused_ED2F[..., : self.ffn], self.w_fused_ED2F[..., self.ffn :]
        setattr(self.inner, self.order[0], first)
        setattr(self.inner, self.order[1], second)
        return self.inner(x_TD)


def test_gate_up_fused_is_found_and_other_layouts_need_weight_grads():
    case = tiny_case("grouped", mode="train")
    weights = make_weights(case)
    x = make_inputs(case, 1)[0]
    # gate|up side by side (as Hugging Face's gate_up_proj): found by value.
    fused = _FusedUpGate(weights, case, order=("w_gate_EDF", "w_up_EDF"))
    result = check.check_gradients(fused, [weights], x, case.dtype, case.seed)
    assert not result.failures and {"w_gate_EDF", "w_up_EDF"} <= set(result.errors)
    # up|gate: not a layout the check knows, so the layer must say.
    layer = _FusedUpGate(weights, case)
    result = check.check_gradients(layer, [weights], x, case.dtype, case.seed)
    assert result.failures and "w_fused_ED2F" in result.failures[0]
    assert "weight_grads()" in result.failures[0]

    def weight_grads():
        inner = layer.inner
        grads = {"w_down_EFD": inner.w_down_EFD.grad, "w_router_DE": inner.router.w_router_DE.grad}
        fused_grad = layer.w_fused_ED2F.grad
        grads["w_up_EDF"] = fused_grad[..., : layer.ffn]
        grads["w_gate_EDF"] = fused_grad[..., layer.ffn :]
        return grads

    layer.weight_grads = weight_grads
    result = check.check_gradients(layer, [weights], x, case.dtype, case.seed)
    assert not result.failures and result.worst < 1e-5
    assert set(result.errors) == {"input", "w_router_DE", "w_gate_EDF", "w_up_EDF", "w_down_EFD"}


class _DownFMajor(ReferenceMoE):
    """Keeps the down projection as a transposed copy (E x D x F), as a kernel wanting
    F-major weights would."""

    def __init__(self, weights, case):
        super().__init__(weights, case)
        down_EFD = self._parameters.pop("w_down_EFD").detach()
        self.w_down_EDF = torch.nn.Parameter(down_EFD.transpose(1, 2).contiguous())

    @property
    def w_down_EFD(self):  # noqa: N802 (the parent's attribute name)
        return self.w_down_EDF.transpose(1, 2)


def test_transposed_copies_are_found_and_a_frozen_weight_fails():
    case = tiny_case("reference", mode="train", shared_experts=1, layers=2)
    weights = [make_weights(case, i) for i in range(2)]
    x = make_inputs(case, 1)[0]
    layer = Stack([_DownFMajor(w, case) for w in weights])
    result = check.check_gradients(layer, weights, x, case.dtype, case.seed)
    assert not result.failures, result.failures
    assert "layer0.w_down_EFD" in result.errors and "layer1.w_shared_up_DS" in result.errors
    layer.layers[1].shared[1].requires_grad_(False)  # the shared up-projection not trained
    result = check.check_gradients(layer, weights, x, case.dtype, case.seed)
    assert any("layer1.w_shared_up_DS" in f and "trains no parameter" in f for f in result.failures)


def test_a_stack_is_checked_layer_by_layer(tmp_path):
    """Two layers with residuals, bfloat16: one zeroed token in each layer's output is
    small next to the residual stream, and the per-layer check still fails it."""
    frame = _run(
        [
            tiny_case("test-zeroed-token", dtype="bfloat16", batch=1, seq_len=4096, layers=2),
            tiny_case("grouped", dtype="bfloat16", batch=1, seq_len=4096, layers=2),
        ],
        tmp_path,
    )
    wrong = frame.loc["test-zeroed-token"]
    assert wrong["status"] == "mismatch"
    assert wrong["error"].startswith("layer 0 of 2: token 5 of 4096")
    assert frame.loc["grouped", "status"] == "ok"


def test_a_stack_is_checked_again_layer_by_layer_after_timing(tmp_path):
    """After timing, a stack is checked layer by layer on a recorded call: a layer wrong
    after its first call fails (end to end, the residual stream hid it); rounding-size
    noise in a MoE++ layer's later outputs, which flips near-tied choices of the next
    layer against the first call's inputs, does not."""
    wrong = tiny_case("test-wrong-later", dtype="bfloat16", batch=1, seq_len=4096, layers=2)
    frame = _run([wrong, _moepp_stack_case("test-jitter-later")], tmp_path)
    later = frame.loc["test-wrong-later"]
    assert later["status"] == "mismatch"
    assert later["error"].startswith("drifted during timing: layer 0 of 2")
    jitter = frame.loc["test-jitter-later"]
    assert jitter["status"] == "ok", jitter["error"]


def _moepp_stack_case(impl: str):
    from dataclasses import replace

    from moebench.case import Case, Workload
    from moebench.presets import PRESETS

    shape = replace(PRESETS["olmoe-1b-7b"], hidden=256, ffn=128, norm_topk_prob=True)
    return Case(
        shape,
        Workload(64, 1, "forward", layers=2),
        impl,
        dtype="bfloat16",
        preset="olmoe-1b-7b",
        options=(("const_experts", 2), ("copy_experts", 1), ("zero_experts", 1)),
    )


def test_a_moepp_stack_in_bfloat16_passes_its_own_reference():
    """MoE++'s inputs x top_k make each layer's output dwarf its input: the second layer's
    router sees the first layer's bfloat16 rounding, and near-tied choices flip against
    a reference that chains its own float32 outputs (worst token 0.17 on this case).
    Layer by layer, on the inputs the stack produced, it passes."""
    from moebench.measure.case_run import WeightCache, measure_case

    case = _moepp_stack_case("moepp")
    row = measure_case(case, FAST_PLAN, WeightCache())
    assert row["status"] == "ok", row.get("error")
    assert row["max_token_err"] <= check.TOKEN_TOLERANCE["bfloat16"]


def test_the_pytest_fixture_checks_as_moebench_run_does():
    """`moebench_layer.ok` (pytest plugin) is the run's output check: a layer with one
    zeroed token among 4096 in bfloat16 passes the global norm and still is not ok."""
    from moebench.pytest_plugin import build_layer

    import_plugin(WRONG)
    wrong = build_layer(tiny_case("test-zeroed-token", dtype="bfloat16", batch=1, seq_len=4096))
    assert wrong.rel_err < check.TOLERANCE["bfloat16"]
    assert not wrong.ok and "token 5 of 4096" in wrong.failure
    assert wrong.max_token_err == pytest.approx(1.0)
    right = build_layer(tiny_case("grouped", dtype="bfloat16", batch=1, seq_len=4096))
    assert right.ok and right.failure is None
    kept = build_layer(tiny_case("test-routing-kept"))  # right on its first batch alone
    assert not kept.ok and kept.failure.startswith("wrong on an input it was not timed on")
