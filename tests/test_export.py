"""Tests of moebench.export (pytest-benchmark JSON, CSV) and moebench.pytest_plugin."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import moebench.export
from moebench.case import Case, LayerShape, Workload
from moebench.cli import main as cli_main
from moebench.export import benchmark_stats
from moebench.store import ResultStore


def make_run(root: Path, run_id: str = "run-1") -> Path:
    """A run folder with two ok cases and one that failed its check."""
    store = ResultStore.create(root, run_id)
    store.write_meta(
        {
            "run_id": run_id, "suite": "smoke", "device": "cpu",
            "started_at": "2026-01-01T00:00:00+00:00",
            "environment": {
                "host": "box", "cpu": "Some CPU", "python": "3.11.7", "torch": "2.13.0",
                "platform": "Linux-6.1-x86_64", "git_sha": "abc123", "gpus": [],
            },
        }
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for i, impl in enumerate(("reference", "grouped", "capacity")):
        case = Case(LayerShape(64, 128, 4, 2), Workload(1, 16), impl=impl)
        row = case.fields()
        row.update(run_id=run_id, case_id=case.case_id, suite="smoke")
        row["started_at"] = f"2026-01-01T00:00:0{i}"
        if impl == "capacity":
            row.update(status="mismatch", error="relative error 0.2 > tolerance")
        else:
            samples = (1.0 + 0.05 * rng.standard_normal(15)).tolist()
            row.update(
                status="ok", samples_ms=samples, latency_ms=float(np.median(samples)),
                repeats=len(samples), tokens_per_s=16e3 / float(np.median(samples)),
                tokens_per_expert=[8, 8, 8, 8],
            )  # fmt: skip
        store.write_row(row)
    store.consolidate()
    return store.run_dir


def export(*argv: str) -> int:
    return cli_main(["export", *argv])


def test_doctests() -> None:
    result = doctest.testmod(moebench.export)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 8, 9, 20, 33])
def test_stats_match_pytest_benchmark(n: int) -> None:
    stats_module = pytest.importorskip("pytest_benchmark.stats")
    data = np.random.default_rng(n).lognormal(-7, 0.3, n).tolist()
    theirs = stats_module.Stats()
    for value in data:
        theirs.update(value)
    ours = benchmark_stats(data)
    for name in stats_module.Stats.fields:
        assert ours[name] == pytest.approx(getattr(theirs, name)), name
    assert ours["data"] == data and ours["iterations"] == 1


def test_pytest_benchmark_json_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path)
    out = tmp_path / "0001_run.json"
    assert export(str(run), "--format", "pytest-benchmark", "-o", str(out)) == 0
    assert "2 benchmarks (1 cases not ok" in " ".join(capsys.readouterr().out.split())
    doc = json.loads(out.read_text())
    assert set(doc) == {"machine_info", "commit_info", "benchmarks", "datetime", "version"}
    assert doc["commit_info"]["id"] == "abc123" and doc["machine_info"]["node"] == "box"
    # Named as the moebench_layer fixture's test names its cases (Case.label()).
    assert [b["name"] for b in doc["benchmarks"]] == [
        "test_moe_layer[reference D64F128 E4k2 T16 forward float32 uniform]",
        "test_moe_layer[grouped D64F128 E4k2 T16 forward float32 uniform]",
    ]
    bench = doc["benchmarks"][0]
    assert bench["fullname"] == "test_moebench.py::" + bench["name"]
    assert bench["group"] == "D64F128 E4k2 T16 forward float32 uniform"
    assert bench["params"]["impl"] == "reference" and bench["params"]["num_experts"] == 4
    stats = bench["stats"]
    assert stats["rounds"] == 15 and len(stats["data"]) == 15
    assert stats["median"] == pytest.approx(bench["extra_info"]["latency_ms"] / 1e3)  # seconds


def _pytest_benchmark_command() -> list[str]:
    """`pytest-benchmark` run by this Python (`-m`, as its console script does): a
    `pytest-benchmark` found on PATH may belong to another Python, without moebench's
    dependencies (a pyenv shim ahead of an unactivated venv)."""
    return [sys.executable, "-m", "pytest_benchmark"]


def test_pytest_benchmark_compare_reads_the_export(tmp_path: Path) -> None:
    pytest.importorskip("pytest_benchmark")
    run = make_run(tmp_path)
    out = tmp_path / "0001_moebench.json"
    assert export(str(run), "-o", str(out)) == 0
    result = subprocess.run(
        [*_pytest_benchmark_command(), "compare", str(out), "--group-by", "group"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Failed to load" not in result.stdout + result.stderr  # it only warns on bad files
    assert "test_moe_layer[grouped D64F128 E4k2 T16 forward float32 uniform]" in result.stdout
    assert "test_moe_layer[reference D64F128 E4k2 T16 forward float32 uniform]" in result.stdout


def test_csv_export(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    out = tmp_path / "run.csv"
    assert export(str(run), "--format", "csv", "-o", str(out)) == 0
    frame = pd.read_csv(out)
    assert len(frame) == 3 and {"impl", "status", "latency_ms", "samples_ms"} <= set(frame)
    ok = frame[frame["status"] == "ok"]
    assert all(len(json.loads(cell)) == 15 for cell in ok["samples_ms"])
    assert json.loads(ok["tokens_per_expert"].iloc[0]) == [8, 8, 8, 8]


def test_markdown_export(tmp_path: Path) -> None:
    """One row per case without its implementation, one column per implementation:
    latency (x floor), `*` when noisy, the status when not ok, the row's fastest latency
    bold; a CUDA-graph case and a pipe in an option value stay readable."""
    from moebench.markdown_table import to_markdown
    from moebench.store import read_metadata, read_run

    run = make_run(tmp_path)
    out = tmp_path / "table.md"
    assert export(str(run), "--format", "markdown", "-o", str(out)) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "# smoke: latency ms (latency / floor)"
    assert "no measured ceilings" in lines[2] and "Run run-1, 3 cases" in lines[2]
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| shape | mode | tokens | reference | grouped | capacity |"
    assert table[1] == "|:---|:---|---:|---:|---:|---:|"
    (row,) = table[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["D64 F128 E4 k2", "forward", "16"]
    assert cells[5] == "mismatch" and cells[3].strip("*").replace(".", "").isdigit()
    # the faster of the two ok cells is bold, the slower and the mismatch are not
    latency = read_run(run).set_index("impl")["latency_ms"]
    faster, slower = sorted(("reference", "grouped"), key=latency.__getitem__)
    column = {"reference": 3, "grouped": 4}
    assert cells[column[faster]] == f"**{latency[faster]:.3g}**"
    assert cells[column[slower]] == f"{latency[slower]:.3g}"

    frame = read_run(run)
    frame["roofline_frac"] = 0.5
    frame.loc[frame["impl"] == "grouped", "noisy"] = True
    graphed = frame[frame["impl"] == "grouped"].assign(cuda_graph=True, options='{"a": "x|y"}')
    meta = dict(read_metadata(run), ceilings={"copy_gbps": 4000.0, "matmul_tflops_float32": 60.0})
    text = to_markdown(pd.concat([frame, graphed], ignore_index=True), meta)
    assert "float32 60 TFLOP/s, copy 4000 GB/s" in text
    assert "| D64 F128 E4 k2 | forward | 16 | " in text and "(2.00x)*" in text
    # alone in its row (the only graphed case): nothing to be faster than, not bold
    graphed_row = next(line for line in text.splitlines() if "CUDA graph" in line)
    assert "(2.00x)*" in graphed_row and "**" not in graphed_row
    assert "grouped a=x\\|y" in text  # escaped: the table keeps its columns


def test_export_refuses_to_overwrite_and_bad_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path)
    out = tmp_path / "x.json"
    out.write_text("{}")
    assert export(str(run), "-o", str(out)) == 2
    assert "pass --force" in capsys.readouterr().out
    assert export(str(run), "-o", str(out), "--force") == 0
    assert json.loads(out.read_text())["benchmarks"]
    assert export(str(tmp_path / "missing"), "-o", str(tmp_path / "y.json")) == 2
    assert "no run or parquet file" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the plugin

SUITE = """
[suite]
name = "tiny"
device = "cpu"

