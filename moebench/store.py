"""Runs on disk: atomic parquet parts, run metadata, consolidation, reading back.

A run is a folder `results/<run_id>/`:

    run.json              environment and suite facts (also in the parquet metadata)
    parts/<case_id>.parquet   one row per finished case, written atomically
    results.parquet       all parts consolidated when the run ends
    traces/<case_id>.json.gz  with --profile: the case's torch.profiler trace (Perfetto)
    kernels/<case_id>.parquet with --profile: the case's kernel table, consolidated
    kernels.parquet           into this sidecar when the run ends (key: case_id)

Every finished case is on disk before the next starts, so a killed run loses nothing;
`read_run` reads the consolidated file, or the parts of a run that never finished.

The table's schema (columns, types, versions, upgrades) is `moebench.results_schema`.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moebench.case import LATE_FIELD_DEFAULTS
from moebench.names import inside, name_problem, sanitize_name
from moebench.results_schema import (
    KERNEL_COLUMNS,
    METADATA_KEY,
    SCHEMA_VERSION,
    StoreError,
    check_results_table,
    check_schema_version,
    row_table,
    to_frame,
    upgrade_table,
)

KERNELS_FILE = "kernels.parquet"

LOCK_NAME = ".lock"
CASES_NAME = "cases.tsv"


def run_ids(root: str | Path) -> list[str]:
    """The runs under `root`, oldest first by name's time stamp order."""
    return sorted(p.parent.name for p in Path(root).glob("*/parts") if p.is_dir())


def _run_dir(root: str | Path, run_id: str) -> Path:
    """root/run_id, refused when `run_id` is not a plain safe name or `root` no folder."""
    root = Path(root)
    if problem := name_problem(str(run_id)):
        raise StoreError(f"run id {problem}")
    if root.exists() and not root.is_dir():
        raise StoreError(f"results root {root} is a file, not a folder; pass a folder")
    path = root / run_id
    if not inside(root, path):
        raise StoreError(f"run folder {path} lies outside the results root {root}")
    return path


