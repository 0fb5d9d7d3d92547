"""Provenance: moebench's source, the user's repository (commit, dirty), the plugins; and
`moebench compare` saying when they differ."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from moebench.cli import main as cli_main
from moebench.provenance import collect_provenance, differences, moebench_source
from moebench.store import ResultStore, read_metadata
from tests.test_export import make_run


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_repository_is_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "their-repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "kernel.py").write_text("x = 1\n")
    _git(repo, "add", "kernel.py")
    _git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "one")
    monkeypatch.chdir(repo)
    plugin_file = str(Path(__file__).with_name("plugin_good.py"))
    found = collect_provenance([plugin_file])
    assert found["repository"]["commit"] == _git(repo, "rev-parse", "HEAD")
    assert found["repository"]["dirty"] is False
    (repo / "kernel.py").write_text("x = 2\n")
    assert collect_provenance()["repository"]["dirty"] is True
    # moebench's own commit is its checkout's, not the working directory's.
    checkout = Path(__file__).parent.parent
    assert found["moebench"]["commit"] == _git(checkout, "rev-parse", "HEAD")
    assert found["moebench"]["source"] == "checkout"
    (from_file,) = [p for p in found["plugins"] if p.get("plugin") == plugin_file]
    assert from_file["distribution"] is None and from_file["version"] is None
    assert len(from_file["sha256"]) == 64


def test_outside_a_repository(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert collect_provenance()["repository"] is None
    assert moebench_source()["version"]


def _meta(plugin_version: str, commit: str = "a" * 40, torch: str = "2.13.0") -> dict:
    return {
        "environment": {
            "torch": torch,
            "provenance": {
                "moebench": {"version": "0.1.0", "commit": "b" * 40, "dirty": False},
                "repository": {"root": "/r", "commit": commit, "dirty": False},
                "plugins": [
                    {
                        "entry_point": "my-moe",
                        "target": "my_pkg.moe",
                        "distribution": "my-pkg",
                        "version": plugin_version,
                    }
                ],
            },
        }
    }


def test_differences_name_what_changed() -> None:
    assert differences(_meta("0.1.0"), _meta("0.1.0")) == []
    assert differences(_meta("0.1.0"), _meta("0.2.0")) == [
        "plugin my-pkg differs: baseline my-pkg 0.1.0, candidate my-pkg 0.2.0"
    ]
    notes = differences(_meta("0.1.0"), _meta("0.1.0", commit="c" * 40, torch="2.11.0"))
    assert notes == [
        f"repository differs: baseline {'a' * 10}, candidate {'c' * 10}",
        "torch differs: baseline 2.13.0, candidate 2.11.0",
    ]
    assert differences({}, _meta("0.1.0")) == []  # older runs: nothing to say


def test_compare_prints_provenance_differences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = []
    for name, version in (("base", "0.1.0"), ("cand", "0.2.0")):
        run = make_run(tmp_path, name)
        store = ResultStore(run)
        meta = store.read_meta()
        meta["environment"].update(_meta(version)["environment"])
        store.write_meta(meta)
        runs.append(run)
    assert cli_main(["compare", str(runs[0]), str(runs[1])]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "plugin my-pkg differs: baseline my-pkg 0.1.0, candidate my-pkg 0.2.0" in out


def test_a_real_run_records_provenance(tmp_path: Path) -> None:
    argv = ["run", "smoke", "--filter", "impl=dense", "--filter", "batch=1"]
    argv += ["--filter", "num_experts=4", "--filter", "top_k=1", "--in-process"]
    assert cli_main([*argv, "--out", str(tmp_path), "--quiet"]) == 0
    (run,) = tmp_path.iterdir()
    for source in (run, run / "results.parquet"):
        provenance = read_metadata(source)["environment"]["provenance"]
        assert provenance["moebench"]["version"] and "plugins" in provenance
    assert np.isfinite(read_metadata(run)["schema_version"])
    # how each case was timed, the smoke suite's settings and the default timed warm-up
    timing = read_metadata(run)["timing"]
    assert timing["warmup_ms"] == 500.0 and timing["budget_ms"] > 0 and timing["flush_l2"]


def test_version_prints_the_version_and_where_it_came_from(capsys, monkeypatch) -> None:
    from moebench import __version__, provenance

    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    source = moebench_source()
    assert out.startswith(f"moebench {__version__} (") and "\n" not in out
    if source.get("commit"):  # this checkout (or pip's record of the git commit)
        assert source["commit"][:10] in out
    for found, expected in [
        ({"source": "checkout", "commit": "0123456789abc", "dirty": True},
         "(checkout 0123456789, dirty)"),
        ({"source": "checkout", "commit": None, "dirty": False}, "(checkout without commits)"),
        ({"source": "git", "commit": "fedcba9876543", "url": "https://x/y.git"},
         "(git fedcba9876 from https://x/y.git)"),
        ({"source": "wheel", "commit": None}, "(wheel)"),
    ]:  # fmt: skip
        monkeypatch.setattr(provenance, "moebench_source", lambda f=found: {"version": "9", **f})
        assert provenance.version_line() == f"moebench 9 {expected}"
    with pytest.raises(SystemExit) as done:  # -V too, and before any command
        cli_main(["-V", "run"])
    assert done.value.code == 0 and capsys.readouterr().out == "moebench 9 (wheel)\n"


def test_env_says_each_fact_in_words(monkeypatch, tmp_path: Path) -> None:
    """`moebench env` printed Python's None (torch_cuda, triton, git_sha) and the whole
    provenance dict's repr; each fact is now a line in words, with moebench's source, the
    working directory's repository and each plugin on a line of their own. --json keeps
    the raw values."""
    import io
    import json

    from rich.console import Console

    from moebench import env as env_module
    from moebench.cli import environment_rows

    facts = {
        "python": "3.11.7",
        "torch_cuda": None,
        "triton": None,
        "moebench": "0.1.0",
        "git_sha": None,
        "dependent_launch": None,
        "gluon_ws": None,
        "merge_tail": None,
        "l2_flush": "read",
        "gpus": [],
        "provenance": {
            "moebench": {"version": "0.1.0", "commit": None, "source": "wheel"},
            "repository": {"root": "/home/me/kernels", "commit": "91c2aa0b55e1", "dirty": True},
            "plugins": [
                {"entry_point": "my-moe", "target": "my_pkg.moe", "distribution": "my-pkg",
                 "version": "0.3.1"},
                {"plugin": "local_moe.py", "distribution": None, "version": None},
            ],
        },
    }  # fmt: skip
    rows = dict(environment_rows(facts))
    assert rows == {
        "python": "3.11.7",
        "torch_cuda": "none (a CPU build of torch)",
        "triton": "not installed",
        "moebench": "0.1.0 (wheel)",
        "dependent_launch": "n/a (needs CUDA and Triton)",
        "gluon_ws": "n/a (needs CUDA and Triton)",
        "merge_tail": "n/a (needs CUDA and Triton)",
        "l2_flush": "read",
        "repository": "/home/me/kernels at 91c2aa0b55, dirty",
        "plugin my-moe": "my_pkg.moe from my-pkg 0.3.1",
        "plugin local_moe.py": "local_moe.py",
    }
    facts["provenance"]["repository"] = None
    assert "in no git work tree" in dict(environment_rows(facts))["repository"]

    monkeypatch.chdir(tmp_path)  # no repository here
    console = Console(file=io.StringIO(), width=80, record=True)
    from moebench.cli import cmd_env

    assert cmd_env(type("Args", (), {"json": False})(), console) == 0
    text = console.export_text()
    assert "None" not in text and "{" not in text and max(map(len, text.splitlines())) <= 80
    monkeypatch.setattr(env_module, "collect_environment", lambda: facts)
    printed = io.StringIO()
    monkeypatch.setattr("sys.stdout", printed)
    assert cmd_env(type("Args", (), {"json": True})(), console) == 0
    assert json.loads(printed.getvalue())["triton"] is None


@pytest.mark.parametrize(
    ("switch", "by_default"),
    [
        ("GLUON_WS_SWITCH", True),
        ("MERGE_TAIL_SWITCH", True),
        ("TRITON_RUNOFF_SWITCH", True),
    ],
)
@pytest.mark.parametrize(
    ("value", "on"), [("1", True), ("on", True), (" TRUE ", True), ("yes", True), ("0", False),
                      (" Off ", False), ("no", False), ("", None), ("2", None), (None, None)],
)  # fmt: skip
def test_a_switch_of_the_triton_layer(switch, by_default, value, on, monkeypatch):
    """Each switch is on or off as set, and in its default state where unset or set to
    anything else (`on` None)."""
    from moebench import env as env_module

    variable = getattr(env_module, switch)
    assert (variable in env_module.ON_BY_DEFAULT) is by_default
    if value is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, value)
    assert env_module.layer_switch_on(variable) is (by_default if on is None else on)


@pytest.mark.parametrize(
    ("switch", "variable", "key"),
    [
        ("GLUON_WS_SWITCH", "MOEBENCH_GLUON_WS", "gluon_ws"),
        ("MERGE_TAIL_SWITCH", "MOEBENCH_MERGE_TAIL", "merge_tail"),
        ("TRITON_RUNOFF_SWITCH", "MOEBENCH_TRITON_RUNOFF", "triton_runoff"),
        ("SHARED_STREAM_SWITCH", "MOEBENCH_SHARED_STREAM", "shared_stream"),
    ],
)
def test_a_switch_is_recorded_only_where_it_can_act(switch, variable, key, monkeypatch):
    """run.json's `gluon_ws`, `merge_tail`, `triton_runoff` and `shared_stream`: None
    without CUDA (or Triton), so a CPU run never differs from another on it; else "on" or
    "off"."""
    import torch

    from moebench import env as env_module

    assert getattr(env_module, switch) == variable
    monkeypatch.setenv(variable, "1")
    if not torch.cuda.is_available():
        assert env_module.collect_environment()[key] is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("moebench.routing.route_kernels", lambda: object())
    monkeypatch.setattr(env_module, "_gluon_races", lambda: True)
    assert env_module._switch_state(variable) == "on"
    monkeypatch.setenv(variable, "off")
    assert env_module._switch_state(variable) == "off"
    monkeypatch.delenv(variable)
    default = "on" if variable in env_module.ON_BY_DEFAULT else "off"
    assert env_module._switch_state(variable) == default
    monkeypatch.undo()  # run.json's key holds this switch's state, with CUDA or without
    monkeypatch.setattr(env_module, "_switch_state", lambda name: f"state of {name}")
    assert env_module.collect_environment()[key] == f"state of {variable}"


@pytest.mark.parametrize("variable_value", [None, "1"])
def test_the_gluon_race_is_recorded_off_where_it_cannot_run(variable_value, monkeypatch):
    """A Triton without Gluon (or a card other than Hopper) races without it, so run.json
    says "off" there even with the switch on; the other switches do not depend on it."""
    import torch

    from moebench import env as env_module

    for variable in (env_module.GLUON_WS_SWITCH, env_module.MERGE_TAIL_SWITCH):
        if variable_value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, variable_value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("moebench.routing.route_kernels", lambda: object())
    monkeypatch.setattr(env_module, "_gluon_races", lambda: False)
    assert env_module._switch_state(env_module.GLUON_WS_SWITCH) == "off"
    assert env_module._switch_state(env_module.MERGE_TAIL_SWITCH) == "on"
    monkeypatch.setattr(env_module, "_gluon_races", lambda: True)
    assert env_module._switch_state(env_module.GLUON_WS_SWITCH) == "on"


def test_gluon_races_reads_the_card(monkeypatch):
    """`_gluon_races` is False on a card other than Hopper, and on Hopper follows
    whether this Triton has Gluon."""
    import importlib.util

    import torch

    from moebench import env as env_module

    try:
        has_gluon = importlib.util.find_spec("triton.experimental.gluon") is not None
    except ModuleNotFoundError:
        has_gluon = False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    assert env_module._gluon_races() is False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    assert env_module._gluon_races() is has_gluon
