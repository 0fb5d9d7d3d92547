"""The `moebench` command: its parser, and the small commands list, show and env. The
others live in their own modules, each exposing COMMAND, HELP, add_arguments and main:
run (`moebench.run_command`), report, compare, export, suites, merge and init.

Exit codes: 0 done, 1 failure of what was asked (a regression, or --strict with failed
cases), 2 bad input (a message says what is wrong), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from moebench.console import console_width, error, say, say_facts, warning
from moebench.terminal import print_failures, print_summary

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    from moebench import registry
    from moebench.plugins import PluginError, import_plugin

    try:
        for spec in args.plugin:
            import_plugin(spec)
    except PluginError as exc:
        error(console, exc)
        return EXIT_BAD_INPUT
    broken = registry.broken()
    table = implementations_table(registry.available().values(), broken, console.width)
    console.print(table)
    console.print(presets_table())
    if broken:  # a CI step that checks its plugins fails here
        error(console, f"{len(broken)} plugin(s) failed to import")
        return EXIT_FAIL
    return EXIT_OK


# Below this many columns, list's six columns left the description a word a line: each
# implementation's facts go on one line and its description under them instead.
NARROW_LIST_COLUMNS = 120


def implementations_table(infos: Any, broken: Any, width: int) -> Table:
    """The registered implementations and the plugins that failed to import, as columns
    on a wide console, as name + (facts, then description) on a narrow one."""
    table = Table(title="implementations")
    if width < NARROW_LIST_COLUMNS:
        table.add_column("name", no_wrap=True)
        table.add_column("family, kind; devices; dtypes / description")
        for info in infos:
            facts = f"{info.family}, {'exact' if info.exact else 'variant'}; "
            facts += f"{','.join(info.devices)}; {','.join(info.dtypes)}"
            table.add_row(Text(info.name), Text.assemble((facts, "dim"), "\n", info.description))
        for plugin in broken.values():
            detail = Text.assemble(("broken", "red"), "\n", f"{plugin.target}: {plugin.error}")
            table.add_row(Text(plugin.name), detail)
        return table
    for column in ("name", "family", "kind", "devices", "dtypes", "description"):
        table.add_column(column)
    for info in infos:
        table.add_row(
            Text(info.name),
            Text(info.family),
            "exact" if info.exact else "variant",
            Text(",".join(info.devices)),
            Text(",".join(info.dtypes)),
            Text(info.description),
        )
    for plugin in broken.values():
        table.add_row(
            Text(plugin.name),
            "-",
            Text("broken", style="red"),
            "-",
            "-",
            Text(f"{plugin.target}: {plugin.error}"),
        )
    return table


def presets_table() -> Table:
    """The presets with their router conventions, and the keys that change one."""

    from moebench.presets import preset_rows
    from moebench.routing import ROUTER_FIELDS

    keys = ", ".join(f"{name} (default {value!r})" for name, value in ROUTER_FIELDS.items())
    table = Table(
        title="presets (suite key `preset`)",
        caption=escape(
            f"router keys, set in [grid] to depart from a preset or the base router: {keys}; "
            "topp, moepp, dsmoe, merging and hierarchical compute only the base router "
            "(other cases: skipped)"
        ),
    )
    for column in ("preset", "shape", "router convention"):
        table.add_column(column)
    for row in preset_rows():
        table.add_row(*row)
    return table


# run.json's switches of the `triton` layer (moebench.env), the state `moebench show`
# speaks of (the one that is not the default today) and its words for it.
SHOWN_SWITCHES = (
    ("gluon_ws", "off", "Gluon race off"),
    ("merge_tail", "off", "merged-tail race off"),
    ("triton_runoff", "off", "tuner run-off off"),
    ("shared_stream", "off", "shared experts after the routed ones"),
)


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    from moebench.report.data import ceilings_parts, run_ceilings, timing_text
    from moebench.resume import incompleteness
    from moebench.store import StoreError, read_metadata, read_run

    try:
        frame = read_run(args.run, root=args.root)
    except StoreError as exc:
        error(console, exc)
        return EXIT_BAD_INPUT
    try:
        meta = read_metadata(args.run, root=args.root)
    except StoreError as exc:  # the rows are still worth showing
        warning(console, f"{exc}; showing the cases without the run's facts")
        meta = {}
    env = meta.get("environment") if isinstance(meta.get("environment"), dict) else {}
    gpus = ", ".join(str(g.get("name", "?")) for g in env.get("gpus") or [] if isinstance(g, dict))
    run_id = meta.get("run_id", args.run)
    # moebench's own kernels launched with programmatic dependent launch, and past the
    # JIT's dispatch (moebench.fast_launch), where recorded
    launches = [
        f"{name} {env[key]}"
        for key, name in (("dependent_launch", "dependent launch"), ("fast_launch", "fast launch"))
        if env.get(key)
    ]
    # the layer's switches: said only where not in today's default state
    launches += [words for key, state, words in SHOWN_SWITCHES if env.get(key) == state]
    started = _to_the_second(meta.get("started_at", "?"))
    say_facts(console, [f"run {run_id}", f"suite {meta.get('suite', '?')}", f"started {started}"])
    say_facts(
        console,
        [f"host {env.get('host', '?')}", f"gpu {gpus or 'none'}", f"torch {env.get('torch', '?')}",
         f"git {env.get('git_sha') or 'none'}", *launches],
    )  # fmt: skip
    if ceilings := ceilings_parts(run_ceilings(meta)):
        say_facts(console, ["ceilings " + ceilings[0], *ceilings[1:]], separator=", ")
    if timing := timing_text(meta):
        say(console, "timing " + timing)
    rows = frame.to_dict("records")
    if note := incompleteness(meta, len(rows), args.root):
        warning(console, note)
    if not rows:
        return EXIT_OK
    print_summary(console, rows, f"{len(rows)} cases")
    print_failures(console, rows)
    return EXIT_OK


def _to_the_second(timestamp: object) -> str:
    """An ISO timestamp without its fraction of a second (as written otherwise)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(timestamp)).isoformat(timespec="seconds")
    except ValueError:
        return str(timestamp)


