"""Printing for the commands: user- and system-provided text always literally.

rich reads `[grid]` as markup and drops it; every message here is a `Text`, so a key like
`[grid]`, a suite named `exp[v2]` or an error `[enforce fail ...]` prints as written.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from rich.text import Text

DEFAULT_RESULTS_ROOT = "results"


# Where the runner says an error was raised: "... (at graph.py:869)"
_RAISED_AT = re.compile(r" \(at [^()\s]+:\d+\)$")
# A sentence's end: its full stop (or ! ?) before a space
_SENTENCE_END = re.compile(r"[.!?](?= )")


def brief_error(error: str, most: int = 160, sentences_past: int = 60) -> str:
    """`error` for a one-line mention of a failed case: its sentences up to the first
    that ends past `sentences_past` characters, at most `most` characters, with the
    runner's "(at file:line)" kept. torch's out-of-memory error is two sentences of
    fact ("CUDA out of memory. Tried to allocate 14.00 GiB.") and then 500 characters of
    advice; the row keeps the whole message (`moebench report` shows it).

    >>> brief_error("OutOfMemoryError: CUDA out of memory. Tried to allocate 14.00 GiB. "
    ...             "GPU 0 has a total capacity of 79.18 GiB. (at graph.py:869)")
    'OutOfMemoryError: CUDA out of memory. Tried to allocate 14.00 GiB. ... (at graph.py:869)'
    """
    text = " ".join(str(error).split())  # one line
    found = _RAISED_AT.search(text)
    raised_at = found.group(0) if found else ""
    body = text[: found.start()] if found else text
    cut = next(
        (body[: end.end()] for end in _SENTENCE_END.finditer(body) if end.end() >= sentences_past),
        body,
    )
    if len(cut) > most:
        cut = cut[: most - 4].rstrip() + " ..."
    elif len(cut) < len(body):
        cut += " ..."
    return cut + raised_at


def columns_set() -> bool:
    """Whether the user bounded the output's width with `$COLUMNS` (a number)."""
    return os.environ.get("COLUMNS", "").strip().isdigit()


# Logs and CI jobs are no terminal: their tables get this room instead of rich's 80 columns.
PIPED_COLUMNS = 160


def console_width() -> int | None:
    """The width to make the console with: the terminal's (None: rich asks it), or
    `$COLUMNS` where the user set it (rich reads it), else PIPED_COLUMNS when stdout is
    no terminal."""
    if sys.stdout.isatty() or columns_set():
        return None
    return PIPED_COLUMNS


def bounded_width(console: Any) -> int | None:
    """The columns output must fit: a terminal's width, or `$COLUMNS` where the user set
    it (rich reads it into `console.width`); None in a file or a log, which has no edge."""
    return console.width if console.is_terminal or columns_set() else None


def _print(console: Any, text: Text) -> None:
    """`text` wrapped at a terminal's edge; in a file or a log, each line whole (a log
    has no edge, and a line broken inside a message no longer greps)."""
    console.print(text, soft_wrap=bounded_width(console) is None)


def error(console: Any, message: object) -> None:
    """`error: MESSAGE` (a multi-line message keeps its lines)."""
    _print(console, Text.assemble(("error:", "red"), " ", str(message)))


def warning(console: Any, message: object) -> None:
    """`warning: MESSAGE`."""
    _print(console, Text.assemble(("warning:", "yellow"), " ", str(message)))


def say(console: Any, *parts: object | tuple[str, str]) -> None:
    """One line from literal parts; a (text, style) pair is styled, never parsed."""
    _print(
        console,
        Text.assemble(*(p if isinstance(p, tuple) else str(p) for p in parts)),  # type: ignore[arg-type]
    )


def say_facts(console: Any, facts: Sequence[str], separator: str = "  ") -> None:
    """Facts (`host vm`, `git 1a2b...`) one after another: on a terminal as many to a
    line as fit, none split across two (a timestamp or a commit stays whole); in a log,
    one line."""
    width = bounded_width(console)
    line = ""
    for fact in facts:
        if line and width and len(line) + len(separator) + len(fact) > width:
            say(console, line + separator.rstrip())
            line = fact
        else:
            line = f"{line}{separator}{fact}" if line else fact
    if line:
        say(console, line)


def without_resume(argv: Sequence[str]) -> list[str]:
    """`moebench run` arguments with any --resume (and its value) taken out."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            out.append(arg)
    return out


def resume_command(run_argv: Sequence[str], run_id: str) -> str:
    """The exact command that finishes run `run_id`: the arguments it was started with
    (`run_argv`, without --resume), --out made explicit, and --resume RUN_ID."""
    args = list(run_argv)
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", DEFAULT_RESULTS_ROOT]
    return shlex.join(["moebench", *args, "--resume", run_id])
