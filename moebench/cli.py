"""The `moebench` command: run, list, show, env, report, compare, export.

Exit codes: 0 done, 1 failure of what was asked (a regression, or --strict with failed
cases), 2 bad input (a message says what is wrong), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from moebench.console import error, resume_command, say, say_facts, warning, without_resume
from moebench.terminal import STATUS_STYLE, LineProgress, noise_note, print_summary

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
CONFIRM_CASES = 10_000  # a bigger suite needs --yes (or a y on the terminal)
CASE_OVERHEAD_S = 1.0  # build, checks and memory window of one case, roughly
RUN_EXAMPLES = """examples:
  moebench run smoke                              # built-in: 44 tiny CPU cases
  moebench run suites/default.toml --device cuda  # a suite file, on the GPU
  moebench run smoke --filter impl=grouped,reference --filter 'E8k2'
  moebench run smoke --plugin my_moe.py           # a plugin from a file
  moebench run default --shard 2/4                # a quarter (moebench merge)
  moebench run default --resume default-20261125-182722-9706  # finish a run

"""


# The progress bar's own width, in columns: rich's default (40) left a case's label
# a dozen columns at 80.
BAR_WIDTH = 20


class RichProgress:
    """Progress bar: case i of N, the current case, elapsed time and ETA."""

    def __init__(self, console: Console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        # The counters keep their width; the case's label takes what the terminal has
        # left and ends in an ellipsis (at 80 columns a long label squeezed the counters
        # to "3/…" and "0:00…").
        fixed = Column(no_wrap=True)
        self.progress = Progress(
            TextColumn("case", table_column=fixed),
            MofNCompleteColumn(table_column=fixed),
            BarColumn(bar_width=BAR_WIDTH, table_column=fixed),
            TimeElapsedColumn(table_column=fixed),
            TextColumn("eta", table_column=fixed),
            TimeRemainingColumn(table_column=fixed),
            TextColumn(
                "{task.description}",
                markup=False,
                table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"),
            ),
            console=console,
            transient=False,
            expand=True,
        )
        self.task: Any = None
        self.failed = 0

    def start(self, total: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("", total=total)

    def begin(self, case: Any) -> None:
        self.progress.update(self.task, description=case.label())

    def advance(self, case: Any, row: dict[str, Any]) -> None:
        if row.get("status") != "ok":
            self.failed += 1
            status = str(row.get("status"))
            say(
                self.progress.console,
                (status, STATUS_STYLE.get(status, "red")),
                f" {case.label()}: {row.get('error')}",
            )
        self.progress.advance(self.task)

    def stop(self) -> None:
        self.progress.stop()


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from moebench.measure.timing import TimingPlan
    from moebench.plugins import PluginError, import_plugin
    from moebench.runner import FilterError, filter_cases, run_cases
    from moebench.shard import ShardError, parse_shard, select_shard
    from moebench.store import StoreError
    from moebench.suite import SuiteError, load_suite

    shard_meta = {}
    try:
        for spec in args.plugin:
            import_plugin(spec)
        suite = load_suite(args.suite, device=args.device)
        unmatched: list[str] = []
        cases = filter_cases(suite.cases, args.filter, unmatched)
        if args.shard and cases:
            index, count = parse_shard(args.shard)
            shard_meta = {"shard": {"index": index, "count": count, "of_cases": len(cases)}}
            cases = select_shard(cases, index, count)
    except (SuiteError, FilterError, PluginError, ShardError) as exc:
        error(console, exc)
        return EXIT_BAD_INPUT
    for line in unmatched:
        warning(console, line)
    if not cases:
        error(console, f"--filter {args.filter} leaves no case of {suite.path}")
        return EXIT_BAD_INPUT
    if len(cases) > CONFIRM_CASES and not args.yes and not _confirm_size(cases, suite, console):
        return EXIT_BAD_INPUT
    # Expert parallelism (moebench.distributed): under torchrun, ranks other than 0 only
    # compute what rank 0 sends them; rank 0 runs the sweep below and writes the results.
    from moebench import distributed

    if problem := distributed.nproc_problem(args.nproc):
        error(console, problem)
        return EXIT_BAD_INPUT
    if args.threads is not None and args.threads < 1:
        error(console, f"--threads must be at least 1, got {args.threads}")
        return EXIT_BAD_INPUT
    if distributed.is_follower():
        return distributed.follow(tuple(args.plugin))
    gpus = None
    if args.devices:
        from moebench.devices import DevicesError, parse_devices

        try:
            gpus = parse_devices(args.devices)
        except DevicesError as exc:
            error(console, exc)
            return EXIT_BAD_INPUT
        if args.in_process and len(gpus) > 1:
            error(console, "--devices with several GPUs needs worker processes")
            return EXIT_BAD_INPUT
    from moebench.measure.phases import nvtx_available
    from moebench.measure.profile import ProfileOptions

    if args.nvtx and not nvtx_available():
        error(console, "--nvtx needs a CUDA build of torch (NVTX is not in this one)")
        return EXIT_BAD_INPUT
    profile = ProfileOptions(trace=args.profile, nvtx=args.nvtx)
    plan = TimingPlan(
        budget_ms=suite.budget_ms,
        warmup=suite.warmup,
        warmup_ms=suite.warmup_ms,
        min_repeats=suite.min_repeats,
        max_repeats=suite.max_repeats,
    )
    say(
        console,
        (suite.name, "bold"),
        f": {len(cases)} cases on {suite.device} (timeout {suite.timeout_s:g} s per case)",
    )
    run_argv = without_resume(getattr(args, "argv", None) or sys.argv[1:])
    progress = None
    if not args.quiet:  # a bar on a terminal; a line per case in a log
        progress = RichProgress(console) if console.is_terminal else LineProgress(console)
    try:
        outcome = run_cases(
            cases,
            suite_name=suite.name,
            plan=plan,
            timeout_s=suite.timeout_s,
            out_root=args.out,
            resume=args.resume,
            isolate=not args.in_process,
            plugins=tuple(args.plugin),
            progress=progress,
            nproc=args.nproc,
            gpus=gpus,
            meta={
                "suite_path": str(suite.path),
                "device": suite.device,
                "gpus": gpus,
                "profile": args.profile,
                "run_argv": run_argv,
                "timing": dataclasses.asdict(plan),
                **shard_meta,
            },
            profile=profile,
            threads=args.threads,
            warn=lambda message: warning(console, message),
        )
    except StoreError as exc:
        error(console, exc)
        return EXIT_BAD_INPUT
    print_summary(console, outcome.rows, f"run {outcome.run_id}")
    if note := noise_note(outcome.rows):
        say(console, (note, "yellow"))
    if outcome.skipped:
        say(console, f"{outcome.skipped} cases already done in {outcome.run_id} were skipped")
    failed = [r for r in outcome.rows if r.get("status") != "ok"]
    say(
        console,
        f"{len(outcome.rows) - len(failed)} ok, {len(failed)} not ok; results: "
        f"{outcome.results_path}",
    )
    if outcome.interrupted:
        say(
            console,
            (f"interrupted ({outcome.interrupted_by})", "yellow"),
            ": finished cases are saved; continue with "
            f"`{resume_command(run_argv, outcome.run_id)}`",
        )
        return EXIT_INTERRUPTED
    return EXIT_FAIL if (args.strict and failed) else EXIT_OK


def _confirm_size(cases: list[Any], suite: Any, console: Console) -> bool:
    """A suite of more than CONFIRM_CASES cases runs only when the user says so: on a
    terminal by answering y, elsewhere with --yes. Says its size and expected time."""
    warmup_s = suite.warmup_ms / 1e3 if suite.device.startswith("cuda") else 0.0
    hours = len(cases) * (suite.budget_ms / 1e3 + warmup_s + CASE_OVERHEAD_S) / 3600
    warmup = f" and {suite.warmup_ms:g} ms of warm-up" if warmup_s else ""
    message = (
        f"{suite.path} gives {len(cases):,} cases: at its budget of {suite.budget_ms:g} ms"
        f"{warmup} per case plus about {CASE_OVERHEAD_S:g} s to build and check each, about "
        f"{hours:,.1f} hours"
    )
    if sys.stdin.isatty():
        say(console, message)
        try:
            return input("run them all? [y/N] ").strip().lower() in ("y", "yes")
        except EOFError:
            return False
    error(console, f"{message}; pass --yes to run them (or --filter to run fewer)")
    return False


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    from moebench import registry
    from moebench.plugins import PluginError, import_plugin

    try:
        for spec in args.plugin:
            import_plugin(spec)
    except PluginError as exc:
        error(console, exc)
        return EXIT_BAD_INPUT
    table = Table(title="implementations")
    for column in ("name", "family", "kind", "devices", "dtypes", "description"):
        table.add_column(column)
    for info in registry.available().values():
        table.add_row(
            Text(info.name),
            Text(info.family),
            "exact" if info.exact else "variant",
            Text(",".join(info.devices)),
            Text(",".join(info.dtypes)),
            Text(info.description),
        )
    broken = registry.broken()
    for plugin in broken.values():
        table.add_row(
            Text(plugin.name),
            "-",
            Text("broken", style="red"),
            "-",
            "-",
            Text(f"{plugin.target}: {plugin.error}"),
        )
    console.print(table)
    console.print(presets_table())
    if broken:  # a CI step that checks its plugins fails here
        error(console, f"{len(broken)} plugin(s) failed to import")
        return EXIT_FAIL
    return EXIT_OK


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
    table.add_column("key")
    table.add_column("value")
    for key, value in env.items():
        if key != "gpus":
            table.add_row(Text(key), Text(str(value)))
    for gpu in env["gpus"]:
        table.add_row(f"gpu {gpu['index']}", Text(", ".join(f"{k}={v}" for k, v in gpu.items())))
    if not env["gpus"]:
        table.add_row("gpus", "none visible to torch (CPU runs only); NVML not queried")
    console.print(table)
    return EXIT_OK


RUN_EXITS = """exit codes:
  0    every case ran (a case that failed is a row with its status and error)
  1    --strict, and a case is not ok
  2    bad input, one line each: a suite that does not load (file, table, key
       and what is allowed), a --filter that matches nothing, a bad --out or
       --shard, a --resume of another suite's run, of a run in use or of an
       unknown run id (the known ones are listed), a suite of more than 10,000
       cases without --yes
  130  interrupted (Ctrl-C, SIGTERM, SIGHUP): finished cases are kept, the
       results consolidated, and the exact command that resumes the run is
       printed"""
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

    run = sub.add_parser(
        "run",
        help="run a suite into results/<run_id>/",
        description="Run a suite's cases, one parquet row each, into results/<run_id>/.",
        epilog=RUN_EXAMPLES + "\n" + RUN_EXITS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    run.add_argument("suite", help="a built-in suite's name (moebench suites) or a suite TOML file")
    run.add_argument("--device", help="override the suite's device: cpu, cuda, cuda:N, auto")
    run.add_argument("--out", default="results", help="results root folder (default: results)")
    run.add_argument(
        "--filter",
        action="append",
        default=[],
        help="keep cases matching KEY=V1,V2 or a regex on the case label (repeatable)",
    )
    run.add_argument("--resume", metavar="RUN_ID", help="finish run RUN_ID: only missing cases")
    run.add_argument(
        "--plugin",
        action="append",
        default=[],
        help="import MODULE or FILE.py that registers implementations (repeatable)",
    )
    run.add_argument(
        "--in-process",
        action="store_true",
        help="run cases in this process (no worker: no hard timeout, easier debugging)",
    )
    run.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="ranks to start for the expert-parallel cases, as torchrun --nproc-per-node N "
        "(default: the suite's largest world_size; cases needing more are skipped)",
    )
    run.add_argument(
        "--devices",
        metavar="LIST",
        help="GPUs to spread single-device cases over, one worker pinned to each: "
        "'all' or e.g. cuda:0,cuda:1 (expert-parallel cases run after them)",
    )
    run.add_argument(
        "--profile",
        action="store_true",
        help="after timing, a torch.profiler pass per case: traces/<case_id>.json.gz, "
        "kernels.parquet, kernel_launches / device_busy_frac / host_sync_count columns",
    )
    run.add_argument(
        "--nvtx",
        action="store_true",
        help="NVTX ranges for each case and its phases (for nsys profile moebench run ...)",
    )
    run.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="intra-op threads for CPU cases (default: the physical cores this process may "
        "use; cases under 20 MFLOP a call use 1); recorded in run.json",
    )
    run.add_argument(
        "--shard",
        metavar="I/N",
        help="run shard I of N (from 1): a deterministic share of the cases, balanced by "
        "expected cost; join the shards' runs with `moebench merge`",
    )
    run.add_argument("--strict", action="store_true", help="exit 1 if any case is not ok")
    run.add_argument(
        "--yes",
        action="store_true",
        help=f"run a suite of more than {CONFIRM_CASES:,} cases without asking",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(handler=cmd_run)

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
        module.COMMAND, help=module.HELP, **_exits(getattr(module, "EXIT_CODES", ""))
    )
    module.add_arguments(command)
    command.set_defaults(handler=lambda args, console: module.main(args, console))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moebench` console script."""
    # Logs and CI jobs are no terminal: give their tables room instead of rich's 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
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
