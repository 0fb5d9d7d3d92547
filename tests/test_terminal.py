"""What `moebench run` prints: a table that fits the terminal, progress lines in logs."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from moebench.cli import main as cli_main
from moebench.console import brief_error
from moebench.runner import run_cases
from moebench.store import read_run
from moebench.terminal import print_summary, summary_table
from tests.conftest import FAST_PLAN, tiny_case

REFERENCE_RUN = Path(__file__).parent.parent / "results" / "reference" / "smoke.parquet"
FAULTY_PLUGIN = str(Path(__file__).with_name("plugin_faulty.py"))

# What torch 2.11 says when a CUDA allocation fails, as the runner records it (a case of
# results/reference/h100-peers-v34/)
TORCH_OOM = (
    "OutOfMemoryError: CUDA out of memory. Tried to allocate 14.00 GiB. GPU 0 has a total "
    "capacity of 79.18 GiB of which 6.55 GiB is free. Including non-PyTorch memory, this "
    "process has 72.62 GiB memory in use. Of the allocated memory 64.05 GiB is allocated by "
    "PyTorch, and 7.76 GiB is reserved by PyTorch but unallocated. If reserved but "
    "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
    "to avoid fragmentation.  See documentation for Memory Management  (https://docs.pytorch"
    ".org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf) "
    "(at graph.py:869)"
)


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
    assert max(len(line) for line in lines) < 185  # the smoke run's table, unsqueezed


PEERS_RUN = REFERENCE_RUN.parent / "h200-peers" / "results.parquet"


def _first_cells(lines: list[str]) -> list[str]:
    """The stacked table's first column, one string per case (its lines joined)."""
    cases, current = [], ""
    for line in lines:
        if line.startswith(("├", "└")) and current:
            cases.append(current)
            current = ""
        elif line.startswith("│"):
            current += line.split("│")[1].strip()
    return cases


@pytest.mark.parametrize("terminal_width", [None, 80, 170])
def test_long_implementation_names_are_printed_whole(terminal_width: int | None) -> None:
    """Names that differ only at their end (a library's three backends) are never cut to
    `hf-mixtral:…`, which would make three rows read as one implementation: in a log the
    wide table keeps every column and each name on one line; a terminal too narrow for
    the wide table (here 80, and 170: under this run's wide table) gets the stacked one,
    which folds a long name onto the next line."""
    rows = read_run(PEERS_RUN).to_dict("records")
    names = {str(row["impl"]) for row in rows}
    assert len(names) >= 16 and "hf-deepseek-v3:grouped_mm" in names
    console = Console(
        width=terminal_width or 160, record=True, force_terminal=terminal_width is not None
    )
    print_summary(console, rows, "peers")
    lines = console.export_text().splitlines()
    assert "…" not in "\n".join(lines)
    if terminal_width is None:
        header = next(line for line in lines if "impl" in line)
        assert "fidelity_err" in header and header.rstrip().endswith("┃")
        assert all(any(name in line for line in lines) for name in names)
    else:
        assert max(len(line) for line in lines) <= terminal_width
        cells = _first_cells(lines)
        assert len(cells) == len(rows)
        for row, cell in zip(rows, cells):
            assert cell.startswith(str(row["impl"])), (row["impl"], cell)


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


def test_every_commands_help_fits_an_80_column_terminal(monkeypatch) -> None:
    """argparse wraps the options to the terminal; the examples and exit codes below
    them are written out by hand, so they are held to 80 columns here."""
    import argparse

    from moebench.cli import build_parser

    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    too_wide = [
        f"{name}: {line}"
        for name, command in commands.choices.items()
        for line in command.format_help().splitlines()
        if len(line) > 80
    ]
    assert len(commands.choices) >= 10 and not too_wide, "\n".join(too_wide)


def test_the_progress_bar_keeps_its_counters_at_80_columns() -> None:
    """A case's label longer than the terminal has left ends in an ellipsis; the
    counters, the elapsed time and the ETA keep their width (they were squeezed to
    "3/…" and "0:00…" by long labels at 80 columns)."""
    import types

    from rich.console import Console

    from moebench.run_command import RichProgress

    label = "grouped D64F128 E8k1 T128 forward float32 zipf:1.2 [grid] and more text"
    case = types.SimpleNamespace(label=lambda: label)
    for width in (80, 200):
        console = Console(width=width, record=True, force_terminal=True)
        progress = RichProgress(console)
        progress.start(44)
        for _ in range(3):
            progress.begin(case)
            progress.advance(case, {"status": "ok"})
        progress.progress.stop()
        console.print(progress.progress.get_renderable())
        (line,) = console.export_text().strip().splitlines()[-1:]
        assert len(line) <= width and " 3/44 " in line and " eta " in line, line
        assert line.endswith("…") if width == 80 else line.endswith(label), line


