"""`moebench run`: load a suite, filter and shard its cases, ask before a very large
one, run them (`moebench.runner`) with a progress bar or a line per case, and print the
summary and the exit code (below)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from rich.console import Console

from moebench.console import error, resume_command, say, warning, without_resume
from moebench.terminal import (
    STATUS_STYLE,
    LineProgress,
    failure_reason,
    noise_note,
    print_failures,
    print_summary,
)

COMMAND = "run"
HELP = "run a suite into results/<run_id>/"
DESCRIPTION = "Run a suite's cases, one parquet row each, into results/<run_id>/."
EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
CONFIRM_CASES = 10_000  # a bigger suite needs --yes (or a y on the terminal)
CASE_OVERHEAD_S = 1.0  # build, checks and memory window of one case, roughly
RUN_EXAMPLES = """examples:
  moebench run smoke                              # built-in: 44 tiny CPU cases
  moebench run suites/default.toml --device cuda  # a suite file, on the GPU
  moebench run smoke --filter impl=grouped,reference --filter 'E8k2'
  moebench run smoke --plugin my_moe.py --impls my-moe,reference  # your layer
  moebench run default --shard 2/4                # a quarter (moebench merge)
  moebench run peers --budget-ms 3000 --max-repeats 400  # time cases longer
  moebench run default --resume default-20261125-182722-9706  # finish a run

