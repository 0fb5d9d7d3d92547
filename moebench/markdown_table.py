"""A run as one Markdown table (`moebench export RUN --format markdown`): every case's
latency and its distance from the physical floor, implementations side by side.

One row per case without its implementation (shape, mode, tokens and whatever else varies
in the run: dtype, routing, layers, a CUDA graph, ...), one column per implementation
(with its options, where it ran with several sets), cells `latency ms (latency / floor)`:
the floor is max(FLOPs / matmul rate, bytes touched / copy bandwidth) as measured in the
run (`roofline_frac` = floor / latency). `*` marks a noisy case, a status (`oom`,
`mismatch`, ...) a case that did not finish ok, an empty cell a case the run did not hold;
the fastest latency of a row that holds two or more is bold.
Made for READMEs, pull requests and closing notes, from the committed parquet, so the
table can be made again.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from moebench.compare.runs import number
from moebench.report.data import (
    ceilings_parts,
    is_true,
    options_text,
    run_ceilings,
    shape_label,
    timing_text,
    varies,
)

# Case fields that split rows when they vary in the run (besides shape, mode and tokens).
ROW_FIELDS = ("dtype", "routing", "layers", "world_size", "capacity_factor", "seed", "device")


def _cell(row: dict[str, Any], fastest: bool = False) -> str:
    if row.get("status") != "ok":
        return str(row.get("status") or "?")
    latency = number(row.get("latency_ms"))
    if latency is None:
        return "ok"
    text = f"**{latency:.3g}**" if fastest else f"{latency:.3g}"
    fraction = number(row.get("roofline_frac"))
    if fraction:
        text += f" ({1 / fraction:.2f}x)"
    return text + ("*" if is_true(row.get("noisy")) else "")


def _row_cells(by_column: dict[str, dict[str, Any]]) -> dict[str, str]:
    """A table row's cells by column, the fastest latency bold where two or more cells
    hold one."""
    latencies = {
        column: latency
        for column, row in by_column.items()
        if row.get("status") == "ok" and (latency := number(row.get("latency_ms"))) is not None
    }
    fastest = min(latencies, key=latencies.__getitem__) if len(latencies) > 1 else None
    return {column: _cell(row, column == fastest) for column, row in by_column.items()}


def _column(row: dict[str, Any]) -> str:
    options = options_text(row.get("options"))
    return f"{row['impl']} {options}" if options else str(row["impl"])


def _row_key(row: dict[str, Any], extra: list[str]) -> tuple[str, ...]:
    mode = str(row.get("mode"))
    if is_true(row.get("cuda_graph")):
        mode += ", CUDA graph"
    return (shape_label(row), mode, *(str(row.get(name)) for name in extra))


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _ceilings_text(meta: dict[str, Any]) -> str:
    parts = ceilings_parts(run_ceilings(meta))
    if not parts:
        return "no measured ceilings (no floor)"
    merged = " (the highest of its merged runs)" if meta.get("merged_from") else ""
    return "measured ceilings " + ", ".join(parts) + merged


def to_markdown(frame: pd.DataFrame, meta: dict[str, Any]) -> str:
    """The run `frame` (its run.json `meta`) as a Markdown document: a title, what the
    cells mean, and the table (rows in the run's order of shapes, then tokens)."""
    extra = [name for name in ROW_FIELDS if varies(frame, name)]
    records = frame.to_dict("records")
    columns: list[str] = []
    rows: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {}
    tokens_of: dict[tuple[str, ...], int] = {}
    for row in records:
        column = _column(row)
        if column not in columns:
            columns.append(column)
        key = _row_key(row, extra)
        tokens = int(row.get("tokens") or 0)
        full = (*key, str(tokens))
        tokens_of[full] = tokens
        rows.setdefault(full, {})[column] = row
    cells = {full: _row_cells(by_column) for full, by_column in rows.items()}
    # the run's order of shapes, then of modes (and other fields) within one, then tokens
    shape_seen = {key[0]: i for i, key in reversed(list(enumerate(cells)))}
    group_seen = {key[:-1]: i for i, key in reversed(list(enumerate(cells)))}
    order = sorted(
        cells, key=lambda key: (shape_seen[key[0]], group_seen[key[:-1]], tokens_of[key])
    )
    header = ["shape", "mode", *extra, "tokens", *columns]
    numeric = {len(header) - len(columns) - 1, *range(len(header) - len(columns), len(header))}
    rule = ["---:" if i in numeric else ":---" for i in range(len(header))]
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |", "|" + "|".join(rule) + "|"]
    for key in order:
        values = [*key, *(cells[key].get(column, "") for column in columns)]
        lines.append("| " + " | ".join(_escape(v) for v in values) + " |")
    run_id = meta.get("run_id") or (records[0].get("run_id") if records else "?")
    suite = meta.get("suite") or "run"
    title = f"# {suite}: latency ms (latency / floor)"
    legend = (
        f"Run {run_id}, {len(records)} cases; {_ceilings_text(meta)}"
        + (f"; timing: {timing}" if (timing := timing_text(meta)) else "")
        + ". A cell: the median "
        "latency in ms and, in brackets, latency / floor, where the floor is max(FLOPs / "
        "matmul rate, bytes of the experts touched / copy bandwidth). `*`: noisy (p90/p10 "
        "over the device's limit, or the median still moving). Bold: the row's fastest. A "
        "status: the case did not finish ok. Empty: the run does not hold that case. Made "
        "by `moebench export RUN --format markdown`."
    )
    return "\n".join([title, "", legend, "", *lines, ""])
