"""The results table's schema: every column and its type (docs/design.md), the statuses,
the schema version and how older files are upgraded, one row as a typed table, and the
check that a table read back is a moebench results table. Writing and reading runs is
`moebench.store`.

Schema versions (`schema_version` in run.json and in the parquet metadata; a file newer
than this moebench is refused with a message, older ones are read):

    1  started_at an ISO 8601 string; no schema_version written
    2  started_at a UTC timestamp; schema_version written

Read back, integer columns are pandas' nullable `Int64` (a failed case leaves them
null, not float NaN), `exact` is nullable `boolean` and `started_at` a UTC timestamp,
whatever the version of the file.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

SCHEMA_VERSION = 2
METADATA_KEY = b"moebench"

_I = pa.int64()
_F = pa.float64()
_S = pa.string()
_T = pa.timestamp("us", tz="UTC")
# Every column of the table (docs/design.md), with its type. Implementations may add columns
# of their own (prefixed by their family); those are typed by inference.
COLUMNS: dict[str, pa.DataType] = {
    # identity
    "run_id": _S,
    "case_id": _S,
    "suite": _S,
    "impl": _S,
    "family": _S,
    "exact": pa.bool_(),
    "status": _S,
    "error": _S,
    "started_at": _T,
    "impl_detail": _S,
    # case
    "device": _S,
    "dtype": _S,
    "mode": _S,
    "preset": _S,
    "hidden": _I,
    "ffn": _I,
    "num_experts": _I,
    "top_k": _I,
    "shared_experts": _I,
    "capacity_factor": _F,
    "activation": _S,
    "scoring": _S,
    "norm_topk_prob": pa.bool_(),
    "n_groups": _I,
    "topk_groups": _I,
    "correction_bias": pa.bool_(),
    "routed_scaling": _F,
    "shared_expert_gate": _S,
    "batch": _I,
    "seq_len": _I,
    "tokens": _I,
    "routing": _S,
    "world_size": _I,
    "seed": _I,
    "options": _S,
    "layers": _I,
    "weights": _S,
    "cuda_graph": pa.bool_(),
    "router_scale": _F,
    # time
    "latency_ms": _F,
    "latency_p10_ms": _F,
    "latency_p90_ms": _F,
    "latency_std_ms": _F,
    "repeats": _I,
    "samples_ms": pa.list_(_F),
    "tokens_per_s": _F,
    "wall_s": _F,
    # memory
    "peak_mem_bytes": _I,
    "weight_bytes": _I,
    "activation_bytes": _I,
    "allocator_peak_bytes": _I,
    "device_mem_used_bytes": _I,
    # parameters
    "total_params": _I,
    "active_params": _I,
    "touched_params": _I,
    "router_params": _I,
    # work
    "flops": _I,
    "min_bytes": _I,
    "achieved_tflops": _F,
    "achieved_gbps": _F,
    "roofline_frac": _F,
    # communication (zero or null on one device)
    "comm_ms": _F,
    "dispatch_ms": _F,
    "combine_ms": _F,
    "comm_bytes": _I,
    # where the time goes (moebench.measure.phases / profile)
    "router_ms": _F,
    "permute_ms": _F,
    "expert_ms": _F,
    "unpermute_ms": _F,
    "shared_ms": _F,
    "other_ms": _F,
    "phase_latency_ms": _F,
    "kernel_launches": _F,
    "device_busy_frac": _F,
    "host_sync_count": _F,
    # balance
    "tokens_per_expert": pa.list_(_I),
    "imbalance": _F,
    "served_imbalance": _F,
    "imbalance_max": _F,
    "dropped_frac": _F,
    "aux_loss": _F,
    "experts_per_token": _F,
    "router_entropy": _F,
    # energy
    "energy_j": _F,
    "j_per_token": _F,
    # fidelity
    "rel_err": _F,
    "fidelity_err": _F,
    "tolerance": _F,
}
KERNEL_COLUMNS: dict[str, pa.DataType] = {
    "case_id": _S,
    "kernel": _S,
    "kind": _S,
    "calls_per_call": _F,
    "device_ms": _F,
    "share": _F,
}
STATUSES = ("ok", "mismatch", "error", "oom", "timeout", "crashed", "skipped")


class StoreError(ValueError):
    """A run or results file that cannot be found or read."""


def _timestamp(value: Any) -> Any:
    """An ISO 8601 string (how the runner stamps rows) as a datetime; others as given."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def row_table(row: dict[str, Any], metadata: dict[str, Any] | None = None) -> pa.Table:
    """One row as a table with the schema's types (unknown columns inferred)."""
    row = {**row, "started_at": _timestamp(row.get("started_at"))}
    unknown = {k: v for k, v in row.items() if k not in COLUMNS}
    fields = [pa.field(name, typ) for name, typ in COLUMNS.items()]
    arrays = [pa.array([row.get(name)], type=typ) for name, typ in COLUMNS.items()]
    for name, value in unknown.items():
        array = pa.array([value])
        fields.append(pa.field(name, array.type))
        arrays.append(array)
    schema = pa.schema(fields)
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, default=str)})
    return pa.Table.from_arrays(arrays, schema=schema)