def new_run_id(suite: str) -> str:
    """`<suite>-<UTC date-time>-<4 hex>`: sortable and unique (the suite name made safe
    for a folder name first)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{sanitize_name(suite)[:70]}-{stamp}-{secrets.token_hex(2)}"


def _atomic_write(table: pa.Table, path: Path) -> None:
    """`table` as the parquet file `path`, atomically and synced to disk
    (`replace_atomically`)."""

    def write(tmp: Path) -> None:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())

    replace_atomically(path, write)


def write_text_atomically(path: Path, text: str) -> None:
    """`text` (UTF-8) as the file `path`, atomically (`replace_atomically`)."""
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a temporary beside `path`, then renamed over it, so a kill leaves
    the old file or the new. StoreError naming `path` when it cannot be written (a full
    disk, a folder gone read-only), the half-written temporary removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {os_reason(exc)}") from exc


def os_reason(exc: OSError) -> str:
    """The reason of an OSError in words ("No space left on device"), without pyarrow's
    decoration of it or the path (which the caller's message names)."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


class ResultStore:
    """The folder of one run."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.parts_dir = self.run_dir / "parts"

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    @classmethod
    def create(cls, root: Path, run_id: str) -> ResultStore:
        store = cls(_run_dir(root, run_id))
        if store.run_dir.exists():
            raise StoreError(f"run folder {store.run_dir} already exists; never overwritten")
        try:
            store.parts_dir.mkdir(parents=True)
        except OSError as exc:
            raise StoreError(f"cannot create run folder {store.run_dir}: {os_reason(exc)}") from exc
        return store

    @classmethod
    def open(cls, root: Path, run_id: str) -> ResultStore:
        store = cls(_run_dir(root, run_id))
        if not store.parts_dir.is_dir():
            known = run_ids(root)
            shown = ", ".join(known[-10:]) if known else "none"
            more = f" (the last 10 of {len(known)})" if len(known) > 10 else ""
            raise StoreError(f"no run {run_id!r} under {root}; runs there{more}: {shown}")
        return store

    def lock(self) -> None:
        """Hold this run's folder for this process (released by `unlock` or at exit), so
        two processes never run into one folder; refuses when another holds it."""
        import fcntl

        path = self.run_dir / LOCK_NAME
        handle = open(path, "a+")  # noqa: SIM115 (held until unlock)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise StoreError(
                f"run {self.run_id} is in use by another moebench (pid {holder}); wait for "
                "it to finish or stop it, then resume"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        handle = getattr(self, "_lock_handle", None)
        if handle is not None:
            handle.close()
            self._lock_handle = None

    def clean_temporaries(self) -> int:
        """Delete the temporary files an interrupted writer left (call under `lock`)."""
        stale = [*self.run_dir.glob(".*.tmp"), *self.parts_dir.glob(".*.tmp")]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def write_cases(self, cases: list[tuple[str, str]]) -> None:
        """The run's resolved case list, (case_id, label) per case, so that a resume can
        check it runs the same suite."""
        lines = "".join(f"{case_id}\t{label}\n" for case_id, label in cases)
        write_text_atomically(self.run_dir / CASES_NAME, lines)

    def read_cases(self) -> dict[str, str] | None:
        """case_id -> label of the run's case list; None for a run that has none (runs
        made before it was written)."""
        path = self.run_dir / CASES_NAME
        if not path.is_file():
            return None
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        return dict(line.partition("\t")[::2] for line in lines if line)

    def write_meta(self, meta: dict[str, Any]) -> None:
        """run.json, atomically; StoreError naming it when it cannot be written."""
        meta = {**meta, "schema_version": SCHEMA_VERSION}
        write_text_atomically(self.run_dir / "run.json", json.dumps(meta, indent=2, default=str))

    def read_meta(self) -> dict[str, Any]:
        """run.json ({} where there is none); StoreError when it is not a JSON object."""
        path = self.run_dir / "run.json"
        if not path.exists():
            return {}
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{path} is unreadable: {exc}") from exc
        if not isinstance(meta, dict):
            raise StoreError(f"{path} is unreadable: a JSON object was expected")
        return meta

    def done_case_ids(self, warn: Callable[[str], None] | None = None) -> set[str]:
        """The case ids with a readable part. An unreadable part (a torn or foreign file)
        is not done: `warn` is told, and the case runs again."""
        done = set()
        for path in self.parts_dir.glob("*.parquet"):
            try:
                pq.read_metadata(path)
            except (OSError, pa.ArrowException) as exc:
                if warn is not None:
                    warn(f"part {path.name} is unreadable ({exc}); its case runs again")
                continue
            done.add(path.stem)
        return done

    def write_row(self, row: dict[str, Any]) -> Path:
        """Write one finished case, atomically (a kill leaves the old state or the new)."""
        case_id = str(row["case_id"])
        if problem := name_problem(case_id):
            raise StoreError(f"case id {problem}")
        path = self.parts_dir / f"{case_id}.parquet"
        _atomic_write(row_table(row), path)
        return path

    def write_trace(self, case_id: str, trace_json_gz: bytes) -> Path:
        """Write one case's gzipped Chrome trace to traces/<case_id>.json.gz."""
        folder = self.run_dir / "traces"
        folder.mkdir(exist_ok=True)
        path = folder / f"{case_id}.json.gz"
        replace_atomically(path, lambda tmp: tmp.write_bytes(trace_json_gz))
        return path

    def write_kernels(self, case_id: str, kernels: list[dict[str, Any]]) -> Path:
        """Write one case's kernel table (rows of KERNEL_COLUMNS but case_id)."""
        folder = self.run_dir / "kernels"
        folder.mkdir(exist_ok=True)
        arrays = {
            name: pa.array(
                [case_id] * len(kernels) if name == "case_id" else [k[name] for k in kernels],
                type=typ,
            )
            for name, typ in KERNEL_COLUMNS.items()
        }
        path = folder / f"{case_id}.parquet"
        _atomic_write(pa.table(arrays), path)
        return path

    def write_part(self, table: pa.Table) -> Path:
        """Write a one-row table (a case of another run, `moebench merge`) as a part."""
        path = self.parts_dir / f"{table.column('case_id')[0].as_py()}.parquet"
        _atomic_write(table, path)
        return path

    def consolidate(self, warn: Callable[[str], None] | None = None) -> Path:
        """Join every readable part into results.parquet, with run.json in the schema
        metadata (and the kernel tables, if any, into kernels.parquet); an unreadable
        part is left out (and `warn` told)."""
        kernel_parts = sorted((self.run_dir / "kernels").glob("*.parquet"))
        if kernel_parts:
            kernels = pa.concat_tables([pq.read_table(p) for p in kernel_parts])
            _atomic_write(kernels, self.run_dir / KERNELS_FILE)
        tables = []
        for part in sorted(self.parts_dir.glob("*.parquet")):
            try:
                tables.append(upgrade_table(pq.read_table(part)))
            except (OSError, pa.ArrowException) as exc:
                if warn is not None:
                    warn(f"part {part.name} is unreadable ({exc}); left out of the results")
        if tables:
            table = pa.concat_tables(tables, promote_options="permissive")
            table = table.sort_by([("started_at", "ascending")])
        else:
            table = row_table({}).slice(0, 0)
        try:
            meta = self.read_meta()
        except StoreError:
            meta = {}
        meta = {**meta, "schema_version": SCHEMA_VERSION}
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, default=str)})
        path = self.run_dir / "results.parquet"
        _atomic_write(table, path)
        return path


