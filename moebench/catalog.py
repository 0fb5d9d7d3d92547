"""The built-in suites (`moebench suites`) and how a suite argument is found.

The suites are the TOML files of the top-level `suites/` folder of the source tree,
installed as the package `moebench.suites`, so they are there wherever moebench is
installed:

    moebench suites                 # name, cases on cpu and on cuda, description
    moebench run smoke              # a built-in suite, by name
    moebench run suites/smoke.toml  # or any suite file, by path

A path that exists wins over a built-in of the same name.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moebench.console import say

COMMAND = "suites"
HELP = "list the built-in suites and their case counts per device"
EXIT_OK = 0
DEVICES = ("cpu", "cuda")


def builtin_suites() -> dict[str, Path]:
    """Name -> file of every built-in suite, sorted by name."""
    try:
        folder = resources.files("moebench.suites")
        entries = [Path(str(entry)) for entry in folder.iterdir()]
    except ModuleNotFoundError:
        # Not installed, imported from a source checkout (PYTHONPATH=.): the package
        # `moebench.suites` is mapped onto the checkout's suites/ folder only by an install.
        checkout = Path(__file__).resolve().parent.parent / "suites"
        entries = list(checkout.iterdir()) if checkout.is_dir() else []
    found = {entry.stem: entry for entry in entries if entry.name.endswith(".toml")}
    return dict(sorted(found.items()))


def resolve_suite(spec: str | Path) -> Path:
    """The suite file for `spec`: an existing path, or the name of a built-in suite
    ("smoke" or "smoke.toml"). A spec that is neither is returned as given, so that the
    suite loader reports the missing file (with the built-in names, see `suite_hint`)."""
    path = Path(spec)
    if path.exists():
        return path
    if path.parent == Path(".") and path.suffix in ("", ".toml"):
        return builtin_suites().get(path.stem, path)
    return path


def suite_hint() -> str:
    """A sentence naming the built-in suites, for the message of a missing suite file."""
    return f"built-in suites (run them by name): {', '.join(builtin_suites())}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`moebench suites` takes no options."""


def main(args: argparse.Namespace, console: Console) -> int:
    """Print the built-in suites. One that does not load for a device (it names a
    plugin's implementation that is not installed, or one that runs only on the other
    device) shows "-" there and the first reason."""
    from moebench.suite import SuiteError, count_cases

    table = Table(title="built-in suites (moebench run NAME)")
    table.add_column("name")
    for device in DEVICES:
        table.add_column(f"{device} cases", justify="right")
    table.add_column("description")
    # first problem -> suite -> the devices it stops that suite on
    reasons: dict[str, dict[str, list[str]]] = {}
    for name, path in builtin_suites().items():
        counts, description = [], _raw_description(path)
        for device in DEVICES:
            try:
                count, description = count_cases(path, device)
                counts.append(str(count))
            except SuiteError as exc:
                counts.append("-")
                reasons.setdefault(exc.problems[0], {}).setdefault(name, []).append(device)
        table.add_row(name, *counts, escape(description))
    console.print(table)
    for reason, stopped in reasons.items():
        where = ", ".join(f"{name} ({', '.join(devices)})" for name, devices in stopped.items())
        say(console, (f"does not load: {where}: {reason}", "dim"))
    return EXIT_OK


def _raw_description(path: Path) -> str:
    """[suite] description read without validating the suite, for one that does not load."""
    import tomllib

    try:
        description = tomllib.loads(path.read_text(encoding="utf-8"))["suite"]["description"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return ""
    return description if isinstance(description, str) else ""
