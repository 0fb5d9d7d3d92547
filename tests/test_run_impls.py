"""`moebench run SUITE --impls A,B`: a suite's cases run by other implementations (a
plugin of one's own beside `reference`, say), end to end with the parquet read back; and
what `run` says when a `--plugin` registers implementations the suite does not run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moebench.cli import main as cli_main
from moebench.store import read_run
from moebench.suite import SuiteError, load_suite, with_impls
from tests.test_bad_input import TINY_SUITE

WRONG_PLUGIN = str(Path(__file__).with_name("plugin_wrong.py"))
FORWARD_ONLY_PLUGIN = """
from moebench import register
from moebench.impls.grouped import GroupedMoE

@register("test-forward-only", family="test", description="no train", modes=("forward",))
def build(weights, case):
    return GroupedMoE(weights, case)
"""


def _said(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def _suite(tmp_path: Path) -> Path:
    """The tiny suite at 8 tokens (the zeroed token is token 5), forward and train."""
    path = tmp_path / "tiny.toml"
    path.write_text(
        TINY_SUITE.replace("seq_len = 2", "seq_len = 8") + 'mode = ["forward", "train"]\n'
    )
    return path


def test_impls_runs_the_suites_cases_with_a_plugin_beside_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every case of the suite, once per named implementation and in the suite's order
    (its own `grouped` gone); the plugin's wrong layer is a `mismatch`, reference is ok."""
    suite = _suite(tmp_path)
    out = tmp_path / "results"
    argv = ["run", str(suite), "--out", str(out), "--in-process", "--quiet"]
    argv += ["--plugin", WRONG_PLUGIN, "--impls", "test-zeroed-token,reference"]
    assert cli_main(argv) == 0
    (run_dir,) = out.iterdir()
    frame = read_run(run_dir)
    assert list(frame["impl"]) == ["test-zeroed-token", "reference"] * 2
    assert list(frame["mode"]) == ["forward", "forward", "train", "train"]
    status = dict(zip(frame["impl"] + " " + frame["mode"], frame["status"], strict=True))
    assert status == {
        "test-zeroed-token forward": "mismatch",
        "test-zeroed-token train": "mismatch",
        "reference forward": "ok",
        "reference train": "ok",
    }
    assert "--impls" not in _said(capsys)  # nothing left out, nothing to say


def test_impls_leaves_out_what_an_implementation_cannot_run_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = tmp_path / "forward_only.py"
    plugin.write_text(FORWARD_ONLY_PLUGIN)
    out = tmp_path / "results"
    argv = ["run", str(_suite(tmp_path)), "--out", str(out), "--in-process", "--quiet"]
    assert cli_main([*argv, "--plugin", str(plugin), "--impls", "test-forward-only"]) == 0
    text = " ".join(_said(capsys).split())
    assert (
        "warning: --impls: 1 case(s) left out: impl 'test-forward-only' does not support "
        "mode 'train'; allowed for it: forward"
    ) in text
    (run_dir,) = out.iterdir()
    frame = read_run(run_dir)
    assert list(frame["impl"] + " " + frame["mode"]) == ["test-forward-only forward"]
    assert list(frame["status"]) == ["ok"]


def test_a_plugin_the_suite_does_not_run_is_named_with_the_option_that_runs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run smoke --plugin mine.py` ran smoke without a word about mine.py's layers."""
    plugin = tmp_path / "forward_only.py"
    plugin.write_text(FORWARD_ONLY_PLUGIN)
    suite = _suite(tmp_path)
    argv = ["run", str(suite), "--out", str(tmp_path / "r"), "--in-process", "--quiet"]
    assert cli_main([*argv, "--plugin", str(plugin), "--filter", "mode=forward"]) == 0
    text = " ".join(_said(capsys).split())
    assert (
        "warning: --plugin registered test-forward-only, which tiny does not run (it runs "
        "reference, grouped): --impls test-forward-only,reference runs its cases with them"
    ) in text


@pytest.mark.parametrize(
    ("impls", "message"),
    [
        ("nosuch,reference", r"--impls: unknown implementation 'nosuch'; known: .*reference"),
        ("dense,", r"--impls: unknown implementation ''"),
    ],
)
def test_impls_refuses_a_name_that_is_no_implementation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], impls: str, message: str
) -> None:
    argv = ["run", str(_suite(tmp_path)), "--out", str(tmp_path / "r"), "--impls", impls]
    assert cli_main(argv) == 2
    assert re.search(message, " ".join(_said(capsys).split()))
    assert not (tmp_path / "r").exists()


def test_impls_with_no_case_left_is_refused(tmp_path: Path) -> None:
    """Every case left out (a train-only suite for a forward-only layer): an error, not
    an empty run."""
    import moebench.plugins

    plugin = tmp_path / "forward_only.py"
    plugin.write_text(FORWARD_ONLY_PLUGIN)
    moebench.plugins.import_plugin(str(plugin))
    path = tmp_path / "train.toml"
    path.write_text(TINY_SUITE + 'mode = "train"\n')
    with pytest.raises(SuiteError, match=r"--impls test-forward-only: no case of .* left \("):
        with_impls(load_suite(path), ["test-forward-only"])


def test_impls_leaves_a_single_device_layer_out_of_multi_rank_cases(tmp_path: Path) -> None:
    """A case on two ranks needs an expert-parallel layer: `grouped` there is left out
    (it was an `error` row), `ep-dropless` kept."""
    path = tmp_path / "ep.toml"
    path.write_text(TINY_SUITE.replace('impl = ["reference", "grouped"]', 'impl = "ep-dropless"'))
    path.write_text(path.read_text() + "world_size = 2\n")
    suite, notes = with_impls(load_suite(path), ["grouped", "ep-dropless"])
    assert [case.impl for case in suite.cases] == ["ep-dropless"]
    (note,) = notes  # (the expert-parallel impls it names include other tests' plugins)
    assert note.startswith(
        "--impls: 1 case(s) left out: impl 'grouped' runs on one device, but world_size=2; "
        "multi-rank cases need an expert-parallel impl (ep-capacity, ep-dropless, ep-overlap"
    )
