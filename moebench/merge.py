"""`moebench merge RUN...`: the runs of a suite's shards joined into one run.

    moebench run smoke --shard 1/3 --out results    # on three machines, or array tasks
    moebench run smoke --shard 2/3 --out results
    moebench run smoke --shard 3/3 --out results
    moebench merge results/smoke-2026...-a1 results/smoke-2026...-b2 results/smoke-...-c3

The merged run is a new folder beside the first run (under --out if given) with every
case once, its `run_id` column set to the new id, and run.json naming the runs it came
from (`merged_from`: their ids, shards, hosts and start times). Refused (exit 2, nothing
written): runs of different suites, of different moebench versions or results schema
versions, of different shard counts or timing settings (run.json's `timing`: a suite's
warm-up, budget and repeats edited between the runs), and a case present in two runs.
Missing shards are reported, not refused (a partial merge is still a run).
"""

from __future__ import annotations

import argparse
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.console import Console

from moebench.console import error, say
from moebench.store import (
    ResultStore,
    StoreError,
    new_run_id,
    read_metadata,
    read_table,
    resolve_run,
)

COMMAND = "merge"
HELP = "join the runs of a suite's shards (run --shard I/N) into one run"
EXIT_OK, EXIT_BAD_INPUT = 0, 2
EXIT_CODES = """exit codes:
  0    merged; a note names the shards missing from a partial merge
  2    nothing written: an unknown run, fewer than two runs, or runs that cannot
       be merged (different suites, moebench or schema versions, shard counts or
       timing settings; a shard given twice; a case in two runs)"""


class MergeError(ValueError):
    """Runs that cannot be merged; the message says why."""


def _moebench_version(meta: dict[str, Any]) -> str | None:
    return (meta.get("environment") or {}).get("moebench")


def _same(runs: list[tuple[str, dict[str, Any]]], what: str, value: Any) -> None:
    """MergeError unless every run has the same `value(meta)`."""
    seen: dict[str, list[str]] = {}
    for name, meta in runs:
        seen.setdefault(str(value(meta)), []).append(name)
    if len(seen) > 1:
        detail = "; ".join(f"{v}: {', '.join(names)}" for v, names in seen.items())
        raise MergeError(f"runs of different {what} cannot be merged ({detail})")


def check_mergeable(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """MergeError for runs that cannot be merged; notes for those that can (missing
    shards)."""
    _same(runs, "suites", lambda meta: meta.get("suite"))
    _same(runs, "moebench versions", _moebench_version)
    _same(runs, "results schema versions", lambda meta: meta.get("schema_version", 1))
    _same(runs, "shard counts", lambda meta: (meta.get("shard") or {}).get("count"))
    # One run is timed one way: its run.json has one `timing` (warm-up, budget, repeats).
    _same(runs, "timing settings", lambda meta: meta.get("timing"))
    count = (runs[0][1].get("shard") or {}).get("count")
    if not count:
        return []
    indexes = [(meta.get("shard") or {}).get("index") for _, meta in runs]
    repeated = sorted({i for i in indexes if indexes.count(i) > 1})
    if repeated:
        raise MergeError(
            f"shard(s) {', '.join(map(str, repeated))} of {count} given more than once"
        )
    missing = sorted(set(range(1, count + 1)) - set(indexes))
    return (
        [f"shard(s) {', '.join(map(str, missing))} of {count} missing: the merged run is partial"]
        if missing
        else []
    )


def beside(run: Path, root: str) -> Path:
    """The results root holding the run at `run` (a run folder, or a file in one), so
    that the merged run lands next to its shards; `root` for a parquet file of no run."""
    folder = run if run.is_dir() else run.parent
    if (folder / "run.json").is_file() or (folder / "parts").is_dir():
        return folder.parent
    return Path(root)


def merge_runs(
    specs: list[str], root: str, out: str | None = None
) -> tuple[ResultStore, list[str]]:
    """Merge the runs `specs` (ids under root, folders or parquet files) into a new run
    under `out` (default: beside the first run); (its store, notes). MergeError /
    StoreError on bad input."""
    if len(specs) < 2:
        raise MergeError(f"merge takes two runs or more; got {len(specs)}")
    runs = []
    for spec in specs:
        path = resolve_run(spec, root)
        runs.append((str(spec), read_metadata(path), read_table(path)))
        if out is None:
            out = str(beside(path, root))
    notes = check_mergeable([(name, meta) for name, meta, _ in runs])
    owner: dict[str, str] = {}
    for name, _, table in runs:
        for case_id in table.column("case_id").to_pylist():
            if case_id in owner:
                raise MergeError(f"case {case_id} is in both {owner[case_id]} and {name}")
            owner[case_id] = name
    first = runs[0][1]
    store = ResultStore.create(out, new_run_id(str(first.get("suite") or "merged")))
    try:
        _write_merged(store, runs, first, len(owner))
    except StoreError:  # a full disk, say: no half-merged run is left behind
        shutil.rmtree(store.run_dir, ignore_errors=True)
        raise
    return store, notes


def _write_merged(
    store: ResultStore,
    runs: list[tuple[str, dict[str, Any], pa.Table]],
    first: dict[str, Any],
    cases: int,
) -> None:
    """Every run's rows as parts of `store` (their run_id its own), run.json, results."""
    for _, _, table in runs:
        ids = pa.array([store.run_id] * len(table), type=pa.string())
        table = table.set_column(table.column_names.index("run_id"), "run_id", ids)
        for i in range(len(table)):
            store.write_part(table.slice(i, 1))
    metas = [meta for _, meta, _ in runs]
    store.write_meta(
        {
            **{k: v for k, v in first.items() if k not in ("shard", "run_id", "ceilings")},
            "run_id": store.run_id,
            "started_at": min(str(m.get("started_at")) for m in metas),
            "finished_at": max(str(m.get("finished_at")) for m in metas),
            "merged_at": datetime.now(UTC).isoformat(),
            "cases_total": cases,
            "merged_from": [
                {
                    "run_id": meta.get("run_id"),
                    "shard": meta.get("shard"),
                    "host": (meta.get("environment") or {}).get("host"),
                    "started_at": meta.get("started_at"),
                    "ceilings": meta.get("ceilings"),
                }
                for meta in metas
            ],
        }
    )
    store.consolidate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `moebench merge`."""
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run ids, folders or files")
    parser.add_argument("--root", default="results", help="results root for run ids")
    parser.add_argument(
        "--out",
        help="results root the merged run is written under (default: the one holding the "
        "first run, so the merged run lands beside its shards)",
    )


def main(args: argparse.Namespace, console: Console) -> int:
    """Run `moebench merge`; returns the exit status."""
    try:
        store, notes = merge_runs(args.runs, args.root, args.out)
    except (MergeError, StoreError, OSError) as exc:
        error(console, exc)
        return EXIT_BAD_INPUT
    for note in notes:
        say(console, ("note:", "yellow"), " ", note)
    meta = store.read_meta()
    say(console, f"merged {len(args.runs)} runs, {meta['cases_total']} cases: {store.run_dir}")
    return EXIT_OK
