"""The suite's cases as pytest-benchmark tests (`pip install pytest-benchmark`).

    pytest bench                                     # time every case
    moebench export RUN --format pytest-benchmark --storage .benchmarks
    pytest bench --benchmark-compare --benchmark-compare-fail=median:25%

The test's name and ids are those `moebench export` writes, so a moebench run is a
baseline pytest-benchmark compares against, case by case.
"""

from pathlib import Path

import pytest

from moebench.pytest_plugin import moebench_cases

CASES = moebench_cases(Path(__file__).with_name("moebench.toml"))


@pytest.mark.parametrize("case", CASES)
def test_moe_layer(benchmark, moebench_layer, case):
    assert moebench_layer.ok, moebench_layer.failure
    benchmark.group = moebench_layer.group  # the implementations of a case side by side
    benchmark.extra_info.update(moebench_layer.extra_info)
    benchmark(moebench_layer.step)
