"""pytest plugin: time a suite's cases with pytest-benchmark's `benchmark` fixture.

Registered as the `pytest11` entry point `moebench` (or load it by hand with
`pytest -p moebench.pytest_plugin`). It gives:

- `moebench_cases(suite, device=None, filters=())`: the cases of a suite (a built-in's
  name, or a file) as `pytest.param`s whose ids are the case labels, for
  `@pytest.mark.parametrize("case", ...)`;
- the fixture `moebench_layer`: for the test's `case` parameter, the weights, the built
  layer, the inputs and `step`, one timed call (a forward under inference mode, or a
  forward and backward in train mode; on CUDA it synchronizes, so wall time is GPU time).

A runnable example (`pip install pytest-benchmark`; save as test_moe_bench.py):

    import pytest
    from moebench.pytest_plugin import moebench_cases

    CASES = moebench_cases("smoke", filters=["mode=forward"])

    @pytest.mark.parametrize("case", CASES)
    def test_moe_layer(benchmark, moebench_layer, case):
        assert moebench_layer.ok, moebench_layer.failure
        benchmark.group = moebench_layer.group  # the implementations of a case side by side
        benchmark.extra_info.update(moebench_layer.extra_info)
        benchmark(moebench_layer.step)

    # pytest test_moe_bench.py --benchmark-json=out.json
    # pytest-benchmark compare out.json

`moebench init` writes this test as bench/test_moebench.py, and `moebench export RUN
--format pytest-benchmark --storage .benchmarks` names a run's cases as this test names
them, so `pytest --benchmark-compare` compares against a moebench run.

The fixture builds the layer as `moebench run` does (the same weights, inputs, stacks and
output check, `moebench.measure.case_run.check_first_call`): `moebench_layer.rel_err` and
`.max_token_err` are its errors against the reference, `.ok` whether it passed (on the
first batch, and on one no timed call sees) and `.failure` why not; the check is not
timed (gradients and drift during timing are checked by `moebench run`).
The module imports torch only when a fixture or `moebench_cases` is used, so it is cheap
to load in every pytest session.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch

    from moebench.case import Case
    from moebench.weights import ExpertWeights

# Distinct input batches the step rotates through (as the runner does on CPU).
INPUT_ROTATIONS = 2


def moebench_cases(
    suite: str | Path, device: str | None = None, filters: Sequence[str] = ()
) -> list[Any]:
    """The cases of `suite` (a file, or a built-in suite's name) as
    `pytest.param(case, id=case.label())`.

    device: overrides the suite's device ("cpu", "cuda", "auto"). filters: `moebench run
    --filter` expressions (`key=v1,v2`, or a regular expression on the label; a value no
    case has is a UserWarning). A suite that does not load raises
    `moebench.suite.SuiteError` at collection, naming the file.
    """
    from moebench.runner import filter_cases
    from moebench.suite import load_suite

    unmatched: list[str] = []
    cases = filter_cases(load_suite(suite, device=device).cases, list(filters), unmatched)
    for line in unmatched:  # in pytest's warnings summary, as `moebench run` warns
        warnings.warn(line, UserWarning, stacklevel=2)
    return [pytest.param(case, id=case.label()) for case in cases]


@dataclass
class BuiltLayer:
    """What `moebench_layer` hands a test: the layer of one case, ready to time.

    weights: one weight set per layer of the case's stack (usually one).
    rel_err: against the reference (exact implementations, or a variant's own design
    reference); max_token_err: its worst token's; fidelity_err: a variant's deviation
    from the base MoE layer; failure: why the output check failed (None: it passed).
    """

    case: Case
    weights: list[ExpertWeights]
    layer: torch.nn.Module
    inputs: list[torch.Tensor]
    rel_err: float | None
    fidelity_err: float | None
    tolerance: float
    max_token_err: float | None = None
    failure: str | None = None
    _calls: Iterator[int] = field(default_factory=lambda: iter(range(1 << 62)), repr=False)
    _step: Callable[[int], object] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Passed the output check of `moebench run` (globally and per token, a stack layer
        by layer; True for a variant without a reference, as there). Gradients are
        checked by `moebench run` only."""
        return self.failure is None

    @property
    def group(self) -> str:
        """The case without its implementation: a pytest-benchmark group."""
        return self.case.label().split(" ", 1)[1]

    @property
    def extra_info(self) -> dict[str, Any]:
        """Case fields and the correctness check, for `benchmark.extra_info`."""
        info = {k: v for k, v in self.case.fields().items() if v not in (None, "")}
        info.update(case_id=self.case.case_id, rel_err=self.rel_err)
        if self.fidelity_err is not None:
            info["fidelity_err"] = self.fidelity_err
        return info

    def step(self) -> None:
        """One timed call: forward (inference mode) or forward + backward (train)."""
        assert self._step is not None
        self._step(next(self._calls))


_cache: Any = None  # the runner's WeightCache: the implementations of one shape share it


def build_layer(case: Case) -> BuiltLayer:
    """Weights, layer and inputs of `case`, checked against the reference (not timed),
    with the runner's own pieces (moebench.measure.case_run), so the layer and its check
    are those of `moebench run`."""
    global _cache
    import torch

    from moebench.measure import case_run
    from moebench.weights import make_inputs

    if _cache is None:
        _cache = case_run.WeightCache()
    weights = _cache.get(case)
    torch.manual_seed(case.seed)
    layer = case_run.build_layer(case, weights)
    inputs = make_inputs(case, INPUT_ROTATIONS)
    first = case_run.check_first_call(case, layer, weights, inputs[0], _cache)
    # as `moebench run` does after timing, a batch no timed call sees
    failure = first.failure or case_run.check_unseen(case, layer, weights, _cache)
    built = BuiltLayer(
        case,
        weights,
        layer,
        inputs,
        first.columns.get("rel_err"),
        first.columns.get("fidelity_err"),
        case_run.TOLERANCE[case.dtype],
        max_token_err=first.columns.get("max_token_err"),
        failure=failure,
    )
    built._step = _make_step(case, layer, inputs)
    return built


def _make_step(
    case: Case, layer: torch.nn.Module, inputs: list[torch.Tensor]
) -> Callable[[int], object]:
    import torch

    device = torch.device(case.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if case.workload.mode == "forward":

        def forward(i: int) -> None:
            with torch.inference_mode():
                layer(inputs[i % len(inputs)])
            sync()

        return forward
    train_inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    grad = torch.randn_like(inputs[0])
    params = [p for p in layer.parameters() if p.requires_grad]

    def train(i: int) -> None:
        for p in params:
            p.grad = None
        layer(train_inputs[i % len(train_inputs)]).backward(grad)
        sync()

    return train


@pytest.fixture
def moebench_layer(case: Case) -> BuiltLayer:
    """The built layer of the test's `case` parameter (see the module docstring)."""
    return build_layer(case)
