"""Bad input, interruptions and machine limits: one clear line each, nothing lost,
nothing written outside the results root (issue 11). Each test drives the real command
(`moebench.cli.main`) or the real store/runner on tiny CPU cases and reads back what it
wrote."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moebench.cli import main
from moebench.interrupt import Interrupted, signals_interrupt
from moebench.runner import _death_row, run_cases
from moebench.store import ResultStore, StoreError, read_run
from tests.conftest import FAST_PLAN, tiny_case

PLUGIN = str(Path(__file__).with_name("plugin_faulty.py"))
TINY_SUITE = """
[suite]
name = "tiny"
device = "cpu"
budget_ms = 5
warmup = 0
min_repeats = 2
max_repeats = 3
[grid]
impl = ["reference", "grouped"]
hidden = 16
ffn = 32
num_experts = 4
top_k = 2
batch = 1
seq_len = 2
"""


def moebench(capsys, *args: str) -> tuple[int, str]:
    """Run the command; (exit code, everything it printed, as one line)."""
    code = main(list(args))
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "Traceback" not in output, output
    return code, one_line(output)  # the assertions read the words, not the layout


def one_line(text: str) -> str:
    return " ".join(text.split())


def files_under(folder: Path) -> set[Path]:
    """Every file and folder under `folder` but run locks (taken and released on reads)."""
    return {p for p in folder.rglob("*") if p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished run of TINY_SUITE (2 cases); copy it before changing it."""
    folder = tmp_path_factory.mktemp("finished")
    suite = folder / "tiny.toml"
    suite.write_text(TINY_SUITE)
    code = main(["run", str(suite), "--out", str(folder / "results"), "--in-process", "--quiet"])
    assert code == 0
    (run_dir,) = (folder / "results").iterdir()
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of the finished run under tmp_path/results, and its suite in tmp_path."""
    (tmp_path / "tiny.toml").write_text(TINY_SUITE)
    target = tmp_path / "results" / finished_run.name
    shutil.copytree(finished_run, target)
    return target


# ----------------------------------------------------------------- text printed literally


def test_suite_messages_keep_square_brackets(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text('[suite]\ndevice = "cpu"\n[grid]\nimpl = "reference"\n')
    code, output = moebench(capsys, "run", str(suite), "--out", str(tmp_path / "r"))
    assert code == 2
    assert "required but not set in [grid] or [[zip]]" in one_line(output)
    assert not (tmp_path / "r").exists()


def test_runtime_errors_keep_square_brackets(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text(TINY_SUITE.replace('["reference", "grouped"]', '"test-bracket-error"'))
    args = ("run", str(suite), "--out", str(tmp_path / "r"), "--in-process", "--plugin", PLUGIN)
    code, output = moebench(capsys, *args)
    assert code == 0
    assert "[enforce fail at alloc.cpp:42] out of [grid] luck" in one_line(output)
    code, output = moebench(capsys, "show", "latest", "--root", str(tmp_path / "r"))
    assert code == 0 and "error" in output


def test_a_long_message_is_one_line_in_a_log_and_wrapped_on_a_terminal(capsys):
    """In a log (not a terminal) a message is never broken inside, however long, so it
    still greps; a terminal's edge wraps it."""
    from io import StringIO

    from rich.console import Console

    from moebench.console import error

    code = main(["run", "no-such-suite"])  # (the `moebench` helper joins the lines)
    lines = capsys.readouterr().out.splitlines()
    (line,) = [line for line in lines if line.startswith("error:")]
    assert code == 2 and len(line) > 160 and len(lines) == 1
    assert line.endswith("smoke, switch, topp, triton")  # the built-ins, all on the line
    terminal = Console(file=StringIO(), force_terminal=True, width=40)
    error(terminal, "a message longer than this terminal is wide, in [grid] words")
    printed = terminal.file.getvalue()
    assert len(printed.splitlines()) == 2 and "[grid]" in printed