def check_schema_version(meta: dict[str, Any], where: str | Path) -> None:
    """Refuse results written by a newer moebench (older ones are upgraded on read)."""
    version = meta.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise StoreError(
            f"{where}: results schema version {version!r} is newer than this moebench "
            f"reads (up to {SCHEMA_VERSION}); upgrade moebench to read it"
        )


def upgrade_table(table: pa.Table) -> pa.Table:
    """A table of any older schema version in the current one: version 1 stored
    `started_at` as an ISO 8601 string."""
    names = table.column_names
    if "started_at" not in names:
        return table
    typ = table.schema.field("started_at").type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        try:
            stamps = pd.to_datetime(
                table.column("started_at").to_pandas(), utc=True, format="ISO8601"
            )
        except (ValueError, TypeError) as exc:
            raise StoreError(f"column 'started_at' holds text that is not ISO 8601: {exc}") from exc
        column = pa.array(stamps, type=_T)
        table = table.set_column(names.index("started_at"), "started_at", column)
    return table


def _nullable_dtype(arrow_type: pa.DataType) -> Any:
    if pa.types.is_integer(arrow_type):
        return pd.Int64Dtype()
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    return None


def to_frame(table: pa.Table) -> pd.DataFrame:
    """The table as a DataFrame: integer and boolean columns nullable (pandas would make
    an integer column with a null float64), list columns as arrays, timestamps as is."""
    return table.to_pandas(types_mapper=_nullable_dtype)


_REQUIRED_COLUMNS = ("case_id", "impl", "status")


def check_results_table(table: pa.Table, path: Path | str) -> None:
    """StoreError unless `table` is a moebench results table: the identity columns
    present, and every known column of its type's kind (numbers, text, flags, lists)."""
    missing = [name for name in _REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        shown = ", ".join(table.column_names[:8]) or "none"
        more = ", ..." if len(table.column_names) > 8 else ""
        raise StoreError(
            f"{path} is not a moebench results table: no column {', '.join(missing)} "
            f"(its columns: {shown}{more})"
        )
    for name in table.column_names:
        expected = COLUMNS.get(name)
        if expected is None:
            continue  # an implementation's own column
        actual = table.schema.field(name).type
        if not pa.types.is_null(actual) and _kind(actual) != _kind(expected):
            raise StoreError(
                f"{path}: column {name!r} holds {_kind(actual)} ({actual}), where a "
                f"moebench results table has {_kind(expected)}"
            )


def _kind(typ: pa.DataType) -> str:
    if pa.types.is_integer(typ) or pa.types.is_floating(typ):
        return "numbers"
    if pa.types.is_boolean(typ):
        return "flags"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "text"
    if pa.types.is_timestamp(typ):
        return "times"
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return "lists" if pa.types.is_null(typ.value_type) else f"lists of {_kind(typ.value_type)}"
    return str(typ)