[grid]
impl = ["reference", "grouped"]
hidden = 32
ffn = 64
num_experts = 4
top_k = 2
batch = 1
seq_len = 8
mode = ["forward", "train"]
"""

TEST_FILE = """
import pytest
from moebench.pytest_plugin import moebench_cases

CASES = moebench_cases({suite!r})

@pytest.mark.parametrize("case", CASES)
def test_moe_layer(benchmark, moebench_layer, case):
    assert moebench_layer.ok, moebench_layer.rel_err
    assert moebench_layer.case == case and moebench_layer.layer is not None
    benchmark.group = moebench_layer.group
    benchmark.extra_info.update(moebench_layer.extra_info)
    benchmark.pedantic(moebench_layer.step, rounds=5, warmup_rounds=1)
"""


def test_pytest_plugin_times_a_suite_with_pytest_benchmark(tmp_path: Path) -> None:
    """Loaded with -p (the pytest11 entry point may not be installed); plugin autoload is
    off so the result does not depend on what else is installed."""
    pytest.importorskip("pytest_benchmark")
    suite = tmp_path / "tiny.toml"
    suite.write_text(SUITE)
    (tmp_path / "test_bench.py").write_text(textwrap.dedent(TEST_FILE.format(suite=str(suite))))
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "pytest_benchmark.plugin",
            "-p", "moebench.pytest_plugin", "-p", "no:cacheprovider", "-q",
            f"--benchmark-json={out}", "test_bench.py",
        ],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 passed" in result.stdout
    doc = json.loads(out.read_text())
    names = sorted(b["name"] for b in doc["benchmarks"])
    assert names == sorted(
        f"test_moe_layer[{impl} D32F64 E4k2 T8 {mode} float32 uniform]"
        for impl in ("reference", "grouped")
        for mode in ("forward", "train")
    )
    assert {b["group"] for b in doc["benchmarks"]} == {
        "D32F64 E4k2 T8 forward float32 uniform",
        "D32F64 E4k2 T8 train float32 uniform",
    }
    assert all(b["stats"]["rounds"] == 5 for b in doc["benchmarks"])


def test_moebench_cases_ids_are_labels(tmp_path: Path) -> None:
    from moebench.pytest_plugin import moebench_cases

    suite = tmp_path / "tiny.toml"
    suite.write_text(SUITE)
    params = moebench_cases(suite, filters=["impl=grouped"])
    assert len(params) == 2 and all(p.id == p.values[0].label() for p in params)
    assert {p.values[0].impl for p in params} == {"grouped"}
    with pytest.warns(UserWarning, match="no case has impl 'gruoped'"):
        assert len(moebench_cases(suite, filters=["impl=grouped,gruoped"])) == 2


# ------------------------------------------------------------------ the round trip


def _run_of_suite(root: Path, run_id: str, suite: Path, latency_ms: float) -> Path:
    """A run of every case of `suite`, each ok with samples around `latency_ms`."""
    from moebench.suite import load_suite

    store = ResultStore.create(root, run_id)
    store.write_meta({"run_id": run_id, "suite": "tiny", "environment": {}})
    for case in load_suite(suite).cases:
        row = case.fields()
        samples = [latency_ms * f for f in (0.98, 1.0, 1.02, 0.99, 1.01)]
        row.update(run_id=run_id, case_id=case.case_id, suite="tiny", status="ok")
        row.update(samples_ms=samples, latency_ms=latency_ms, repeats=5)
        store.write_row(row)
    store.consolidate()
    return store.run_dir


@pytest.mark.parametrize(("baseline_ms", "fails"), [(1e4, False), (1e-6, True)])
def test_pytest_benchmark_compare_against_an_export(
    tmp_path: Path, baseline_ms: float, fails: bool
) -> None:
    """The scaffold's pytest-benchmark test (moebench init) compares against an exported
    run case by case: a baseline far slower than the layers passes, one far faster fails
    (named case by case), so the comparison is of real numbers, not vacuous."""
    pytest.importorskip("pytest_benchmark")
    from moebench.scaffold import render

    repo = tmp_path / "repo"
    for relative, text in render("my-moe").items():
        if relative.startswith("bench/") and relative.count("/") == 1:
            (repo / relative).parent.mkdir(parents=True, exist_ok=True)
            (repo / relative).write_text(text)
    (repo / "bench" / "moebench.toml").write_text(SUITE)  # reference and grouped only
    run = _run_of_suite(tmp_path, "base", repo / "bench" / "moebench.toml", baseline_ms)
    assert export(str(run), "--storage", str(repo / ".benchmarks")) == 0
    (stored,) = (repo / ".benchmarks").glob("*/0001_base.json")
    assert stored.parent.name == moebench.export.machine_id()
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "bench", "-p", "pytest_benchmark.plugin",
            "-p", "moebench.pytest_plugin", "-p", "no:cacheprovider", "-q",
            "--benchmark-compare", "--benchmark-compare-fail=median:50%",
            "--benchmark-max-time=0.05", "--benchmark-min-rounds=3",
        ],
        capture_output=True, text=True, cwd=repo, timeout=300,
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert "Comparing against benchmarks from" in output, output[-3000:]
    assert (result.returncode != 0) == fails, output[-3000:]
    if not fails:
        assert "4 passed" in output, output[-3000:]
    else:  # every test ran; pytest-benchmark failed the session on the comparison
        assert "Performance has regressed" in output
        assert "test_moe_layer[grouped D32F64 E4k2 T8 train float32 uniform]" in output