def cmd_env(args: argparse.Namespace, console: Console) -> int:
    from moebench.env import collect_environment

    env = collect_environment()
    if args.json:
        print(json.dumps(env, indent=2, default=str))
        return EXIT_OK
    table = Table(title="what moebench sees", show_header=False)
    table.add_column("key", no_wrap=True)
    table.add_column("value")
    for key, value in environment_rows(env):
        table.add_row(Text(key), Text(value))
    for gpu in env["gpus"]:
        table.add_row(f"gpu {gpu['index']}", Text(", ".join(f"{k}={v}" for k, v in gpu.items())))
    if not env["gpus"]:
        table.add_row("gpus", "none visible to torch (CPU runs only); NVML not queried")
    console.print(table)
    return EXIT_OK


# What a missing fact means, said instead of Python's None (`moebench env`).
ENV_NONE = {
    "torch_cuda": "none (a CPU build of torch)",
    "triton": "not installed",
    "dependent_launch": "n/a (needs CUDA and Triton)",
    "fast_launch": "n/a (needs CUDA and Triton)",
    "gluon_ws": "n/a (needs CUDA and Triton)",
    "merge_tail": "n/a (needs CUDA and Triton)",
    "triton_runoff": "n/a (needs CUDA and Triton)",
    "shared_stream": "n/a (needs CUDA and Triton)",
}


def environment_rows(env: dict[str, Any]) -> list[tuple[str, str]]:
    """`collect_environment()`'s facts as (key, value) lines for a person: None said in
    words, moebench's commit and source in one line, the working directory's repository
    and each plugin on a line of their own (the JSON keeps the dicts)."""
    from moebench.provenance import source_phrase

    provenance = env.get("provenance") or {}
    rows = []
    for key, value in env.items():
        if key in ("gpus", "provenance", "git_sha"):
            continue
        if key == "moebench" and provenance.get("moebench"):
            value = f"{value} ({source_phrase(provenance['moebench'])})"
        rows.append((key, ENV_NONE.get(key, "none") if value is None else str(value)))
    repository = provenance.get("repository")
    if repository:
        commit = str(repository.get("commit") or "no commit")[:10]
        dirty = ", dirty" if repository.get("dirty") else ""
        rows.append(("repository", f"{repository['root']} at {commit}{dirty}"))
    else:
        rows.append(("repository", "none (the working directory is in no git work tree)"))
    for plugin in provenance.get("plugins") or []:
        name = plugin.get("entry_point") or plugin.get("plugin")
        target = plugin.get("target") or plugin.get("plugin")
        dist = plugin.get("distribution")
        origin = f" from {dist} {plugin.get('version')}" if dist else ""
        rows.append((f"plugin {name}", f"{target}{origin}"))
    return rows