def resolve_run(spec: str | Path, root: str | Path = "results") -> Path:
    """A run folder or parquet file from a run id, a folder, a file or "latest"."""
    root = Path(root)
    candidate = Path(spec)
    if str(spec) == "latest":
        runs = sorted((p.parent for p in root.glob("*/run.json")), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise StoreError(f"no runs under {root}")
        return runs[-1]
    for path in (candidate, root / candidate):
        if path.is_file() and path.suffix == ".parquet":
            return path
        if (path / "parts").is_dir() or (path / "results.parquet").is_file():
            return path
    raise StoreError(f"no run or parquet file {str(spec)!r} (looked in . and {root}/)")


def read_table(spec: str | Path, root: str | Path = "results") -> pa.Table:
    """One run as an arrow table in the current schema (the consolidated file, or the
    parts of an unfinished run), its schema version checked and its columns those of a
    moebench results table; StoreError when it cannot be read or is none."""
    path = resolve_run(spec, root)
    try:
        meta = read_metadata(path)
    except StoreError:
        meta = {}  # unreadable run facts: the rows may still be read (`show` says so)
    check_schema_version(meta, path)
    try:
        if path.is_file():
            table = pq.read_table(path)
        elif (path / "results.parquet").is_file():
            table = pq.read_table(path / "results.parquet")
        else:
            parts = sorted((path / "parts").glob("*.parquet"))
            tables = [upgrade_table(pq.read_table(p)) for p in parts]
            table = (
                pa.concat_tables(tables, promote_options="permissive")
                if tables
                else row_table({}).slice(0, 0)
            )
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"cannot read results at {path}: {exc}") from exc
    table = upgrade_table(table)
    check_results_table(table, path)
    return table


def read_run(spec: str | Path, root: str | Path = "results") -> pd.DataFrame:
    """One run as a DataFrame (the consolidated file, or the parts if unfinished), with
    nullable integer and boolean columns and `started_at` a UTC timestamp. A case field
    added later reads as its default in rows written before it existed, so old and new
    runs still pair case by case. StoreError when it cannot be read or is not a moebench
    results table."""
    frame = to_frame(read_table(spec, root))
    for name, default in LATE_FIELD_DEFAULTS.items():
        frame[name] = frame[name].fillna(default) if name in frame.columns else default
    return frame


def read_runs(specs: list[str | Path], root: str | Path = "results") -> pd.DataFrame:
    """Several runs stacked into one DataFrame (`run_id` tells them apart)."""
    frames = [read_run(spec, root) for spec in specs]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_metadata(spec: str | Path, root: str | Path = "results") -> dict[str, Any]:
    """The run-level facts (run.json) of a run or parquet file."""
    path = resolve_run(spec, root)
    if path.is_dir():
        return ResultStore(path).read_meta()
    try:
        raw = pq.read_schema(path).metadata or {}
        meta = json.loads(raw.get(METADATA_KEY, b"{}"))
    except (OSError, pa.ArrowException, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"cannot read the run facts of {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise StoreError(f"cannot read the run facts of {path}: not a JSON object")
    return meta


def read_kernels(spec: str | Path, root: str | Path = "results") -> pd.DataFrame | None:
    """The kernel table of a run made with --profile (kernels.parquet beside its results,
    or the parts of an unfinished run); None when the run has none."""
    path = resolve_run(spec, root)
    folder = path if path.is_dir() else path.parent
    try:
        if (folder / KERNELS_FILE).is_file():
            return pq.read_table(folder / KERNELS_FILE).to_pandas()
        parts = sorted((folder / "kernels").glob("*.parquet"))
        if not parts:
            return None
        return pa.concat_tables([pq.read_table(p) for p in parts]).to_pandas()
    except (OSError, pa.ArrowInvalid) as exc:
        raise StoreError(f"cannot read the kernel table at {folder}: {exc}") from exc
