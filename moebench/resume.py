"""Resuming a run: the same suite, one process at a time, nothing half-written kept.

`open_for_resume` opens an existing run folder under its lock, removes the temporaries an
interrupted writer left, refuses a suite whose resolved case list is not the one the run
was started with (naming the difference), or a timing other than the run's (a suite's
budget edited since, or `run --budget-ms` / `--max-repeats` left out of the resume: its
cases would be timed two ways under one run.json), and returns the cases already done (a
part that cannot be read is not done: a warning says so and the case runs again).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from moebench.case import Case
from moebench.console import resume_command
from moebench.store import ResultStore, StoreError

SHOWN_DIFFERENCES = 3


def open_for_resume(
    out_root: Path,
    run_id: str,
    cases: list[Case],
    suite_name: str,
    warn: Callable[[str], None] | None = None,
    timing: dict[str, Any] | None = None,
) -> tuple[ResultStore, set[str], dict[str, Any]]:
    """(the run's store, locked; the case ids done; its run.json) or StoreError; `timing`:
    how this command times a case (run.json's `timing`), refused if the run's differs."""
    store = ResultStore.open(out_root, run_id)
    store.lock()
    try:
        if (cleaned := store.clean_temporaries()) and warn is not None:
            warn(f"removed {cleaned} temporary file(s) an interrupted run left in {run_id}")
        try:
            meta = store.read_meta()
        except StoreError as exc:
            raise StoreError(
                f"cannot resume {run_id}: {exc}; its finished cases are in "
                f"{store.parts_dir} (start a new run, or `moebench show {store.run_dir}`)"
            ) from exc
        check_same_cases(store, meta, cases, suite_name)
        check_same_timing(store, meta, timing)
        if store.read_cases() is None:  # a run from before the list was kept: keep it now
            store.write_cases([(case.case_id, case.label()) for case in cases])
        done = store.done_case_ids(warn)
    except BaseException:
        store.unlock()
        raise
    return store, done, meta


def check_same_timing(
    store: ResultStore, meta: dict[str, Any], timing: dict[str, Any] | None
) -> None:
    """StoreError unless `timing` agrees with the run's recorded timing on every key both
    hold (a run from before a key was recorded is not judged on it)."""
    started = meta.get("timing") or {}
    differ = sorted(
        key for key in started.keys() & (timing or {}).keys() if started[key] != timing[key]
    )
    if not differ:
        return
    was = ", ".join(f"{key} {started[key]:g}" for key in differ)
    now = ", ".join(f"{key} {timing[key]:g}" for key in differ)
    how = ""
    if meta.get("run_argv"):
        command = resume_command(meta["run_argv"], store.run_id)
        how = f"; the command that finishes it as it started: `{command}`"
    raise StoreError(
        f"cannot resume {store.run_id}: it was timed with {was}, this command times with "
        f"{now} (its cases would be timed two ways){how}"
    )


def check_same_cases(
    store: ResultStore, meta: dict[str, Any], cases: list[Case], suite_name: str
) -> None:
    """StoreError unless `cases` are the cases `store`'s run was started with."""
    started = store.read_cases()
    now = {case.case_id: case.label() for case in cases}
    if started is None:  # a run from before the case list was kept: the suite name and
        # the cases done are what can be checked
        if meta.get("suite") not in (None, suite_name):
            raise StoreError(
                f"cannot resume {store.run_id} with suite {suite_name!r}: it was started "
                f"with suite {meta.get('suite')!r}"
            )
        started = {case_id: case_id for case_id in store.done_case_ids()}
        extra = [case_id for case_id in started if case_id not in now]
        missing: list[str] = []
    else:
        extra = [case_id for case_id in started if case_id not in now]
        missing = [case_id for case_id in now if case_id not in started]
    if not extra and not missing:
        return
    parts = []
    if extra:
        parts.append(f"{len(extra)} case(s) of the run are not in it ({_some(extra, started)})")
    if missing:
        parts.append(f"{len(missing)} of its case(s) are not in the run ({_some(missing, now)})")
    if meta.get("run_argv"):
        how = f": `{resume_command(meta['run_argv'], store.run_id)}`"
    else:  # (a run from before run.json kept its command line)
        how = f" ({meta['suite_path']})" if meta.get("suite_path") else ""
    raise StoreError(
        f"cannot resume {store.run_id}: the suite and filters now give another case list "
        f"than the run was started with: {'; '.join(parts)}. Resume with the suite file "
        f"and --filter/--device/--impls options the run was started with{how}"
    )


def _some(case_ids: list[str], labels: dict[str, str]) -> str:
    shown = ", ".join(f"'{labels.get(c, c)}'" for c in case_ids[:SHOWN_DIFFERENCES])
    return shown + (", ..." if len(case_ids) > SHOWN_DIFFERENCES else "")


def incompleteness(meta: dict[str, Any], finished: int, root: str) -> str | None:
    """A sentence saying that a run has no or not all its cases, and how to finish it;
    None for a complete run (or a table without run facts, which cannot say)."""
    total = meta.get("cases_total")
    if not isinstance(total, int) or finished >= total:
        return None
    if meta.get("interrupted"):
        why = "it was interrupted"
    elif meta.get("finished_at"):
        why = "some cases were not written"
    else:
        why = "it is still running, or was killed"
    what = "no cases finished" if finished == 0 else f"incomplete: {finished} of {total} cases"
    run_argv = meta.get("run_argv")
    run_id = meta.get("run_id")
    if isinstance(run_argv, list) and run_id:
        how = f"; finish it with `{resume_command([str(a) for a in run_argv], str(run_id))}`"
    elif meta.get("suite_path") and run_id:
        how = f"; finish it with `moebench run {meta['suite_path']} --resume {run_id} --out {root}`"
    else:
        how = ""
    return f"{what} ({why}){how}"