def test_shows_header_keeps_each_fact_whole_at_80_columns() -> None:
    """`moebench show` of a committed GPU run: at 80 columns its facts wrap between
    one another, never inside one (the start time, the commit, a ceiling); in a log the
    header is its three lines."""
    from moebench.cli import build_parser, cmd_show

    run = Path(__file__).parent.parent / "results" / "reference" / "h200-forward-v15"
    args = build_parser().parse_args(["show", str(run)])
    headers = {}
    for terminal in (True, False):
        console = Console(width=80 if terminal else 160, record=True, force_terminal=terminal)
        assert cmd_show(args, console) == 0
        lines = console.export_text().splitlines()
        headers[terminal] = lines[: next(i for i, line in enumerate(lines) if "timing" in line)]
    terminal, log = headers[True], headers[False]
    assert len(log) == 3 and all(len(line) <= 80 for line in terminal), terminal
    facts = [fact for line in log for fact in line.replace(", ", "  ").split("  ")]
    assert any(fact.startswith("git ") for fact in facts) and len(terminal) > len(log)
    for fact in facts:  # each fact of the log's lines stands whole on a terminal line
        assert any(fact in line for line in terminal), (fact, terminal)


@pytest.mark.parametrize("width", [80, 160])
def test_list_keeps_each_description_readable_at_any_width(width: int) -> None:
    """`moebench list` at 80 columns gave the description a dozen columns: a word a line,
    and "float32,bfl…". Narrow, each implementation's facts take one line and its
    description the width left; wide (a log), the six columns stay."""
    import argparse
    import re

    from moebench import registry
    from moebench.cli import cmd_list

    console = Console(width=width, record=True, force_terminal=True)
    assert cmd_list(argparse.Namespace(plugin=[]), console) == 0
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= width
    text = " ".join(re.sub(r"[│┃]", " ", line).strip() for line in lines)
    text = " ".join(text.split())
    grouped = registry.get("grouped")
    assert " ".join(grouped.description.split()) in text
    if width < 120:
        assert "dropless, exact; cpu,cuda; float32,bfloat16,float16" in text
        assert "…" not in console.export_text()
    else:
        assert any(
            line.split("│")[5].strip() == "float32,bfloat16,float16"
            for line in lines
            if "│ grouped " in line
        )


@pytest.mark.parametrize("columns", [None, "80", "100"])
def test_show_piped_keeps_to_columns_where_set(columns, monkeypatch, capsys) -> None:
    """`moebench show RUN | less`: piped output has no edge, so each case takes one wide
    line; but `COLUMNS=80 moebench show RUN | less` asks for 80 columns, and every line,
    facts and table, fits them (the table stacked)."""
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert cli_main(["show", str(REFERENCE_RUN)]) == 0
    lines = capsys.readouterr().out.splitlines()
    cases = len(read_run(REFERENCE_RUN))
    if columns is None:
        assert max(len(line) for line in lines) > 120  # the wide table, unsqueezed
        assert sum("reference" in line and "float32" in line for line in lines) > 0
        assert len(lines) < cases + 15  # one line a case, a few for the header
    else:
        assert max(len(line) for line in lines) <= int(columns), lines
        assert len(lines) > 2 * cases  # stacked: two lines a case


@pytest.mark.parametrize(
    ("error", "brief"),
    [
        (
            TORCH_OOM,
            "OutOfMemoryError: CUDA out of memory. Tried to allocate 14.00 GiB."
            " ... (at graph.py:869)",
        ),
        # short ones whole, brackets and all
        ("RuntimeError: [enforce fail at alloc.cpp:42] out of [grid] luck (at plugin.py:3)",) * 2,
        ("needs at least 42.5 GiB (weights 21.1 GiB) but cuda has 35.3 GiB free; not run",) * 2,
        ("ValueError: bad\n  shape", "ValueError: bad shape"),  # one line
        ("x" * 300, "x" * 156 + " ..."),  # no sentence: cut at 160
    ],
)
def test_a_failed_case_is_told_in_a_line(error: str, brief: str) -> None:
    assert brief_error(error) == brief


def test_show_says_why_each_case_failed(tmp_path, monkeypatch, capsys) -> None:
    """`moebench show RUN` after a run with failures: a line a failed case, its status,
    the case and the error's first sentences, each line within $COLUMNS."""
    cases = [tiny_case("grouped"), tiny_case("test-raises"), tiny_case("test-bracket-error")]
    outcome = run_cases(
        cases, suite_name="t", plan=FAST_PLAN, timeout_s=60, out_root=tmp_path,
        isolate=False, plugins=(FAULTY_PLUGIN,),
    )  # fmt: skip
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "80")
    assert cli_main(["show", str(outcome.run_dir)]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    text = " ".join(out.split())
    assert "error test-raises · D" in text
    assert "RuntimeError: build exploded on purpose (at plugin_faulty.py:" in text
    assert "out of [grid] luck" in text  # printed as written, not read as markup
    assert "error grouped" not in text and "ok grouped" not in text  # ok cases: the table


def test_a_quiet_run_says_why_a_case_failed(tmp_path, capsys) -> None:
    """`moebench run --quiet` prints no progress lines, where a failure's reason was said:
    the failed cases are listed after the table instead, each once."""
    from tests.test_bad_input import TINY_SUITE

    suite = tmp_path / "s.toml"
    suite.write_text(TINY_SUITE.replace('["reference", "grouped"]', '["grouped", "test-raises"]'))
    args = ["run", str(suite), "--out", str(tmp_path / "r"), "--in-process", "--quiet"]
    assert cli_main([*args, "--plugin", FAULTY_PLUGIN]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "build exploded on purpose" in line]
    assert len(lines) == 1 and lines[0].startswith("error test-raises"), out
    assert out.index("build exploded") < out.index("not ok; results:")