@pytest.mark.parametrize("name", ["exp[v2]", "../../x", "a/b", ".hidden", "x" * 101])
def test_suite_names_that_are_no_folder_name_are_refused(tmp_path, capsys, name):
    suite = tmp_path / "deep" / "s.toml"
    suite.parent.mkdir()
    suite.write_text(TINY_SUITE.replace('name = "tiny"', f"name = {json.dumps(name)}"))
    before = files_under(tmp_path)
    code, output = moebench(capsys, "run", str(suite), "--out", str(tmp_path / "deep" / "r"))
    assert code == 2
    assert "[suite] key 'name':" in output and "cannot name a folder" in output
    assert files_under(tmp_path) == before  # nothing written anywhere


def test_a_file_stem_with_brackets_gives_a_run_id_that_exists(tmp_path, capsys):
    suite = tmp_path / "exp[v2].toml"
    suite.write_text(TINY_SUITE.replace('name = "tiny"\n', ""))
    code, output = moebench(
        capsys, "run", str(suite), "--out", str(tmp_path / "r"), "--in-process", "--quiet"
    )
    assert code == 0
    (run_dir,) = (tmp_path / "r").iterdir()
    assert run_dir.name.startswith("exp-v2-") and f"run {run_dir.name}" in output
    assert moebench(capsys, "show", run_dir.name, "--root", str(tmp_path / "r"))[0] == 0


# ----------------------------------------------------------------- no tracebacks


def test_a_binary_suite_file_is_one_line(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_bytes(bytes(range(256)) * 4)
    code, output = moebench(capsys, "run", str(suite))
    assert code == 2 and "s.toml: not a text file (byte 128 is not UTF-8)" in output


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text(TINY_SUITE)
    (tmp_path / "afile").write_text("")
    code, output = moebench(capsys, "run", str(suite), "--out", str(tmp_path / "afile"))
    assert code == 2 and "is a file, not a folder" in output


def _foreign_parquet(path: Path) -> Path:
    pq.write_table(pa.table({"name": ["a", "b"], "score": [1.5, 2.0]}), path)
    return path


@pytest.mark.parametrize(
    "command",
    [("show",), ("export", "--format", "csv", "-o", "{out}"), ("report", "-o", "{out}")],
)
def test_a_foreign_parquet_is_refused(tmp_path, capsys, command):
    pytest.importorskip("plotly")
    table = _foreign_parquet(tmp_path / "other.parquet")
    out = tmp_path / "out.file"
    args = [a.format(out=out) for a in command]
    code, output = moebench(capsys, args[0], str(table), *args[1:])
    assert code == 2
    assert "is not a moebench results table: no column case_id, impl, status" in one_line(output)
    assert "(its columns: name, score)" in output
    assert not out.exists()


@pytest.mark.parametrize("command", ["show", "report"])
def test_a_number_column_of_text_is_refused(run_copy, tmp_path, capsys, command):
    pytest.importorskip("plotly")
    table = pq.read_table(run_copy / "results.parquet")
    index = table.column_names.index("latency_ms")
    texts = pa.array([str(v) for v in table["latency_ms"].to_pylist()])
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(index, "latency_ms", texts), bad)
    extra = ("-o", str(tmp_path / "r.html")) if command == "report" else ()
    code, output = moebench(capsys, command, str(bad), *extra)
    assert code == 2
    assert (
        "column 'latency_ms' holds text (string), where a moebench results table has numbers"
        in (one_line(output))
    )


def test_a_corrupt_run_json(run_copy, tmp_path, capsys):
    (run_copy / "run.json").write_text("{not json")
    (run_copy / "results.parquet").unlink()
    code, output = moebench(capsys, "show", str(run_copy))
    assert code == 0 and "run.json is unreadable" in one_line(output)
    assert "2 cases" in output  # the rows are still shown
    code, output = moebench(
        capsys, "run", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "results"),
        "--resume", run_copy.name, "--in-process",
    )  # fmt: skip
    assert code == 2
    assert f"cannot resume {run_copy.name}:" in output and "run.json is unreadable" in output


# ----------------------------------------------------------------- resume


def _resume(capsys, tmp_path: Path, run_id: str, suite: str = "tiny.toml") -> tuple[int, str]:
    return moebench(
        capsys, "run", str(tmp_path / suite), "--out", str(tmp_path / "results"),
        "--resume", run_id, "--in-process", "--quiet",
    )  # fmt: skip


