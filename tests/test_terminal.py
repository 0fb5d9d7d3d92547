"""What `moebench run` prints: a table that fits the terminal, progress lines in logs."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from moebench.cli import main as cli_main
from moebench.store import read_run
from moebench.terminal import WIDE_COLUMNS, summary_table

REFERENCE_RUN = Path(__file__).parent.parent / "results" / "reference" / "smoke.parquet"


def _render(width: int | None) -> list[str]:
    rows = read_run(REFERENCE_RUN).to_dict("records")
    console = Console(width=width or 200, record=True, force_terminal=False)
    console.print(summary_table(rows, "smoke", width))
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 100, 120])
def test_table_fits_narrow_terminals(width: int) -> None:
    lines = _render(width)
    assert max(len(line) for line in lines) <= width
    text = "\n".join(lines)
    # Stacked: the implementation and its case are whole words, not one letter per cell.
    assert "reference" in text and "grouped" in text and "float32" in text
    assert "latency ms" in text and "tokens/s" in text


def test_table_is_wide_in_files() -> None:
    lines = _render(None)
    header = next(line for line in lines if "impl" in line)
    for column in ("shape", "tokens", "mode", "dtype", "p10-p90 ms", "peak MiB"):
        assert column in header
    assert max(len(line) for line in lines) < WIDE_COLUMNS + 20


def test_progress_lines_when_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "smoke", "--filter", "impl=dense", "--filter", "batch=1"]
    argv += ["--filter", "num_experts=4", "--in-process", "--out", str(tmp_path)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[1/2] ok dense D64F128 E4k1 T16 forward") and " ms" in lines[0]
    assert lines[1].startswith("[2/2] ok dense D64F128 E4k2")
