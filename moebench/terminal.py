"""What `moebench run` and `moebench show` print: the results table and, when output is
not a terminal (a CI log, a pipe), one progress line per case.

The table has two layouts: wide (one column per field, for files and terminals it fits
whole) and stacked (what ran and its numbers two to a cell, for narrower terminals: fits
100 columns, and 80 with the case text wrapped inside its cell). Nothing is cut to fit.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from moebench.console import bounded_width, brief_error, say
from moebench.report.data import case_label, is_true

STATUS_STYLE = {
    "ok": "green",
    "mismatch": "bold red",
    "error": "red",
    "oom": "magenta",
    "timeout": "yellow",
    "crashed": "bold magenta",
    "skipped": "dim",
}


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(value != value)
    except TypeError:  # pd.NA
        return True


def _fmt(value: Any, spec: str = ".3g") -> str:
    if _missing(value):
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):  # not a number (a foreign table): shown as it is
        return escape(str(value))


def _styled(text: str, style: str) -> str:
    """`text` literally, in `style` when there is one (markup for a rich table cell)."""
    return f"[{style}]{escape(text)}[/]" if style else escape(text)


def _noise(row: dict[str, Any]) -> str:
    """p90/p10 as 'x1.2', with 'noisy' in yellow when the case's timing is noise."""
    value = row.get("spread")
    if _missing(value):
        return "-"
    text = _fmt(value, ".2g")
    text = f"x{text}" if text[:1].isdigit() else text
    return f"[yellow]{text} noisy[/]" if row.get("noisy") is True else text


def noise_note(rows: list[dict[str, Any]]) -> str | None:
    """A line on the noisy cases of a run, or None when there are none."""
    noisy = sum(1 for row in rows if row.get("noisy") is True)
    if not noisy:
        return None
    return (
        f"{noisy} of {len(rows)} cases are noisy (p90/p10 over the device's limit, or the "
        "median still moving): do not rank them; rerun on a quieter machine"
    )


def _mib(value: Any) -> str:
    return "-" if _missing(value) else f"{value / 2**20:,.1f}"


def _cells(row: dict[str, Any]) -> dict[str, str]:
    status = row.get("status") or "?"
    shape = row.get("preset") or f"D{row.get('hidden')} F{row.get('ffn')}"
    shape += f" E{row.get('num_experts')} k{row.get('top_k')}"
    if row.get("routing") not in (None, "uniform"):
        shape += f" {row['routing']}"
    mode = str(row.get("mode")) + (", CUDA graph" if is_true(row.get("cuda_graph")) else "")
    spread = "-"
    if not _missing(row.get("latency_p10_ms")):
        spread = f"{_fmt(row['latency_p10_ms'])}-{_fmt(row.get('latency_p90_ms'))}"
    return {
        "impl": escape(str(row.get("impl"))),
        "shape": escape(shape),
        "tokens": escape(str(row.get("tokens"))),
        "mode": escape(mode),
        "dtype": escape(str(row.get("dtype"))),
        "status": _styled(str(status), STATUS_STYLE.get(str(status), "")),
        "latency": _fmt(row.get("latency_ms")),
        "spread": spread,
        "tokens_per_s": _fmt(row.get("tokens_per_s"), ",.0f"),
        "peak": _mib(row.get("peak_mem_bytes")),
        "noise": _noise(row),
        # a variant's distance from the base layer and its own check, each by its name
        "rel_err": _fmt(row.get("rel_err"), ".2e"),
        "fidelity_err": _fmt(row.get("fidelity_err"), ".2e"),
    }


def summary_table(rows: list[dict[str, Any]], title: str, width: int | None = None) -> Table:
    """One line per case (wide) where that table fits `width` whole, else two (stacked);
    width None: wide (a file or a log has no edge). Implementation names are never cut
    to an ellipsis: names that differ at their end (a library's backends,
    `hf-mixtral:eager` and `hf-mixtral:grouped_mm`) would read as one. The wide table is
    used unsqueezed, each name on one line; the stacked one folds a name longer than its
    column."""
    wide = _wide(rows, title)
    if width is None or natural_width(wide) <= width:
        return wide
    return _stacked(rows, title)


UNBOUNDED_COLUMNS = 100_000  # what a table measures against when nothing bounds it


def natural_width(table: Table) -> int:
    """The columns `table` takes when nothing squeezes it."""
    console = Console(width=UNBOUNDED_COLUMNS, force_terminal=False)
    return Measurement.get(console, console.options, table).maximum


def print_summary(console: Console, rows: list[dict[str, Any]], title: str) -> None:
    """`summary_table` sized for `console`, nothing cut: a terminal's width (or
    `$COLUMNS`, where the user set it), or in a file or a log the wide table at its
    natural width, however wide."""
    if (width := bounded_width(console)) is not None:
        console.print(summary_table(rows, title, width))
        return
    table = summary_table(rows, title)
    width = console.width  # print(width=) is capped at the console's width: widen it
    console.width = max(width, natural_width(table))
    try:
        console.print(table)
    finally:
        console.width = width


def print_failures(console: Console, rows: list[dict[str, Any]]) -> None:
    """A line for each case that did not finish ok: its status, the case, and why (the
    error's first sentences, `brief_error`), each whole in a log."""
    for row in rows:
        status = str(row.get("status") or "?")
        if status != "ok":
            say(
                console,
                (status, STATUS_STYLE.get(status, "red")),
                f" {case_label(row)}{failure_reason(row)}",
            )


def failure_reason(row: dict[str, Any]) -> str:
    """A failed row's error in brief (`brief_error`) after ": ", or "" where it has none."""
    return "" if _missing(row.get("error")) else f": {brief_error(str(row['error']))}"


def _wide(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=Text(title), show_lines=False)
    table.add_column("impl", overflow="fold")  # never an ellipsis, even squeezed
    columns = (
        ("shape", "left"),
        ("tokens", "right"),
        ("mode", "left"),
        ("dtype", "left"),
        ("status", "left"),
        ("latency ms", "right"),
        ("p10-p90 ms", "right"),
        ("spread", "right"),
        ("tokens/s", "right"),
        ("peak MiB", "right"),
        ("rel_err", "right"),
        ("fidelity_err", "right"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        c = _cells(row)
        table.add_row(
            c["impl"], c["shape"], c["tokens"], c["mode"], c["dtype"], c["status"],
            c["latency"], c["spread"], c["noise"], c["tokens_per_s"], c["peak"],
            c["rel_err"], c["fidelity_err"],
        )  # fmt: skip
    return table


def _stacked(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=Text(title), show_lines=True)
    table.add_column("impl / case", ratio=1, overflow="fold")
    table.add_column("status\nspread", no_wrap=True)
    table.add_column("latency ms\np10-p90", justify="right", no_wrap=True)
    table.add_column("tokens/s\npeak MiB", justify="right", no_wrap=True)
    table.add_column("rel_err\nfidelity", justify="right", no_wrap=True)
    for row in rows:
        c = _cells(row)
        table.add_row(
            f"{c['impl']}\n{c['shape']} T{c['tokens']} {c['mode']} {c['dtype']}",
            f"{c['status']}\n{c['noise']}",
            f"{c['latency']}\n{c['spread']}",
            f"{c['tokens_per_s']}\n{c['peak']}",
            f"{c['rel_err']}\n{c['fidelity_err']}",
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
