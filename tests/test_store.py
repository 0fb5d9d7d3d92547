"""The results store: atomic parts, consolidation, metadata, reading back."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from moebench.results_schema import METADATA_KEY
from moebench.store import (
    ResultStore,
    StoreError,
    read_metadata,
    read_run,
    read_runs,
    resolve_run,
)


def _row(case_id: str, **extra) -> dict:
    row = {
        "run_id": "r",
        "case_id": case_id,
        "impl": "grouped",
        "status": "ok",
        "started_at": f"2026-01-01T00:00:0{case_id[-1]}",
        "samples_ms": [1.0, 2.0],
        "tokens_per_expert": [3, 0, 1],
        "latency_ms": 1.5,
    }
    row.update(extra)
    return row


def test_parts_consolidate_with_metadata(tmp_path):
    store = ResultStore.create(tmp_path, "run-1")
    store.write_meta({"suite": "smoke", "environment": {"host": "h"}})
    store.write_row(_row("c1"))
    store.write_row(_row("c2", my_family_metric=0.5))  # an implementation's own column
    assert store.done_case_ids() == {"c1", "c2"}
    assert not list(store.parts_dir.glob(".*tmp"))  # no temp file left behind
    path = store.consolidate()
    table = pq.read_table(path)
    assert json.loads(table.schema.metadata[METADATA_KEY])["suite"] == "smoke"
    frame = read_run("run-1", root=tmp_path)
    assert list(frame["case_id"]) == ["c1", "c2"]
    assert frame["samples_ms"][0].tolist() == [1.0, 2.0]
    assert frame["my_family_metric"].isna().tolist() == [True, False]
    assert read_metadata(path)["environment"]["host"] == "h"


def test_unfinished_run_reads_from_parts(tmp_path):
    store = ResultStore.create(tmp_path, "run-2")
    store.write_row(_row("c1"))
    assert len(read_run(tmp_path / "run-2")) == 1


def test_never_overwrites_and_errors_name_the_run(tmp_path):
    ResultStore.create(tmp_path, "run-3")
    with pytest.raises(StoreError, match="already exists"):
        ResultStore.create(tmp_path, "run-3")
    with pytest.raises(StoreError, match="no run 'nope'"):
        ResultStore.open(tmp_path, "nope")
    with pytest.raises(StoreError, match="nope"):
        resolve_run("nope", root=tmp_path)


def test_latest_and_many(tmp_path):
    for name in ("a", "b"):
        store = ResultStore.create(tmp_path, name)
        store.write_meta({"suite": name})
        store.write_row(_row("c1", run_id=name))
        store.consolidate()
    assert resolve_run("latest", root=tmp_path).name == "b"
    both = read_runs(["a", "b"], root=tmp_path)
    assert sorted(both["run_id"]) == ["a", "b"]


def test_schema_types_survive_a_failed_case(tmp_path):
    """Integer columns stay integers (nullable) when a case failed; timestamps are
    timestamps; the schema version is written and read back."""
    store = ResultStore.create(tmp_path, "run-1")
    store.write_meta({"suite": "smoke"})
    store.write_row(_row("c1", repeats=2, peak_mem_bytes=1024, exact=True))
    store.write_row(_row("c2", status="error", error="boom", samples_ms=None, latency_ms=None))
    path = store.consolidate()
    frame = read_run(path)
    for column in ("repeats", "peak_mem_bytes", "hidden", "total_params", "flops"):
        assert str(frame[column].dtype) == "Int64", column
    assert frame["repeats"].tolist()[0] == 2 and frame["repeats"].isna().tolist()[1]
    assert str(frame["exact"].dtype) == "boolean"
    assert str(frame["started_at"].dtype) == "datetime64[us, UTC]"
    assert frame["started_at"].iloc[0].isoformat() == "2026-01-01T00:00:01+00:00"
    assert read_metadata(path)["schema_version"] == 2
    assert json.loads((store.run_dir / "run.json").read_text())["schema_version"] == 2


def test_version_1_files_are_read_and_newer_ones_refused(tmp_path):
    """The committed reference runs are version 1 (started_at a string)."""
    from pathlib import Path

    old = Path(__file__).parent.parent / "results" / "reference" / "smoke.parquet"
    assert "schema_version" not in read_metadata(old)
    frame = read_run(old)
    assert str(frame["started_at"].dtype) == "datetime64[us, UTC]" and len(frame) == 44
    assert str(frame["latency_ms"].dtype) == "float64"
    assert str(frame["repeats"].dtype) == "Int64"

    store = ResultStore.create(tmp_path, "future")
    store.write_row(_row("c1"))
    path = store.consolidate()
    table = pq.read_table(path)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps({"schema_version": 99})})
    pq.write_table(table, path)
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        read_run(path)
