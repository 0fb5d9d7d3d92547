"""The runner end to end: real cases into a temp dir, parquet read back; failures become
rows; a killed run resumes with every case exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from moebench.cli import main as cli_main
from moebench.plugins import import_plugin
from moebench.runner import filter_cases, run_cases
from moebench.store import read_metadata, read_run
from tests.conftest import FAST_PLAN, tiny_case
from tests.test_bad_input import TINY_SUITE

PLUGIN = str(Path(__file__).with_name("plugin_faulty.py"))
REPO = Path(__file__).resolve().parents[1]


def test_in_process_run_fills_the_schema(tmp_path):
    cases = [
        tiny_case(impl, mode=mode)
        for impl in ("reference", "grouped", "capacity", "dense")
        for mode in ("forward", "train")
    ]
    outcome = run_cases(
        cases, suite_name="t", plan=FAST_PLAN, timeout_s=60, out_root=tmp_path, isolate=False
    )
    frame = read_run(outcome.results_path)
    assert len(frame) == len(cases) and set(frame["status"]) == {"ok"}
    assert frame["case_id"].is_unique
    for row in frame.to_dict("records"):
        assert row["repeats"] == len(row["samples_ms"]) >= FAST_PLAN.min_repeats
        assert row["latency_p10_ms"] <= row["latency_ms"] <= row["latency_p90_ms"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["latency_ms"] * 1e3)
        assert row["flops"] > 0 and row["min_bytes"] > 0 and row["achieved_tflops"] > 0
        assert row["roofline_frac"] > 0
        assert row["total_params"] >= row["touched_params"] >= row["active_params"] > 0 or (
            row["impl"] == "dense"
        )
        assert row["weight_bytes"] > 0
        assert row["comm_ms"] == 0.0 and row["world_size"] == 1
        if row["exact"]:
            assert row["rel_err"] <= row["tolerance"] and pd.isna(row["fidelity_err"])
        else:
            assert row["fidelity_err"] >= 0 and pd.isna(row["rel_err"])
        if row["impl"] != "dense":
            assert sum(row["tokens_per_expert"]) + row["dropped_frac"] * row["tokens"] * 2 == (
                pytest.approx(row["tokens"] * 2)
            )
            assert row["imbalance"] >= 1.0 and row["aux_loss"] > 0
    meta = read_metadata(outcome.results_path)
    assert meta["environment"]["torch"] and meta["ceilings"]["copy_gbps"] > 0
    assert meta["environment"]["l2_flush"] == "read"  # `moebench compare` reads it
    assert meta["cases_total"] == len(cases)


def test_a_mismatch_is_a_row_not_a_timing(tmp_path, monkeypatch):
    from moebench.measure import case_run

    monkeypatch.setitem(case_run.TOLERANCE, "float32", -1.0)  # nothing can pass
    outcome = run_cases(
        [tiny_case("grouped")],
        suite_name="t",
        plan=FAST_PLAN,
        timeout_s=60,
        out_root=tmp_path,
        isolate=False,
    )
    row = read_run(outcome.results_path).iloc[0]
    assert row["status"] == "mismatch" and "tolerance" in row["error"]
    assert pd.isna(row["latency_ms"])


def test_failures_become_rows_and_the_sweep_goes_on(tmp_path):
    import_plugin(PLUGIN)
    cases = [
        tiny_case("test-raises"),
        tiny_case("grouped"),
        tiny_case("test-crashes"),
        tiny_case("test-hangs"),
        tiny_case("reference"),
    ]
    outcome = run_cases(
        cases,
        suite_name="t",
        plan=FAST_PLAN,
        timeout_s=8,
        out_root=tmp_path,
        isolate=True,
        plugins=(PLUGIN,),
    )
    frame = read_run(outcome.results_path).set_index("impl")
    assert frame.loc["test-raises", "status"] == "error"
    assert "build exploded on purpose" in frame.loc["test-raises", "error"]
    assert frame.loc["test-crashes", "status"] == "crashed"
    assert "exit code 3" in frame.loc["test-crashes", "error"]
    assert frame.loc["test-hangs", "status"] == "timeout"
    assert frame.loc["grouped", "status"] == frame.loc["reference", "status"] == "ok"


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_a_layer_in_a_reference_cycle_is_freed_when_its_case_ends(mode):
    """A worker measures case after case: a layer that only the collector can free (as
    transformers' blocks are) must be gone before the next case, or its weights hold
    device memory that case needs (8 DeepSeek-V3 cases ran out of an 80 GB H100 so)."""
    import gc

    from moebench.runner import InProcessExecutor

    executor = InProcessExecutor(FAST_PLAN, plugins=(PLUGIN,))
    built = sys.modules["moebench_plugin_plugin_faulty"].BUILT_CYCLIC
    before = len(built)
    gc.disable()  # only the executor may collect: the layer must not go by chance
    try:
        row = executor.run(tiny_case("test-cyclic", mode=mode), timeout_s=60)
        assert row["status"] == "ok", row
        assert len(built) > before, "the case built no test-cyclic layer"
        assert all(ref() is None for ref in built[before:]), "a layer outlived its case"
    finally:
        gc.enable()


def test_filter_cases():
    cases = [tiny_case(impl, num_experts=e) for impl in ("grouped", "dense") for e in (4, 8)]
    assert len(filter_cases(cases, ["impl=grouped"])) == 2
    assert len(filter_cases(cases, ["impl=grouped", "num_experts=8"])) == 1
    assert len(filter_cases(cases, ["^dense"])) == 2
    with pytest.raises(ValueError, match="unknown field 'nope'; fields: activation, batch, "):
        filter_cases(cases, ["nope=1"])
    # booleans as TOML writes them (a suite says cuda_graph = true), in any case
    graphed = [replace(c, cuda_graph=g) for c in cases[:1] for g in (False, True)]
    for spelled in ("cuda_graph=true", "cuda_graph=True", "cuda_graph=TRUE"):
        assert [c.cuda_graph for c in filter_cases(graphed, [spelled])] == [True]
    assert [c.cuda_graph for c in filter_cases(graphed, ["cuda_graph=false"])] == [False]


def test_filter_values_take_wildcards():
    """`impl=hf-*:grouped_mm` keeps every transformers block under one backend: a value
    with `*` or `?` is a shell-style wildcard; `[` in a value is itself, never a class;
    a wildcard that matches nothing is named as a typo is."""
    impls = ("hf-mixtral:grouped_mm", "hf-olmoe:grouped_mm", "hf-olmoe:eager", "grouped")
    cases = [replace(tiny_case("grouped"), impl=impl) for impl in impls]
    kept = filter_cases(cases, ["impl=hf-*:grouped_mm,grouped"])
    assert [c.impl for c in kept] == ["hf-mixtral:grouped_mm", "hf-olmoe:grouped_mm", "grouped"]
    assert [c.impl for c in filter_cases(cases, ["impl=hf-olmoe:?????"])] == ["hf-olmoe:eager"]
    assert [c.fields()["num_experts"] for c in filter_cases(cases[:1], ["num_experts=*"])] == [4]
    unmatched: list[str] = []
    assert filter_cases(cases, ["impl=hf-*:batched_mm,hf-[a]*"], unmatched) == []
    assert unmatched == [
        "--filter impl=hf-*:batched_mm,hf-[a]*: no case has impl 'hf-*:batched_mm', 'hf-[a]*'"
        " (those left have: grouped, hf-mixtral:grouped_mm, hf-olmoe:eager,"
        " hf-olmoe:grouped_mm)"
    ]


def test_filter_values_that_no_case_has_are_named(tmp_path, capsys):
    """`impl=grouped,gruoped` keeps grouped's cases: the typo is said, not swallowed;
    each value is looked for among the cases the filters before it left."""
    cases = [tiny_case(impl, num_experts=e) for impl in ("grouped", "dense") for e in (4, 8)]
    unmatched: list[str] = []
    kept = filter_cases(cases, ["impl=grouped,gruoped", "num_experts=4,8,16"], unmatched)
    assert [(c.impl, c.fields()["num_experts"]) for c in kept] == [("grouped", 4), ("grouped", 8)]
    assert unmatched == [
        "--filter impl=grouped,gruoped: no case has impl 'gruoped' (those left have: "
        "dense, grouped)",
        "--filter num_experts=4,8,16: no case has num_experts '16' (those left have: 4, 8)",
    ]
    unmatched.clear()
    filter_cases(cases, ["impl=dense", "num_experts=4,8"], unmatched)
    assert unmatched == []
    # through the command: a warning line, then the run of what was kept
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_SUITE)
    assert cli_main(["run", str(suite), "--out", str(tmp_path), "--quiet",
                     "--filter", "impl=grouped,gruoped"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "warning: --filter impl=grouped,gruoped: no case has impl 'gruoped'" in out
    # nothing left: the filters as written (not Python's list of them), and exit 2
    assert cli_main(["run", str(suite), "--out", str(tmp_path), "--quiet",
                     "--filter", "impl=grouped", "--filter", "E64"]) == 2  # fmt: skip
    out = " ".join(capsys.readouterr().out.split())
    assert f"error: --filter impl=grouped --filter E64 leaves no case of {suite}" in out


SLOW_SUITE = """
[suite]
name = "killme"
device = "cpu"
budget_ms = 10
warmup = 1
min_repeats = 2
max_repeats = 3
timeout_s = 60

[grid]
impl = "test-slow"
hidden = 32
ffn = 48
num_experts = 4
top_k = [1, 2]
batch = [1, 2, 3]
seq_len = 4
"""


def _moebench(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "moebench", *args],
        cwd=REPO,
        start_new_session=True,
        # A shell's background job ignores SIGINT, and so would the child: Ctrl-C as on a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_with_every_case_once(tmp_path, how):
    suite = tmp_path / "killme.toml"
    suite.write_text(SLOW_SUITE)
    out = tmp_path / "results"
    proc = _moebench("run", str(suite), "--out", str(out), "--plugin", PLUGIN, "--quiet")
    deadline = time.time() + 120
    while time.time() < deadline:
        parts = list(out.glob("*/parts/*.parquet"))
        if len(parts) >= 2:
            break
        time.sleep(0.05)
    assert len(parts) >= 2, proc.communicate()[0] if proc.poll() is not None else "too slow"
    os.killpg(proc.pid, how)
    output = proc.communicate(timeout=60)[0]
    run_dir = parts[0].parent.parent
    done = len(list(run_dir.glob("parts/*.parquet")))
    assert 2 <= done < 6, output
    if how == signal.SIGINT:  # Ctrl-C reaches the worker too: no traceback from either
        assert proc.returncode == 130 and "Traceback" not in output, output
        line = " ".join(output.split())  # rich wraps long lines
        assert "interrupted (Ctrl-C)" in line and f"--out {out} " in line
        assert f"--quiet --resume {run_dir.name}`" in line
    resumed = _moebench(
        "run",
        str(suite),
        "--out",
        str(out),
        "--plugin",
        PLUGIN,
        "--quiet",
        "--resume",
        run_dir.name,
    )
    output = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, output
    assert f"{done} cases already done" in output
    frame = read_run(run_dir)
    assert len(frame) == 6 and frame["case_id"].is_unique and set(frame["status"]) == {"ok"}


def test_a_full_disk_stops_the_run_and_keeps_what_was_written(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """No space for the third case's row: the run stops with one line naming the file and
    the resume command (it ended in a traceback), the two rows written are kept, no
    half-written temporary is left, and the resume, with room again, finishes the run."""
    import errno

    import moebench.store

    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_SUITE.replace("top_k = 2", "top_k = [1, 2]"))  # 4 cases
    real_write = moebench.store.pq.write_table
    written: list[str] = []

    def full_after_two_parts(table, where, *args, **kwargs):
        if "parts" in str(where) and len(written) >= 2:
            Path(where).write_bytes(b"PAR1 half")  # what a full disk leaves
            raise OSError(errno.ENOSPC, "Error writing bytes to file")
        written.append(str(where))
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(moebench.store.pq, "write_table", full_after_two_parts)
    out = tmp_path / "results"
    argv = ["run", str(suite), "--out", str(out), "--in-process", "--quiet"]
    assert cli_main(argv) == 1
    printed = " ".join(capsys.readouterr().out.split())
    (run_dir,) = out.iterdir()
    assert (
        "error: cannot write " in printed
        and ": No space left on device: the run stopped;" in printed
    )
    assert f"the 2 cases written are kept in {run_dir}" in printed
    resume = f"moebench run {suite} --out {out} --in-process --quiet --resume {run_dir.name}"
    assert f"continue with `{resume}`" in printed
    assert sorted(p.name for p in (run_dir / "parts").iterdir()) == sorted(
        Path(w).name.split(".", 2)[1] + ".parquet" for w in written if "parts" in w
    )  # the two rows; no temporary left
    monkeypatch.setattr(moebench.store.pq, "write_table", real_write)  # room again
    assert cli_main([*argv, "--resume", run_dir.name]) == 0
    frame = read_run(run_dir)
    assert len(frame) == 4 and set(frame["status"]) == {"ok"}