def test_a_corrupt_part_runs_again_with_a_warning(run_copy, tmp_path, capsys):
    parts = sorted((run_copy / "parts").glob("*.parquet"))
    parts[0].write_bytes(b"PAR1 torn by a kill")
    (run_copy / "parts" / f".{parts[1].name}.999.tmp").write_text("half")
    code, output = _resume(capsys, tmp_path, run_copy.name)
    assert code == 0, output
    text = one_line(output)
    assert f"warning: part {parts[0].name} is unreadable" in text and "runs again" in text
    assert "removed 1 temporary file(s)" in text
    assert "1 cases already done" in text
    frame = read_run(run_copy)
    assert len(frame) == 2 and frame["case_id"].is_unique and set(frame["status"]) == {"ok"}
    assert not list(run_copy.rglob("*.tmp"))


def test_resume_with_another_suite_is_refused(run_copy, tmp_path, capsys):
    other = TINY_SUITE.replace("batch = 1", "batch = [1, 2]")
    (tmp_path / "other.toml").write_text(other)
    before = {p: p.stat().st_mtime_ns for p in files_under(run_copy)}
    code, output = _resume(capsys, tmp_path, run_copy.name, "other.toml")
    assert code == 2
    text = one_line(output)
    assert "the suite and filters now give another case list" in text
    assert "2 of its case(s) are not in the run ('reference D16F32 E4k2 T4" in text
    # the command the run was started with, to resume it as it was
    assert "options the run was started with: `moebench run " in text
    assert text.endswith(f" --resume {run_copy.name}`")
    assert {p: p.stat().st_mtime_ns for p in files_under(run_copy)} == before


def test_resume_of_a_run_in_use_is_refused(run_copy, tmp_path, capsys):
    holder = ResultStore(run_copy)
    holder.lock()
    try:
        code, output = _resume(capsys, tmp_path, run_copy.name)
    finally:
        holder.unlock()
    assert code == 2
    assert f"run {run_copy.name} is in use by another moebench (pid {os.getpid()})" in output
    assert _resume(capsys, tmp_path, run_copy.name)[0] == 0  # free again


def test_unknown_run_id_lists_the_runs(run_copy, tmp_path, capsys):
    code, output = _resume(capsys, tmp_path, "nope")
    assert code == 2
    assert output.startswith(  # said first, not after the run's header
        f"error: no run 'nope' under {tmp_path / 'results'}; runs there: {run_copy.name}"
    )
    code, output = _resume(capsys, tmp_path, "../../../etc")
    assert code == 2 and "run id '../../../etc' cannot name a folder" in output


# ----------------------------------------------------------------- no silent garbage


def test_show_says_a_run_is_empty_or_incomplete(run_copy, tmp_path, capsys):
    (run_copy / "results.parquet").unlink()
    meta = json.loads((run_copy / "run.json").read_text())
    meta["interrupted"] = True
    (run_copy / "run.json").write_text(json.dumps(meta))
    parts = sorted((run_copy / "parts").glob("*.parquet"))
    parts[0].unlink()
    code, output = moebench(capsys, "show", run_copy.name, "--root", str(tmp_path / "results"))
    text = one_line(output)
    assert code == 0 and "incomplete: 1 of 2 cases (it was interrupted); finish it with" in text
    assert "--out" in text and f"--resume {run_copy.name}" in text
    parts[1].unlink()
    code, output = moebench(capsys, "show", run_copy.name, "--root", str(tmp_path / "results"))
    assert code == 0 and "no cases finished (it was interrupted)" in one_line(output)


def test_report_of_an_empty_run_or_over_a_file_is_refused(run_copy, tmp_path, capsys):
    pytest.importorskip("plotly")
    existing = tmp_path / "report.html"
    existing.write_text("mine")
    code, output = moebench(capsys, "report", str(run_copy), "-o", str(existing))
    assert code == 2 and "report.html exists; pass --force to overwrite it" in one_line(output)
    assert existing.read_text() == "mine"
    (run_copy / "results.parquet").unlink()
    for part in (run_copy / "parts").glob("*.parquet"):
        part.unlink()
    code, output = moebench(capsys, "report", str(run_copy), "-o", str(tmp_path / "new.html"))
    assert code == 2 and "nothing to report: no cases finished" in one_line(output)


