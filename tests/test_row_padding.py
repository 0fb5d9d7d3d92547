"""scripts/row_padding.py: the rows the fused layer's GEMMs compute per real row, from a
run's routing; read back from the committed H100 peers run, and bad input refused."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "row_padding.py"
H100_PEERS = Path(__file__).parents[1] / "results/reference/h100-peers-v34/results.parquet"


@pytest.fixture(scope="module")
def script() -> dict:
    return runpy.run_path(str(SCRIPT))


def test_padded_rows_pads_each_expert_to_whole_blocks(script) -> None:
    padded = script["padded_rows"]
    # 260 rows: two full blocks and a 4-row tail; 0 rows: nothing; 64 and 65: the half
    assert padded([260, 0, 64, 65, 128], 128) == 384 + 0 + 128 + 128 + 128
    assert padded([260, 0, 64, 65, 128], 128, half_tail=True) == 320 + 0 + 64 + 128 + 128
    assert padded([260], 16) == 272 and padded([1], 1) == 1


def test_the_h100_run_shows_mixtral_at_1024_tokens_computing_a_quarter_more(
    script, capsys: pytest.CaptureFixture[str]
) -> None:
    assert script["main"]([str(H100_PEERS), "--blocks", "128", "64", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "preset", "tokens", "graphed", "rows/expert", "max/mean", "x128", "x64", "x16",
        "x128", "half",
    ]  # fmt: skip
    mixtral = [
        line.split() for line in lines if line.split()[:3] == ["mixtral-8x7b", "1024", "False"]
    ]
    # 256 rows an expert, the busiest 1.19x: 1.25x the rows at 128-row blocks
    assert mixtral == [
        ["mixtral-8x7b", "1024", "False", "256.0", "1.19", "1.250", "1.125", "1.031", "1.125"]
    ]


def test_the_down_waves_of_mixtral_at_1024_tokens(script, capsys) -> None:
    """20 row blocks x 16 columns of 256 on 132 programs: 2.42 waves, 81% busy (version
    37's counters read 77%)."""
    assert script["waves"](320, 132) == (320 / 132, 320 / 396)
    assert script["waves"](0, 132) == (0.0, 0.0)
    assert script["main"]([str(H100_PEERS), "--blocks", "128", "--down-waves", "132"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-3:] == ["half", "down", "N256"]
    mixtral = [
        line.split() for line in lines if line.split()[:3] == ["mixtral-8x7b", "1024", "False"]
    ]
    assert mixtral[0][-1] == "2.42/81%"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["no-such-run"], "no run or parquet file 'no-such-run'"),
        ([str(H100_PEERS), "--impl", "no-such-impl"], "no forward case of impl 'no-such-impl'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(script, capsys, argv, said) -> None:
    assert script["main"](argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said in err and len(err.splitlines()) == 1


def test_a_block_under_two_rows_is_refused(script, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        script["main"]([str(H100_PEERS), "--blocks", "0"])
    assert exit_.value.code == 2 and "--blocks must be 2 or more rows" in capsys.readouterr().err
