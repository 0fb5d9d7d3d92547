"""A case timed as a CUDA graph and its un-graphed twin are told apart wherever moebench
names a case: progress lines and pytest ids (`Case.label`), the run's summary table,
`moebench compare`'s case labels and the pytest-benchmark export's names. Read from a
real GPU run that holds both (`results/reference/h200-peers-v10/`)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from moebench.case import Workload
from moebench.cli import main as cli_main
from moebench.compare.runs import shape_label
from moebench.presets import PRESETS
from moebench.store import read_run
from moebench.terminal import summary_table
from tests.conftest import tiny_case

PEERS_V10 = Path(__file__).parent.parent / "results" / "reference" / "h200-peers-v10"


def _twins() -> list[dict]:
    """`triton` on Mixtral-8x7B at one token, forward: graphed and not."""
    rows = read_run(PEERS_V10 / "results.parquet").to_dict("records")
    twins = [
        row
        for row in rows
        if row["impl"] == "triton"
        and row["preset"] == "mixtral-8x7b"
        and row["tokens"] == 1
        and row["mode"] == "forward"
    ]
    assert sorted(bool(row["cuda_graph"]) for row in twins) == [False, True]
    return twins


def test_case_label_names_the_graph():
    case = tiny_case("triton", device="cuda", dtype="bfloat16")
    graphed = case.with_(cuda_graph=True)
    assert graphed.label() == case.label() + " graph"
    assert "graph" not in case.label()
    big = case.with_(shape=PRESETS["mixtral-8x7b"], workload=Workload(1, 1), preset="mixtral")
    assert big.with_(cuda_graph=True).label().endswith("uniform graph")


def test_summary_table_marks_the_graphed_twin():
    console = Console(width=250, record=True, force_terminal=False)
    console.print(summary_table(_twins(), "twins"))
    lines = [line for line in console.export_text().splitlines() if "triton" in line]
    assert len(lines) == 2
    assert sum("forward, CUDA graph" in line for line in lines) == 1


def test_compare_labels_differ():
    graphed, plain = sorted(_twins(), key=lambda row: not row["cuda_graph"])
    assert shape_label(graphed) == shape_label(plain) + " graph"


def test_pytest_benchmark_export_names_are_unique(tmp_path, capsys):
    out = tmp_path / "peers.json"
    code = cli_main(
        ["export", str(PEERS_V10 / "results.parquet"), "--format", "pytest-benchmark",
         "-o", str(out)]
    )  # fmt: skip
    capsys.readouterr()
    assert code == 0
    names = [bench["name"] for bench in json.loads(out.read_text())["benchmarks"]]
    assert len(names) == len(set(names)) > 100
    assert "test_moe_layer[triton mixtral-8x7b E8k2 T1 forward bfloat16 uniform graph]" in names
