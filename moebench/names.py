"""Names that become paths: suite names, run ids, case ids, file names made from plugin
strings. One rule for all of them, so nothing is ever written outside the results root.

A safe name is 1 to 100 characters of letters, digits, '.', '_', '+' and '-', starting
with a letter or a digit: no path separator, no '..', no leading dot, no space, nothing
a shell or rich markup reads specially.
"""

from __future__ import annotations

import re
from pathlib import Path

MAX_NAME_CHARS = 100
SAFE_NAME_CHARS = "letters, digits, '.', '_', '+', '-' (starting with a letter or digit)"
_SAFE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+-]{{0,{MAX_NAME_CHARS - 1}}}")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._+-]+")


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a folder or file of a run, or None when it can.

    >>> name_problem("smoke"), name_problem("../x") is not None
    (None, True)
    """
    if _SAFE_NAME.fullmatch(name) and ".." not in name:
        return None
    shown = name if len(name) <= 60 else name[:57] + "..."
    return f"{shown!r} cannot name a folder; allowed: {SAFE_NAME_CHARS}, at most {MAX_NAME_CHARS}"


def sanitize_name(text: str, fallback: str = "suite") -> str:
    """`text` made safe: runs of other characters become '-', '..' becomes '.'.

    >>> sanitize_name("exp[v2] final"), sanitize_name("../../x")
    ('exp-v2-final', 'x')
    """
    name = _UNSAFE_RUN.sub("-", text)
    while ".." in name:
        name = name.replace("..", ".")
    name = name.strip(".-_+")[:MAX_NAME_CHARS]
    return name if name and not name_problem(name) else fallback


def inside(root: Path, path: Path) -> bool:
    """True when `path` (resolved, links followed) lies in `root` or is `root`."""
    root_resolved, resolved = root.resolve(), path.resolve()
    return resolved == root_resolved or root_resolved in resolved.parents