"""
RUN_EXITS = """exit codes:
  0    every case ran (a case that failed is a row with its status and error)
  1    --strict, and a case is not ok; or a case's results could not be written
       (a full disk): the cases written are kept, and the command that
       resumes the run is printed
  2    bad input, one line each: a suite that does not load (file, table, key
       and what is allowed), a --filter that matches nothing, an --impls name
       that is no implementation or that leaves no case, a bad --out or
       --shard, a --budget-ms that is not a positive time under the suite's
       timeout, a --max-repeats below its min_repeats, a --resume of another
       suite's run, of a run in use or of an unknown run id (the known ones are
       listed), a suite of more than 10,000 cases without --yes
  130  interrupted (Ctrl-C, SIGTERM, SIGHUP): finished cases are kept, the
       results consolidated, and the exact command that resumes the run is
       printed"""
EXIT_CODES = RUN_EXAMPLES + "\n" + RUN_EXITS


# The progress bar's own width, in columns: rich's default (40) left a case's label
# a dozen columns at 80.
BAR_WIDTH = 20


class RichProgress:
    """Progress bar on a terminal: case i of N, the current case, elapsed time and ETA."""

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
                f" {case.label()}{failure_reason(row)}",
            )
        self.progress.advance(self.task)

    def stop(self) -> None:
        self.progress.stop()


def main(args: argparse.Namespace, console: Console) -> int:
    """Run the suite's cases (filtered, sharded) and print the summary; exit code."""
    from moebench.measure.timing import TimingPlan
    from moebench.plugins import PluginError, import_plugin
    from moebench.runner import FilterError, filter_cases, run_cases
    from moebench.shard import ShardError, parse_shard, select_shard
    from moebench.store import StoreError
    from moebench.suite import SuiteError, load_suite, with_impls

    shard_meta = {}
    notes: list[str] = []
    try:
        from_plugins = [name for spec in args.plugin for name in import_plugin(spec)]
        suite = load_suite(args.suite, device=args.device)
        if args.impls:
            suite, notes = with_impls(suite, [name.strip() for name in args.impls.split(",")])
        elif from_plugins and not set(from_plugins) & set(suite.impls):
            notes.append(
                f"--plugin registered {', '.join(from_plugins)}, which {suite.name} does not "
                f"run (it runs {', '.join(suite.impls)}): --impls "
                f"{','.join([*from_plugins, *suite.impls[:1]])} runs its cases with them"
            )
        unmatched: list[str] = []
        cases = filter_cases(suite.cases, args.filter, unmatched)
        if args.shard and cases:
            index, count = parse_shard(args.shard)
            shard_meta = {"shard": {"index": index, "count": count, "of_cases": len(cases)}}
            cases = select_shard(cases, index, count)
    except (SuiteError, FilterError, PluginError, ShardError) as exc:
        error(console, exc)
        return EXIT_BAD_INPUT
    for line in notes + unmatched:
        warning(console, line)
    if not cases:
        written = " ".join(f"--filter {expr}" for expr in args.filter)
        error(console, f"{written} leaves no case of {suite.path}")
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
    if problem := timing_override_problem(args, suite):
        error(console, problem)
        return EXIT_BAD_INPUT
    if distributed.is_follower():
        return distributed.follow(tuple(args.plugin))
    if args.resume:  # an unknown run id is said before the run's header, not after it
        from moebench.store import ResultStore, StoreError

        try:
            ResultStore.open(args.out, args.resume)
        except StoreError as exc:
            error(console, exc)
            return EXIT_BAD_INPUT
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
        budget_ms=suite.budget_ms if args.budget_ms is None else args.budget_ms,
        warmup=suite.warmup,
        warmup_ms=suite.warmup_ms,
        min_repeats=suite.min_repeats,
        max_repeats=suite.max_repeats if args.max_repeats is None else args.max_repeats,
    )
    overridden = ""
    if args.budget_ms is not None or args.max_repeats is not None:
        overridden = f"; timed {plan.budget_ms:g} ms, at most {plan.max_repeats} calls a case"
    say(
        console,
        (suite.name, "bold"),
        f": {len(cases)} cases on {suite.device} (timeout {suite.timeout_s:g} s per case"
        f"{overridden})",
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
    if outcome.write_failure:
        written = len(list((outcome.run_dir / "parts").glob("*.parquet")))
        error(
            console,
            f"{outcome.write_failure}: the run stopped; the {written} cases written are "
            f"kept in {outcome.run_dir}; make room, then continue with "
            f"`{resume_command(run_argv, outcome.run_id)}`",
        )
        return EXIT_FAIL
    if args.quiet:  # no progress lines said why a case failed: say it here
        print_failures(console, outcome.rows)
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


def timing_override_problem(args: argparse.Namespace, suite: Any) -> str | None:
    """What is wrong with `--budget-ms` and `--max-repeats` against `suite`, or None."""
    budget_ms, max_repeats = args.budget_ms, args.max_repeats
    if budget_ms is not None and not (math.isfinite(budget_ms) and budget_ms > 0):
        return f"--budget-ms must be a positive number of milliseconds, got {budget_ms:g}"
    if budget_ms is not None and budget_ms >= suite.timeout_s * 1e3:
        return (
            f"--budget-ms {budget_ms:g} is not under the suite's timeout of "
            f"{suite.timeout_s:g} s a case: every case would time out"
        )
    if max_repeats is not None and max_repeats < suite.min_repeats:
        return f"--max-repeats {max_repeats} is below the suite's min_repeats ({suite.min_repeats})"
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite and run's options."""
    parser.add_argument(
        "suite", help="a built-in suite's name (moebench suites) or a suite TOML file"
    )
    parser.add_argument("--device", help="override the suite's device: cpu, cuda, cuda:N, auto")
    parser.add_argument("--out", default="results", help="results root folder (default: results)")
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        help="keep cases matching KEY=V1,V2 (a value may hold * or ?) or a regex on the case"
        " label (repeatable)",
    )
    parser.add_argument("--resume", metavar="RUN_ID", help="finish run RUN_ID: only missing cases")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        help="import MODULE or FILE.py that registers implementations (repeatable)",
    )
    parser.add_argument(
        "--impls",
        metavar="A,B",
        help="run the suite's cases with these implementations instead of its own (their "
        "default options; cases one cannot run are left out, with a warning)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run cases in this process (no worker: no hard timeout, easier debugging)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="ranks to start for the expert-parallel cases, as torchrun --nproc-per-node N "
        "(default: the suite's largest world_size; cases needing more are skipped)",
    )
    parser.add_argument(
        "--devices",
        metavar="LIST",
        help="GPUs to spread single-device cases over, one worker pinned to each: "
        "'all' or e.g. cuda:0,cuda:1 (expert-parallel cases run after them)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, a torch.profiler pass per case: traces/<case_id>.json.gz, "
        "kernels.parquet, kernel_launches / device_busy_frac / host_sync_count columns",
    )
    parser.add_argument(
        "--nvtx",
        action="store_true",
        help="NVTX ranges for each case and its phases (for nsys profile moebench run ...)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="intra-op threads for CPU cases (default: the physical cores this process may "
        "use; cases under 20 MFLOP a call use 1); recorded in run.json",
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="run shard I of N (from 1): a deterministic share of the cases, balanced by "
        "expected cost; join the shards' runs with `moebench merge`",
    )
    parser.add_argument(
        "--budget-ms",
        type=float,
        metavar="MS",
        help="time each case for MS milliseconds instead of the suite's budget_ms (two "
        "layers a few percent apart need more calls than a sweep); in run.json's timing",
    )
    parser.add_argument(
        "--max-repeats",
        type=int,
        metavar="N",
        help="at most N timed calls a case instead of the suite's max_repeats (at least its "
        "min_repeats); with --budget-ms, so that the budget is not cut by the suite's cap",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if any case is not ok")
    parser.add_argument(
        "--yes",
        action="store_true",
        help=f"run a suite of more than {CONFIRM_CASES:,} cases without asking",
    )
    parser.add_argument(
        "--quiet", action="store_true",
        help="no progress bar (failed cases are listed after the table)",
    )  # fmt: skip