LIST_EXITS = """exit codes:
  0    listed
  1    a plugin failed to import (listed as a 'broken' row with its error)
  2    a --plugin that cannot be imported"""
SHOW_EXITS = """exit codes:
  0    shown; a run with no or not all cases says so, with the command that
       finishes it
  2    an unknown run, or a file that is not a moebench results table (the
       message says why)"""
ENV_EXITS = """exit codes:
  0    printed"""


def _exits(text: str) -> dict[str, Any]:
    """add_parser keywords that print `text` (exit codes and messages) below the help,
    and take no abbreviated option (`build_parser`)."""
    if not text:
        return {"allow_abbrev": False}
    return {
        "epilog": text,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
        "allow_abbrev": False,
    }


class _VersionAction(argparse.Action):
    """`--version`: moebench's version and source (`provenance.version_line`), found only
    when asked (it runs git), then exit 0."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print moebench's version and commit, then exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from moebench.provenance import version_line

        print(version_line())
        parser.exit()


class _OutIsRunsOption(argparse.Action):
    """`--out DIR` given to a command that reads runs: `moebench run`'s name for the
    results folder, which these commands call --root. Refused with that said, rather
    than taken as an abbreviation of `--output` (a file written there, the runs looked
    up under results/)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=1, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, _: object, values: Any, *rest) -> None:
        writes = any("--output" in action.option_strings for action in parser._actions)
        output = "; the file it writes is -o/--output" if writes else ""
        parser.error(
            f"--out is where `moebench run` writes runs: this command reads them from "
            f"--root {values[0]}{output}"
        )


def _refuse_out_where_root(sub: Any) -> None:
    """`--out` on every command that looks runs up under --root but has no --out of its
    own (`_OutIsRunsOption`)."""
    for command in sub.choices.values():
        options = {option for action in command._actions for option in action.option_strings}
        if "--root" in options and "--out" not in options:
            command.add_argument("--out", action=_OutIsRunsOption)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated options: `report --out DIR` must not silently mean `--output DIR`.
    parser = argparse.ArgumentParser(
        prog="moebench",
        description="Benchmark and profile Mixture-of-Experts layers.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", "-V", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)

    _add_optional_command(sub, "moebench.run_command")
    lst = sub.add_parser(
        "list", help="list implementations (and broken plugins)", **_exits(LIST_EXITS)
    )
    lst.add_argument("--plugin", action="append", default=[], help="import MODULE or FILE.py")
    lst.set_defaults(handler=cmd_list)

    show = sub.add_parser("show", help="print a run's cases", **_exits(SHOW_EXITS))
    show.add_argument("run", help="run id, run folder, parquet file, or 'latest'")
    show.add_argument("--root", default="results", help="results root folder")
    show.set_defaults(handler=cmd_show)

    env = sub.add_parser(
        "env", help="what the harness sees: devices, NVML, versions", **_exits(ENV_EXITS)
    )
    env.add_argument("--json", action="store_true", help="print JSON")
    env.set_defaults(handler=cmd_env)

    for module in (
        "moebench.report.command",
        "moebench.compare",
        "moebench.export",
        "moebench.catalog",
        "moebench.merge",
        "moebench.scaffold",
    ):
        _add_optional_command(sub, module)
    _refuse_out_where_root(sub)
    return parser


def _add_optional_command(sub: Any, module_name: str) -> None:
    """Commands living in their own module expose COMMAND, add_arguments and main."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise  # the command's module exists but something it imports is missing
        return
    command = sub.add_parser(
        module.COMMAND,
        help=module.HELP,
        description=getattr(module, "DESCRIPTION", None),
        **_exits(getattr(module, "EXIT_CODES", "")),
    )
    module.add_arguments(command)
    command.set_defaults(handler=lambda args, console: module.main(args, console))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moebench` console script."""
    console = Console(width=console_width())
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    from moebench.interrupt import interrupt_name, signals_interrupt

    try:
        with signals_interrupt():  # SIGTERM and SIGHUP end a command as Ctrl-C does
            return int(args.handler(args, console))
    except KeyboardInterrupt as exc:
        say(console, (f"interrupted ({interrupt_name(exc)})", "yellow"))
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
