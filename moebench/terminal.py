"""What `moebench run` and `moebench show` print: the results table and, when output is
not a terminal (a CI log, a pipe), one progress line per case.

The table has two layouts: wide (one column per field, for files and terminals of
WIDE_COLUMNS or more) and stacked (what ran and its numbers two to a cell, for narrower
terminals: fits 100 columns, and 80 with the case text wrapped inside its cell).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

STATUS_STYLE = {
    "ok": "green",
    "mismatch": "bold red",
    "error": "red",
    "oom": "magenta",
    "timeout": "yellow",
    "crashed": "bold magenta",
    "skipped": "dim",
}
# The wide table needs about this many columns before rich squeezes its cells.
WIDE_COLUMNS = 140


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(value != value)
    except TypeError:  # pd.NA
        return True


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if _missing(value) else format(value, spec)


def _mib(value: Any) -> str:
    return "-" if _missing(value) else f"{value / 2**20:,.1f}"


def _cells(row: dict[str, Any]) -> dict[str, str]:
    status = row.get("status") or "?"
    shape = row.get("preset") or f"D{row.get('hidden')} F{row.get('ffn')}"
    shape += f" E{row.get('num_experts')} k{row.get('top_k')}"
    if row.get("routing") not in (None, "uniform"):
        shape += f" {row['routing']}"
    err = row.get("rel_err")
    if _missing(err):
        err = row.get("fidelity_err")
    spread = "-"
    if not _missing(row.get("latency_p10_ms")):
        spread = f"{row['latency_p10_ms']:.3g}-{row['latency_p90_ms']:.3g}"
    return {
        "impl": escape(str(row.get("impl"))),
        "shape": escape(shape),
        "tokens": str(row.get("tokens")),
        "mode": str(row.get("mode")),
        "dtype": str(row.get("dtype")),
        "status": f"[{STATUS_STYLE.get(status, '')}]{escape(status)}[/]",
        "latency": _fmt(row.get("latency_ms")),
        "spread": spread,
        "tokens_per_s": _fmt(row.get("tokens_per_s"), ",.0f"),
        "peak": _mib(row.get("peak_mem_bytes")),
        "err": _fmt(err, ".2e"),
    }


def summary_table(rows: list[dict[str, Any]], title: str, width: int | None = None) -> Table:
    """One line per case (wide), or two (stacked) when `width` is below WIDE_COLUMNS;
    width None: wide (a file or a log has no edge)."""
    if width is None or width >= WIDE_COLUMNS:
        return _wide(rows, title)
    return _stacked(rows, title)


def _wide(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    columns = (
        ("impl", "left"),
        ("shape", "left"),
        ("tokens", "right"),
        ("mode", "left"),
        ("dtype", "left"),
        ("status", "left"),
        ("latency ms", "right"),
        ("p10-p90 ms", "right"),
        ("tokens/s", "right"),
        ("peak MiB", "right"),
        ("err", "right"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        c = _cells(row)
        table.add_row(
            c["impl"], c["shape"], c["tokens"], c["mode"], c["dtype"], c["status"],
            c["latency"], c["spread"], c["tokens_per_s"], c["peak"], c["err"],
        )  # fmt: skip
    return table


def _stacked(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, show_lines=True)
    table.add_column("impl / case", ratio=1, overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("latency ms\np10-p90", justify="right", no_wrap=True)
    table.add_column("tokens/s\npeak MiB", justify="right", no_wrap=True)
    table.add_column("err", justify="right", no_wrap=True)
    for row in rows:
        c = _cells(row)
        table.add_row(
            f"{c['impl']}\n{c['shape']} T{c['tokens']} {c['mode']} {c['dtype']}",
            c["status"],
            f"{c['latency']}\n{c['spread']}",
            f"{c['tokens_per_s']}\n{c['peak']}",
            c["err"],
        )
    return table


class LineProgress:
    """Progress for logs: one plain line per finished case (no bar to redraw).

    `[3/44] ok grouped D64F128 E4k2 T16 forward float32 uniform  0.21 ms`
    """

    def __init__(self, console: Console):
        self.console = console
        self.total = 0
        self.done = 0

    def start(self, total: int) -> None:
        self.total = total

    def begin(self, case: Any) -> None:
        pass

    def advance(self, case: Any, row: dict[str, Any]) -> None:
        self.done += 1
        status = str(row.get("status"))
        line = f"[{self.done}/{self.total}] {status} {case.label()}"
        if status == "ok":
            line += f"  {_fmt(row.get('latency_ms'))} ms"
        else:
            line += f": {row.get('error')}"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        pass
