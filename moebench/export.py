"""`moebench export`: a run as pytest-benchmark JSON, as CSV or as a Markdown table.

    moebench export RUN --format pytest-benchmark --storage .benchmarks
    pytest bench/test_moebench.py --benchmark-compare --benchmark-compare-fail=median:50%
    moebench export RUN --format pytest-benchmark -o run.json   # one file, anywhere
    moebench export RUN --format csv -o run.csv
    moebench export RUN --format markdown -o table.md           # latency (x floor) per impl

pytest-benchmark format (its storage files, as `pytest --benchmark-autosave` writes them):
`machine_info`, `commit_info`, `benchmarks`, `datetime`, `version`. Each ok case is one
benchmark named as the `moebench_layer` fixture's test names it (moebench.pytest_plugin),
so `pytest --benchmark-compare` matches the run's cases with the test's and compares real
numbers: `fullname` is `TEST[label]` (TEST: `--test`, the test's node id, default
`test_moebench.py::test_moe_layer`, what `moebench init` writes), `name` `test_moe_layer[label]`
and `group` the label without the implementation, where the label is `Case.label()`.
`params` are the case fields, `stats` are derived from the kept samples in seconds with
pytest-benchmark's definitions (quartiles, Tukey outliers, ops = rounds / total), `data`
the samples themselves, and `iterations` 1 (every sample is one call). Cases that did not
finish ok are left out, as pytest-benchmark leaves out benchmarks that errored.
Run-level facts come from run.json.

`--storage DIR` writes where pytest-benchmark looks: `DIR/<machine id>/NNNN_<run id>.json`
with its machine id (`Linux-CPython-3.11-64bit`) and the next free number, so a plain
`--benchmark-compare` (the newest file) or `--benchmark-compare=NNNN` finds it.

CSV: the results table as is, one row per case; list columns (`samples_ms`,
`tokens_per_expert`) as JSON arrays.

Markdown: one table, cases as rows and implementations as columns, each cell the latency
and latency / floor (`moebench.markdown_table`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from moebench.case import (
    ALL_FIELDS,
    CASE_FIELDS,
    SHAPE_FIELDS,
    WORKLOAD_FIELDS,
    Case,
    LayerShape,
    Workload,
)
from moebench.compare.runs import plain_value
from moebench.console import error, say
from moebench.store import StoreError, read_metadata, read_run

COMMAND = "export"
HELP = "write a run as pytest-benchmark JSON, CSV or a Markdown table"
FORMATS = ("pytest-benchmark", "csv", "markdown")
EXIT_OK, EXIT_BAD_INPUT = 0, 2
EXIT_CODES = """exit codes:
  0    written
  2    bad input, with a message: an unknown run, a file that is not a moebench
       results table, an output file that exists (pass --force), an output that
       cannot be written"""
# The pytest-benchmark storage layout this writes (stable since 3.x; 'ops' since 3.1).
PYTEST_BENCHMARK_FORMAT = "5.1.0"
# The node id of the test `moebench init` writes (bench/pytest.ini makes bench/ the root).
DEFAULT_TEST = "test_moebench.py::test_moe_layer"
CASE_PARAMS = (*ALL_FIELDS, "tokens")
EXTRA_INFO = (
    "run_id", "case_id", "suite", "family", "impl_detail", "latency_ms", "tokens_per_s",
    "peak_mem_bytes", "active_params", "achieved_tflops", "rel_err", "fidelity_err",
)  # fmt: skip


def _quartiles(data: Sequence[float]) -> tuple[float, float]:
    """q1, q3 by pytest-benchmark's method (its Stats.q1 / q3)."""
    n = len(data)
    if n == 1:
        return data[0], data[0]
    if n % 2:
        k, rem = n // 4, n % 4
        if rem == 1:
            q1 = 0.25 * data[k - 1] + 0.75 * data[k]
            q3 = 0.75 * data[3 * k] + 0.25 * data[3 * k + 1]
        else:
            q1 = 0.75 * data[k] + 0.25 * data[k + 1]
            q3 = 0.25 * data[3 * k + 1] + 0.75 * data[3 * k + 2]
        return q1, q3
    return statistics.median(data[: n // 2]), statistics.median(data[n // 2 :])


def benchmark_stats(samples_s: Sequence[float]) -> dict[str, Any]:
    """pytest-benchmark's `stats` of samples in seconds (same fields and definitions).

    >>> stats = benchmark_stats([0.001, 0.002, 0.003])
    >>> stats["median"], stats["rounds"], stats["ops"]
    (0.002, 3, 500.0)
    """
    data = list(samples_s)
    if not data:
        raise ValueError("no samples")
    ordered = sorted(data)
    mean = statistics.mean(data)
    stddev = statistics.stdev(data) if len(data) > 1 else 0.0
    q1, q3 = _quartiles(ordered)
    iqr = q3 - q1
    if len(data) == 1:
        ld15iqr = hd15iqr = data[0]
    else:
        ld15iqr = ordered[bisect_left(ordered, q1 - 1.5 * iqr)]
        pos = bisect_right(ordered, q3 + 1.5 * iqr)
        hd15iqr = ordered[-1] if pos == len(ordered) else ordered[pos]
    iqr_outliers = sum(v < q1 - 1.5 * iqr or v > q3 + 1.5 * iqr for v in data)
    stddev_outliers = sum(v < mean - stddev or v > mean + stddev for v in data)
    total = sum(data)
    return {
        "min": ordered[0],
        "max": ordered[-1],
        "mean": mean,
        "stddev": stddev,
        "rounds": len(data),
        "median": statistics.median(data),
        "iqr": iqr,
        "q1": q1,
        "q3": q3,
        "iqr_outliers": iqr_outliers,
        "stddev_outliers": stddev_outliers,
        "outliers": f"{stddev_outliers};{iqr_outliers}",
        "ld15iqr": ld15iqr,
        "hd15iqr": hd15iqr,
        "ops": len(data) / total if total else 0,
        "total": total,
        "data": data,
        "iterations": 1,
    }


def _samples_s(row: Mapping[str, Any]) -> list[float]:
    samples = row.get("samples_ms")
    if samples is None or isinstance(samples, float):
        return []
    return [float(v) / 1e3 for v in samples if v is not None and v == v]


def case_of_row(row: Mapping[str, Any]) -> Case:
    """The Case a results row was measured from (its label is the fixture's test id)."""
    value = {name: plain_value(row.get(name)) for name in ALL_FIELDS if name in row}
    options = json.loads(value.get("options") or "{}")
    return Case(
        shape=LayerShape(**{k: value[k] for k in SHAPE_FIELDS if k in value}),
        workload=Workload(**{k: value[k] for k in WORKLOAD_FIELDS if k in value}),
        **{k: value[k] for k in CASE_FIELDS if k in value and k != "options"},
        options=tuple(sorted(options.items())),
    )


def machine_id() -> str:
    """pytest-benchmark's folder name for this machine (its utils.get_machine_id)."""
    return "-".join(
        (
            platform.system(),
            platform.python_implementation(),
            ".".join(platform.python_version_tuple()[:2]),
            platform.architecture()[0],
        )
    )


def storage_path(storage: Path, run_id: str) -> Path:
    """`storage/<machine id>/NNNN_<run_id>.json` with the next free number."""
    folder = storage / machine_id()
    numbers = [int(p.name[:4]) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.json")]
    return folder / f"{max(numbers, default=0) + 1:04d}_{run_id}.json"


def _machine_info(meta: Mapping[str, Any]) -> dict[str, Any]:
    """pytest-benchmark's machine_info keys, filled from run.json's environment."""
    env = meta.get("environment") or {}
    python = str(env.get("python") or "")
    return {
        "node": env.get("host"),
        "processor": env.get("cpu"),
        "machine": env.get("platform"),
        "python_implementation": "CPython",
        "python_version": python,
        "python_version_tuple": python.split(".") if python else [],
        "release": env.get("platform"),
        "system": str(env.get("platform") or "").split("-")[0] or None,
        "cpu": {"brand_raw": env.get("cpu"), "count": env.get("cpu_count")},
        "gpus": [g.get("name") for g in env.get("gpus") or []],
        "torch": env.get("torch"),
        "moebench": env.get("moebench"),
        "device": meta.get("device"),
    }


def _commit_info(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The repository the run was made in (as pytest-benchmark records the project under
    test); runs older than provenance: moebench's own commit."""
    env = meta.get("environment") or {}
    repository = (env.get("provenance") or {}).get("repository") or {}
    root = repository.get("root")
    return {
        "id": repository.get("commit") or env.get("git_sha") or "unversioned",
        "time": None,
        "author_time": None,
        "dirty": repository.get("dirty"),
        "project": Path(root).name if root else "moebench",
        "branch": None,
    }


def to_pytest_benchmark(
    frame: pd.DataFrame, meta: Mapping[str, Any], test: str = DEFAULT_TEST
) -> tuple[dict[str, Any], int]:
    """(the JSON document, how many cases were left out: not ok or without samples).
    test: the node id of the test whose benchmarks these stand for (module docstring)."""
    benchmarks = []
    left_out = 0
    function = test.rsplit("::", 1)[-1]
    for row in frame.to_dict("records"):
        samples = _samples_s(row)
        if row.get("status") != "ok" or not samples:
            left_out += 1
            continue
        label = case_of_row(row).label()
        params = {k: plain_value(row.get(k)) for k in CASE_PARAMS if k in row}
        benchmarks.append(
            {
                "group": label.split(" ", 1)[1],  # as BuiltLayer.group
                "name": f"{function}[{label}]",
                "fullname": f"{test}[{label}]",
                "params": params,
                "param": label,
                "extra_info": {k: plain_value(row.get(k)) for k in EXTRA_INFO if k in row},
                "options": {
                    "disable_gc": False,
                    "timer": "cuda_event"
                    if str(row.get("device")).startswith("cuda")
                    else "perf_counter_ns",
                    "min_rounds": None,
                    "max_time": None,
                    "min_time": None,
                    "warmup": True,
                },
                "stats": benchmark_stats(samples),
            }
        )
    document = {
        "machine_info": _machine_info(meta),
        "commit_info": _commit_info(meta),
        "benchmarks": benchmarks,
        "datetime": str(meta.get("started_at") or datetime.now(UTC).isoformat()),
        "version": _pytest_benchmark_version(),
    }
    return document, left_out


def _pytest_benchmark_version() -> str:
    try:
        return metadata.version("pytest-benchmark")
    except metadata.PackageNotFoundError:
        return PYTEST_BENCHMARK_FORMAT


def to_csv(frame: pd.DataFrame) -> str:
    """The table as CSV; list-valued cells as JSON arrays."""
    out = frame.copy()
    for column in out.columns:
        if out[column].map(lambda v: hasattr(v, "__len__") and not isinstance(v, str)).any():
            out[column] = out[column].map(_json_cell)
    return out.to_csv(index=False)


def _json_cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, float)):
        return value
    return json.dumps([plain_value(v) for v in value])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `moebench export`."""
    parser.add_argument("run", help="run id, run folder, parquet file or 'latest'")
    parser.add_argument(
        "--format", choices=FORMATS, default="pytest-benchmark",
        help="pytest-benchmark JSON (default; `pytest-benchmark compare FILE` reads it), csv, "
        "or markdown (latency and latency / floor, implementations side by side)",
    )  # fmt: skip
    parser.add_argument("-o", "--output", default="-", help="output file ('-': stdout)")
    parser.add_argument(
        "--storage", metavar="DIR",
        help="pytest-benchmark: write DIR/<machine id>/NNNN_<run id>.json, where "
        "`pytest --benchmark-compare` looks (DIR is usually .benchmarks)",
    )  # fmt: skip
    parser.add_argument(
        "--test", default=DEFAULT_TEST, metavar="NODE_ID",
        help=f"pytest-benchmark: the test the cases stand for (default {DEFAULT_TEST})",
    )  # fmt: skip
    parser.add_argument("--root", default="results", help="results root for run ids")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


def main(args: argparse.Namespace, console: Console) -> int:
    """Run `moebench export`; returns the exit status."""
    try:
        frame = read_run(args.run, args.root)
        meta = read_metadata(args.run, args.root)
    except (StoreError, OSError, ValueError) as exc:
        error(console, exc)
        return EXIT_BAD_INPUT
    if args.format == "csv":
        text, note = to_csv(frame), f"{len(frame)} cases"
    elif args.format == "markdown":
        from moebench.markdown_table import to_markdown

        text, note = to_markdown(frame, meta), f"{len(frame)} cases"
    else:
        document, left_out = to_pytest_benchmark(frame, meta, args.test)
        text = json.dumps(document, indent=4, default=str, allow_nan=False)
        note = f"{len(document['benchmarks'])} benchmarks"
        if left_out:
            note += f" ({left_out} cases not ok or without samples left out)"
    if args.storage:
        if args.format != "pytest-benchmark" or args.output != "-":
            error(console, "--storage is for --format pytest-benchmark, without -o")
            return EXIT_BAD_INPUT
        path = storage_path(Path(args.storage), str(meta.get("run_id") or "moebench"))
    elif args.output == "-":
        sys.stdout.write(text)
        return EXIT_OK
    else:
        path = Path(args.output)
    if path.exists() and not args.force:  # results files are not overwritten by accident
        error(console, f"{path} exists; pass --force to overwrite it")
        return EXIT_BAD_INPUT
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        error(console, f"cannot write {path}: {exc}")
        return EXIT_BAD_INPUT
    say(console, f"wrote {note} to {path}")
    return EXIT_OK
