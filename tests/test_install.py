"""moebench outside this checkout: built-in suites as package data, `moebench suites`,
`moebench init`. (.ci/outsider.sh runs the whole story from a wheel in a fresh venv.)"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from moebench import registry
from moebench.catalog import builtin_suites
from moebench.cli import main as cli_main
from moebench.scaffold import render
from moebench.store import read_run
from moebench.suite import SuiteError, load_suite

CHECKOUT = Path(__file__).parent.parent


def test_every_package_folder_is_in_the_wheel() -> None:
    """pyproject lists packages by hand (suites/ maps to moebench.suites): a new package
    folder missing from the list would be missing from the wheel."""
    listed = set(
        tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(CHECKOUT).parts)
        for init in (CHECKOUT / "moebench").rglob("__init__.py")
        if "templates" not in init.parts
    }
    assert listed == found | {"moebench.suites"}


def test_builtin_suites_by_name_are_the_suites_folder() -> None:
    names = builtin_suites()
    assert {"smoke", "default", "ep"} <= set(names)
    assert {p.name for p in names.values()} == {
        p.name for p in (CHECKOUT / "suites").glob("*.toml")
    }
    by_name = load_suite("smoke")
    assert [c.case_id for c in by_name.cases] == [
        c.case_id for c in load_suite(CHECKOUT / "suites" / "smoke.toml").cases
    ]
    assert load_suite("smoke.toml").name == "smoke"


def test_a_missing_suite_names_the_builtins() -> None:
    with pytest.raises(SuiteError, match=r"built-in suites \(run them by name\): .*smoke"):
        load_suite("no-such-suite")


def test_suites_command_counts_cases_per_device(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["suites"]) == 0
    out = capsys.readouterr().out
    smoke = next(line for line in out.splitlines() if "│ smoke" in line)
    assert smoke.split("│")[2].strip() == "44"  # cpu
    default = next(line for line in out.splitlines() if "│ default" in line)
    cpu, cuda = (int(default.split("│")[i]) for i in (2, 3))
    assert cpu == len(load_suite("default", device="cpu").cases) and cuda != cpu
    # triton runs only on CUDA: its suite has no CPU cases, and the line below says why
    triton = next(line for line in out.splitlines() if "│ triton" in line)
    assert triton.split("│")[2].strip() == "-" and int(triton.split("│")[3]) == 46
    assert "does not load: triton (cpu):" in out and "does not run on device 'cpu'" in out


@pytest.mark.parametrize("terminal", [True, False])
def test_a_suite_that_does_not_load_says_why_literally_at_any_width(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    """`moebench suites` names a suite that does not load here and the reason, as written
    (brackets and all): inside an 80-column terminal, one whole line in a log."""
    import argparse
    import io

    from rich.console import Console

    from moebench import catalog

    broken = tmp_path / "broken.toml"
    broken.write_text(
        '[suite]\nname = "broken"\ndescription = "needs a plugin"\n'
        "[grid]\nhidden = 64\nffn = 128\nnum_experts = 4\ntop_k = 1\nbatch = 1\n"
        'seq_len = 4\nimpl = ["a-plugin-impl-not-installed-here:[eager]"]\n'
    )
    monkeypatch.setattr(catalog, "builtin_suites", lambda: {"broken": broken})
    console = Console(file=io.StringIO(), force_terminal=terminal, width=80, record=True)
    assert catalog.main(argparse.Namespace(), console) == catalog.EXIT_OK
    text = console.export_text()
    if terminal:
        assert max(len(line) for line in text.splitlines()) <= 80
        text = " ".join(line.strip() for line in text.splitlines())
        assert "does not load: broken (cpu, cuda):" in text
    else:
        (line,) = [
            line for line in text.splitlines() if "does not load: broken (cpu, cuda):" in line
        ]
        assert "a-plugin-impl-not-installed-here:[eager]" in line and len(line) > 80


def test_init_names_its_folder_as_written_inside_80_columns(tmp_path: Path) -> None:
    """`moebench init` into a folder with brackets in its name: its next steps name the
    folder as it is, and fit an 80-column terminal."""
    import io

    from rich.console import Console

    from moebench import scaffold
    from moebench.cli import build_parser

    target = tmp_path / "repo[v2]"
    args = build_parser().parse_args(["init", str(target), "--impl", "fused-moe"])
    console = Console(file=io.StringIO(), force_terminal=True, width=80, record=True)
    assert scaffold.main(args, console) == 0
    lines = console.export_text().splitlines()
    assert f"next, in {target}:" in lines
    steps = lines[lines.index(f"next, in {target}:") + 1 :]
    assert len(steps) == 4 and all(len(line) <= 80 for line in steps)


def test_init_writes_the_scaffold_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["init", str(tmp_path), "--impl", "fused-moe"]) == 0
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {
        ".github/workflows/moebench.yml",
        "bench/moebench.toml",
        "bench/test_moebench.py",
        "bench/pytest.ini",
        "bench/ci.sh",
        "bench/plugin/pyproject.toml",
        "bench/plugin/fused_moe_moebench/__init__.py",
        "bench/plugin/fused_moe_moebench/moe.py",
    }
    plugin = tomllib.loads((tmp_path / "bench/plugin/pyproject.toml").read_text())
    entry_points = plugin["project"]["entry-points"]["moebench.implementations"]
    assert entry_points == {"fused-moe": "fused_moe_moebench.moe"}
    workflow = (tmp_path / ".github/workflows/moebench.yml").read_text()
    assert 'TORCH_SPEC: "torch==2.' in workflow and "+cpu" not in workflow
    assert 'MOEBENCH_SPEC: "moebench==' in workflow and "pip install -e" not in workflow
    assert "__" not in workflow.replace("__PACKAGE__", "")  # every placeholder filled
    assert (tmp_path / "bench/ci.sh").stat().st_mode & 0o111
    capsys.readouterr()
    assert cli_main(["init", str(tmp_path), "--impl", "fused-moe"]) == 2
    assert "pass --force" in capsys.readouterr().out
    assert cli_main(["init", str(tmp_path), "--impl", "fused-moe", "--force"]) == 0


@pytest.mark.parametrize("name", ["Bad", "my_moe", "9x", "a--b", "grouped"])
def test_init_refuses_bad_names(tmp_path: Path, name: str) -> None:
    assert cli_main(["init", str(tmp_path), "--impl", name]) == 2
    assert not any(tmp_path.iterdir())


def test_the_scaffolded_plugin_runs_and_matches_the_reference(tmp_path: Path) -> None:
    """The skeleton is a working layer: its suite runs it beside reference and grouped,
    checked against the reference."""
    for relative, text in render("skeleton-moe").items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    plugin = tmp_path / "bench/plugin/skeleton_moe_moebench/moe.py"
    try:
        argv = ["run", str(tmp_path / "bench/moebench.toml"), "--plugin", str(plugin)]
        argv += ["--device", "cpu", "--filter", "batch=1", "--in-process", "--quiet"]
        assert cli_main([*argv, "--out", str(tmp_path / "results"), "--strict"]) == 0
        (run,) = (tmp_path / "results").iterdir()
        frame = read_run(run)
        assert sorted(set(frame["impl"])) == ["grouped", "reference", "skeleton-moe"]
        mine = frame[frame["impl"] == "skeleton-moe"]
        assert (mine["status"] == "ok").all() and (mine["rel_err"] < 1e-5).all()
    finally:
        registry.unregister("skeleton-moe")
        sys.modules.pop("moebench_plugin_moe", None)


def test_suites_command_marks_a_suite_that_needs_a_missing_plugin(
    tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import moebench.catalog

    needs_plugin = tmp_path / "needs.toml"
    needs_plugin.write_text(
        '[grid]\nimpl = ["not-installed"]\nhidden = 8\nffn = 8\nnum_experts = 2\n'
        "top_k = 1\nbatch = 1\nseq_len = 2\n"
    )
    monkeypatch.setattr(moebench.catalog, "builtin_suites", lambda: {"needs": needs_plugin})
    assert cli_main(["suites"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "│ needs │ - │ - │" in out and "unknown impl 'not-installed'" in out


def test_suites_command_names_a_missing_required_package_once(
    tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A suite whose [suite] requires a package not installed (the built-in `peers` from a
    wheel): its description still shows, and one line names the package and how to install
    it, for both devices (not a list of unknown impls per device)."""
    import moebench.catalog

    needs_plugin = tmp_path / "needs.toml"
    needs_plugin.write_text(
        '[suite]\ndescription = "a peer library"\n'
        'requires = { moebench-not-installed = "pip install ./plugin" }\n'
        '[grid]\nimpl = ["not-installed"]\nhidden = 8\nffn = 8\nnum_experts = 2\n'
        "top_k = 1\nbatch = 1\nseq_len = 2\n"
    )
    monkeypatch.setattr(moebench.catalog, "builtin_suites", lambda: {"needs": needs_plugin})
    assert cli_main(["suites"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "│ needs │ - │ - │ a peer library │" in out
    assert out.count("does not load:") == 1
    assert (
        "does not load: needs (cpu, cuda): "
        f"{needs_plugin}: [suite] requires 'moebench-not-installed', which is not "
        "installed here: pip install ./plugin"
    ) in out
    assert "unknown impl" not in out


def test_builtin_suites_found_from_a_source_checkout_without_install(monkeypatch):
    """PYTHONPATH=. on a machine where moebench is not installed: the package
    `moebench.suites` does not exist, and the names still resolve to suites/*.toml."""
    from moebench import catalog

    def not_installed(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(catalog.resources, "files", not_installed)
    suites = catalog.builtin_suites()
    assert {"smoke", "default", "peers"} <= set(suites)
    assert catalog.resolve_suite("smoke") == suites["smoke"]
    assert suites["smoke"].parent.name == "suites"


def test_the_shipped_tuning_choices_are_package_data() -> None:
    """The fused layer's tuned block sizes moebench ships (`tuning.shipped_dir()`) are
    listed as package data, so a wheel carries them (.ci/outsider.sh checks the wheel)."""
    from moebench.impls.triton import tuning

    setuptools = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_data = setuptools["package-data"]
    package = CHECKOUT / "moebench" / "impls" / "triton"
    assert tuning.shipped_dir().parent == package
    assert f"{tuning.shipped_dir().name}/*.json" in package_data["moebench.impls.triton"]