# ----------------------------------------------------------------- interruptions


@pytest.fixture
def default_signals():
    """SIGHUP and SIGTERM at their default handlers for the test, whatever the test run
    inherited (under nohup SIGHUP is ignored, and stays so inside `signals_interrupt`),
    and as they were after."""
    numbers = (signal.SIGHUP, signal.SIGTERM)
    before = {number: signal.signal(number, signal.SIG_DFL) for number in numbers}
    yield
    for number, handler in before.items():
        signal.signal(number, handler)


def test_sighup_and_sigterm_interrupt_like_ctrl_c(default_signals):
    for number, name in ((signal.SIGHUP, "SIGHUP"), (signal.SIGTERM, "SIGTERM")):
        with pytest.raises(KeyboardInterrupt) as caught, signals_interrupt():
            os.kill(os.getpid(), number)
            signal.sigtimedwait([], 0)  # let the handler run
        assert isinstance(caught.value, Interrupted) and caught.value.signal_name == name
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_ignored_on_purpose_stays_ignored(default_signals):
    """Under nohup (SIGHUP ignored) a hangup neither interrupts the run nor kills it."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with signals_interrupt():
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGHUP)
        signal.sigtimedwait([], 0)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def test_an_interrupted_run_keeps_its_cases_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """SIGTERM in the middle of the sweep: rows so far kept and consolidated, exit 130,
    the exact resume command (with --out); resuming it finishes the run."""
    from moebench import runner

    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_SUITE.replace("batch = 1", "batch = [1, 2]"))
    real = runner.InProcessExecutor.run
    calls = []

    def run_then_terminate(self, case, timeout_s):
        calls.append(case)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, case, timeout_s)

    monkeypatch.setattr(runner.InProcessExecutor, "run", run_then_terminate)
    out = tmp_path / "my results"
    code, output = moebench(capsys, "run", str(suite), "--out", str(out), "--in-process")
    assert code == 130
    (run_dir,) = out.iterdir()
    text = one_line(output)
    assert "interrupted (SIGTERM): finished cases are saved; continue with" in text
    assert f"--out '{out}'" in text and f"--resume {run_dir.name}" in text
    assert len(read_run(run_dir / "results.parquet")) == 2
    monkeypatch.setattr(runner.InProcessExecutor, "run", real)
    code, output = moebench(
        capsys, "run", str(suite), "--out", str(out), "--in-process", "--resume", run_dir.name
    )
    assert code == 0 and "2 cases already done" in output
    assert len(read_run(run_dir)) == 4


# ----------------------------------------------------------------- machine limits


def test_a_case_that_cannot_fit_is_an_oom_row_never_allocated(tmp_path):
    huge = tiny_case("reference", hidden=65536, ffn=65536, num_experts=64)
    outcome = run_cases(
        [huge, tiny_case("reference")], suite_name="t", plan=FAST_PLAN, timeout_s=60,
        out_root=tmp_path, isolate=False,
    )  # fmt: skip
    frame = read_run(outcome.results_path).set_index("hidden")
    assert frame.loc[65536, "status"] == "oom"
    error = frame.loc[65536, "error"]
    assert error.startswith("needs at least 3.0 TiB (weights 3.0 TiB, activations")
    assert "reference" in error and "workspace" in error and "cpu has" in error
    assert frame.loc[32, "status"] == "ok"


def test_a_worker_killed_by_the_oom_killer_is_oom():
    case = tiny_case()
    assert _death_row(-9, 4, 5, case)["status"] == "oom"
    assert "the kernel's OOM killer ended it" in _death_row(-9, 4, 5, case)["error"]
    assert _death_row(-9, None, None, case)["status"] == "oom"  # count unreadable
    assert _death_row(-9, 4, 4, case)["status"] == "crashed"  # someone else's SIGKILL
    assert _death_row(3, 4, 5, case)["status"] == "crashed"


def test_a_suite_over_10000_cases_asks_for_yes(tmp_path, capsys, monkeypatch):
    suite = tmp_path / "big.toml"
    big = TINY_SUITE.replace("batch = 1", f"batch = {list(range(1, 6001))}")
    suite.write_text(big)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    code, output = moebench(capsys, "run", str(suite), "--out", str(tmp_path / "r"))
    text = one_line(output)
    assert code == 2 and "gives 12,000 cases: at its budget of 5 ms per case" in text
    assert "pass --yes to run them" in text and not (tmp_path / "r").exists()
    monkeypatch.setattr("moebench.run_command.CONFIRM_CASES", 1)
    suite.write_text(TINY_SUITE)
    args = ("run", str(suite), "--out", str(tmp_path / "r"), "--in-process", "--quiet")
    assert moebench(capsys, *args)[0] == 2
    assert moebench(capsys, *args, "--yes")[0] == 0


# ----------------------------------------------------------------- documentation


@pytest.mark.parametrize(
    "command", ["run", "list", "show", "env", "report", "compare", "export", "merge", "init"]
)
def test_every_command_documents_its_exit_codes(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "Exit 0" in text or "exit codes:\n  0 " in text


def test_store_refuses_run_ids_outside_the_root(tmp_path):
    for run_id in ("../x", "a/b", "", ".."):
        with pytest.raises(StoreError):
            ResultStore.create(tmp_path / "root", run_id)
    assert not (tmp_path / "x").exists() and not (tmp_path / "root").exists()


@pytest.mark.cuda
def test_a_case_that_cannot_fit_on_the_gpu_is_an_oom_row(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    huge = tiny_case("grouped", hidden=65536, ffn=65536, num_experts=64, device="cuda")
    huge = huge.with_(dtype="bfloat16")
    outcome = run_cases(
        [huge, tiny_case("grouped", device="cuda")], suite_name="t", plan=FAST_PLAN,
        timeout_s=120, out_root=tmp_path, isolate=True,
    )  # fmt: skip
    frame = read_run(outcome.results_path).set_index("hidden")
    assert frame.loc[65536, "status"] == "oom"
    assert frame.loc[65536, "error"].startswith("needs at least 1.5 TiB (weights 1.5 TiB")
    assert "but cuda has" in frame.loc[65536, "error"]
    assert frame.loc[32, "status"] == "ok"


def test_a_run_without_a_case_list_resumes_on_its_suite_name(run_copy, tmp_path, capsys):
    """Runs made before cases.tsv: the suite name and the cases done are checked."""
    (run_copy / "cases.tsv").unlink()
    other = TINY_SUITE.replace('name = "tiny"', 'name = "other"')
    (tmp_path / "other.toml").write_text(other)
    code, output = _resume(capsys, tmp_path, run_copy.name, "other.toml")
    assert code == 2 and "it was started with suite 'tiny'" in output
    assert _resume(capsys, tmp_path, run_copy.name)[0] == 0
    assert len((run_copy / "cases.tsv").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "argv, writes",
    [
        (["report", "latest", "--out", "res"], True),
        (["export", "latest", "--out", "res"], True),
        (["show", "latest", "--out", "res"], False),
        (["compare", "a", "b", "--out", "res"], False),
    ],
)
def test_out_on_a_command_that_reads_runs_names_root(tmp_path, monkeypatch, capsys, argv, writes):
    """`run --out res` then `report latest --out res`: --out was taken as an abbreviation
    of --output (the report written to a file named res, the run looked up under
    results/); now it is refused in one line that names --root."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "res").mkdir()
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--out is where `moebench run` writes runs" in err and "--root res" in err
    assert ("-o/--output" in err) == writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # nothing written


def test_abbreviated_options_are_refused(capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", "smoke", "--thr", "1"])
    assert done.value.code == 2
    assert "unrecognized arguments: --thr 1" in capsys.readouterr().err


def test_show_says_none_for_a_run_of_moebench_from_a_wheel(tmp_path, monkeypatch, capsys):
    """moebench installed from a wheel records no commit of its own: show says `git
    none`, as it says `gpu none`, not Python's `None`."""
    from moebench import __version__, provenance

    wheel = {"version": __version__, "commit": None, "dirty": None, "source": "wheel"}
    monkeypatch.setattr(provenance, "moebench_source", lambda: wheel)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(TINY_SUITE)
    assert main(["run", "tiny.toml", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["show", "latest"]) == 0
    header = capsys.readouterr().out.splitlines()[1]
    assert "git none" in header and "None" not in header, header
