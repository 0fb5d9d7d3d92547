"""What a comparison reads: a run's rows keyed by case id, and the words that name a row's
case (its fields, its label, its key among implementations of the same case)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from moebench.case import ALL_FIELDS
from moebench.store import StoreError, read_metadata, read_run

REQUIRED_COLUMNS = ("case_id", "impl", "status")
# Case fields that do not say which computation was measured, left out of the match key
# between implementations: options are an implementation's own knobs, preset a label.
NOT_IN_IMPL_KEY = ("impl", "options", "preset")
LABEL_FIELDS = ("preset", "hidden", "ffn", "num_experts", "top_k", "tokens", "mode", "dtype")


class CompareError(ValueError):
    """Inputs that cannot be compared (the message says why); exit code 2."""


@dataclass(frozen=True)
class Run:
    """One run's rows, keyed by case id, and its run-level facts."""

    name: str
    rows: dict[str, dict[str, Any]]
    meta: dict[str, Any]

    @property
    def impls(self) -> list[str]:
        return sorted({str(row.get("impl")) for row in self.rows.values()})

    def describe(self) -> str:
        """'run-id (cpu, AMD EPYC, git 6466b0a)'."""
        env = self.meta.get("environment") or {}
        gpus = ", ".join(g.get("name", "?") for g in env.get("gpus") or [])
        parts = [p for p in (self.meta.get("device"), gpus or env.get("cpu")) if p]
        if env.get("git_sha"):
            parts.append(f"git {str(env['git_sha'])[:7]}")
        return f"{self.name} ({', '.join(parts)})" if parts else self.name


def load_run(spec: str | Path, root: str | Path = "results") -> Run:
    """Read a run (id, folder, parquet file or 'latest') and check it can be compared."""
    try:
        frame = read_run(spec, root)
        meta = read_metadata(spec, root)
    except StoreError as exc:
        raise CompareError(str(exc)) from exc
    except (OSError, ValueError) as exc:  # unreadable metadata, a truncated file
        raise CompareError(f"cannot read results {str(spec)!r}: {exc}") from exc
    return run_from_frame(frame, str(meta.get("run_id") or _name_of(spec)), meta)


def _name_of(spec: str | Path) -> str:
    path = Path(spec)
    return path.parent.name if path.name == "results.parquet" else path.name


def run_from_frame(frame: pd.DataFrame, name: str, meta: dict[str, Any] | None = None) -> Run:
    """A Run from a results table; CompareError if it is not one or has duplicate ids."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise CompareError(
            f"{name}: not a moebench results table (missing columns {', '.join(missing)}; "
            f"it has {', '.join(map(str, sorted(frame.columns)[:12]))})"
        )
    rows: dict[str, dict[str, Any]] = {}
    duplicates = set()
    for row in frame.to_dict("records"):
        case_id = str(row["case_id"])
        if case_id in rows:
            duplicates.add(case_id)
        rows[case_id] = row
    if duplicates:
        raise CompareError(
            f"{name}: {len(duplicates)} case ids appear more than once (several runs stacked "
            "into one file?); compare one run at a time"
        )
    return Run(name, rows, dict(meta or {}))


def number(value: Any) -> float | None:
    """A finite-or-infinite float, or None for missing/NaN/non-numbers."""
    if value is None or isinstance(value, (str, bytes, list, tuple, dict)):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def plain_value(value: Any) -> Any:
    """A JSON-friendly scalar: numpy numbers made plain, NaN, infinities and pd.NA None."""
    if value is pd.NA:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def case_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The case fields of a row (those present), JSON-friendly."""
    names = (*ALL_FIELDS, "tokens")
    return {name: plain_value(row.get(name)) for name in names if name in row}


def impl_key(row: Mapping[str, Any]) -> str:
    """The case fields except the implementation's own, as a hashable key."""
    return fields_key(case_fields(row), (*NOT_IN_IMPL_KEY, "tokens"))


def fields_key(fields: Mapping[str, Any], leaving_out: Iterable[str]) -> str:
    """`fields` but those named in `leaving_out`, as a hashable key: cases that differ
    only there share it."""
    left_out = set(leaving_out)
    kept = {name: value for name, value in fields.items() if name not in left_out}
    return json.dumps(kept, sort_keys=True, default=str)


def shape_words(row: Mapping[str, Any]) -> list[str]:
    """The words of Case.label() minus the implementation, from a results row, plus the
    fields a label leaves out when they are not at their default (seed, world size,
    weight source, options): ['D64F128', 'E4k2', 'T16', 'forward', 'float32', 'uniform'],
    'graph' after them for a case timed as a CUDA graph."""
    f = {k: plain_value(row.get(k)) for k in (*LABEL_FIELDS, "routing", "seed", "world_size")}
    words = [
        str(f["preset"] or f"D{f['hidden']}F{f['ffn']}"),
        f"E{f['num_experts']}k{f['top_k']}",
        f"T{f['tokens']}",
    ]
    layers = plain_value(row.get("layers"))
    if layers not in (None, 1):
        words.append(f"L{layers}")
    words += [str(f["mode"]), str(f["dtype"]), str(f["routing"])]
    if plain_value(row.get("cuda_graph")) is True:
        words.append("graph")
    if f["world_size"] not in (None, 1):
        words.append(f"ws{f['world_size']}")
    if f["seed"] not in (None, 0):
        words.append(f"seed{f['seed']}")
    source = plain_value(row.get("weights"))
    if source not in (None, "", "random"):
        words.append(str(source))
    options = row.get("options")
    if options and options != "{}":
        words.append(str(options))
    return words


def shape_label(row: Mapping[str, Any]) -> str:
    """'D64F128 E4k2 T16 forward float32 uniform' (what Case.label says, minus impl)."""
    return " ".join(shape_words(row))


def case_label(row: Mapping[str, Any]) -> str:
    """'grouped D64F128 E4k2 T16 forward float32 uniform'."""
    return f"{row.get('impl')} {shape_label(row)}"


def row_status(row: Mapping[str, Any] | None) -> str | None:
    """A row's status as text (None when there is no row)."""
    return None if row is None else str(row.get("status"))


def row_error(row: Mapping[str, Any] | None) -> str:
    """A row's error message ('' when it has none, or there is no row)."""
    return "" if row is None or not row.get("error") else str(row.get("error"))
