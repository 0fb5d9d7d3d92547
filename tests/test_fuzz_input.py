"""Fuzzing the inputs a user hands moebench: random suite TOML (well-formed or not) and
random parquet tables. Whatever the input, the command ends with an exit code and a
message (never a traceback), and writes nothing outside the results root it was given.

Measurement is replaced by a stub (the fuzzing is about inputs, not layers), so a suite
that validates runs through the real runner and store in milliseconds per case.
MOEBENCH_FUZZ_EXAMPLES=500 searches harder than CI's default.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moebench.cli import main  # noqa: E402
from moebench.names import name_problem  # noqa: E402
from moebench.suite import GRID_KEYS  # noqa: E402

FUZZ = settings(
    max_examples=int(os.environ.get("MOEBENCH_FUZZ_EXAMPLES", "25")),  # CI: seconds
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
NASTY_TEXT = st.sampled_from(
    ["", "[grid]", "[[zip]]", "../../x", "a/b", "exp[v2]", "/abs", "..", "é", "x" * 120, "\x00"]
)
TEXT = st.one_of(NASTY_TEXT, st.text(max_size=12))
KNOWN_VALUES = {
    "impl": st.sampled_from(["reference", "grouped", "dense", "nope", "[x]"]),
    "preset": st.sampled_from(["", "switch-base-8", "mixtral-8x7b", "../p"]),
    "dtype": st.sampled_from(["float32", "bfloat16", "int8"]),
    "mode": st.sampled_from(["forward", "train", "back"]),
    "routing": st.sampled_from(["uniform", "zipf:1.2", "hot:1:0.5", "zipf:-1", "hot:x"]),
    "weights": st.sampled_from(["random", "redundant:0.9", "checkpoint:../x:0", "w[1]"]),
}
SCALAR = st.one_of(st.integers(-3, 70), st.floats(allow_nan=False, width=32), st.booleans(), TEXT)


def _value(key: str) -> st.SearchStrategy:
    item = KNOWN_VALUES.get(key, SCALAR)
    return st.one_of(item, st.lists(item, min_size=0, max_size=2))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a TOML basic string


KEYS = st.one_of(st.sampled_from([*GRID_KEYS, "name", "device", "tokens", "budget_ms"]), TEXT)
TABLE = st.dictionaries(KEYS, st.just(None), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: _value(k) for k in keys})
)
SUITE_NAMES = st.one_of(st.just("suite"), st.just("grid"), st.sampled_from(
    ["options", "cpu.grid", "cuda.suite", "zip", "exclude", "include", "[odd]"]
), TEXT)  # fmt: skip


@st.composite
def suite_texts(draw) -> str:
    """TOML text: random tables of known and unknown keys, or plain junk."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=60))
    lines = ['[suite]\ndevice = "cpu"\nbudget_ms = 1\nwarmup = 0\nmin_repeats = 1\n']
    name = draw(st.one_of(st.none(), st.sampled_from(["fuzz-1", "f.2+x"]), TEXT))
    if name is not None:
        lines.append(f"name = {_toml_value(name)}\n")
    base = {"impl": "reference", "hidden": 8, "ffn": 8, "num_experts": 2, "top_k": 1}
    base.update(batch=1, seq_len=1)
    valid = st.fixed_dictionaries(
        {},
        optional={
            "impl": st.lists(st.sampled_from(["reference", "grouped", "dense"]), min_size=1),
            "batch": st.lists(st.integers(1, 3), min_size=1, max_size=3),
            "mode": st.sampled_from(["forward", "train"]),
            "routing": st.sampled_from(["uniform", "zipf:1.2"]),
        },
    )
    grid = {**base, **draw(st.one_of(valid, TABLE))} if draw(st.booleans()) else draw(TABLE)
    lines.append(
        "[grid]\n" + "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in grid.items())
    )
    for table in draw(st.lists(SUITE_NAMES, max_size=2, unique=True)):
        if table in ("suite", "grid"):
            continue
        brackets = ("[[", "]]") if table in ("zip", "exclude", "include") else ("[", "]")
        body = draw(TABLE)
        lines.append(
            f"{brackets[0]}{json.dumps(table) if '.' not in table else table}{brackets[1]}\n"
            + "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in body.items())
        )
    return "".join(lines)


def _stub_measurement(monkeypatch) -> None:
    from moebench import env, runner

    monkeypatch.setattr(
        runner, "measure_case", lambda case, plan, cache, ceilings: {"status": "ok"}
    )
    monkeypatch.setattr(runner, "measure_ceilings", lambda device, dtypes: {})
    monkeypatch.setattr(env, "collect_environment", lambda plugins=(): {})
    monkeypatch.setattr("moebench.run_command.CONFIRM_CASES", 40)  # bigger random suites: refused
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)


def _everything_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


@FUZZ
@given(text=suite_texts())
def test_random_suites_end_in_a_message_and_stay_in_the_root(text, monkeypatch, capsys):
    _stub_measurement(monkeypatch)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        suite = work / "fuzz.toml"
        suite.write_text(text, encoding="utf-8", errors="surrogatepass")
        root = work / "inner" / "results"
        root.parent.mkdir()
        before = _everything_under(work)
        code = main(["run", str(suite), "--out", str(root), "--in-process", "--quiet"])
        output = capsys.readouterr()
        assert code in (0, 2), output
        assert "Traceback" not in output.out + output.err
        outside = {p for p in _everything_under(work) - before if root not in (p, *p.parents)}
        assert not outside, outside
        for run_dir in root.iterdir() if root.exists() else ():
            assert name_problem(run_dir.name) is None


COLUMN_NAMES = st.one_of(
    st.sampled_from(
        ["case_id", "impl", "status", "latency_ms", "samples_ms", "tokens", "hidden", "error",
         "exact", "rel_err", "suite", "run_id", "started_at", "peak_mem_bytes", "routing"]
    ),
    TEXT.filter(lambda t: "\x00" not in t),
)  # fmt: skip
ARRAYS = {
    "int": lambda n: st.lists(st.one_of(st.none(), st.integers(-9, 2**40)), min_size=n, max_size=n),
    "float": lambda n: st.lists(st.one_of(st.none(), st.floats()), min_size=n, max_size=n),
    "text": lambda n: st.lists(st.one_of(st.none(), TEXT), min_size=n, max_size=n),
    "bool": lambda n: st.lists(st.one_of(st.none(), st.booleans()), min_size=n, max_size=n),
    "list": lambda n: st.lists(
        st.one_of(st.none(), st.lists(st.floats(), max_size=3)), min_size=n, max_size=n
    ),
}  # fmt: skip


@st.composite
def tables(draw) -> pa.Table:
    rows = draw(st.integers(0, 3))
    names = draw(st.lists(COLUMN_NAMES, max_size=7, unique=True))
    columns = {}
    for name in names:
        kind = draw(st.sampled_from(sorted(ARRAYS)))
        columns[name] = pa.array(draw(ARRAYS[kind](rows)))
    return pa.table(columns) if columns else pa.table({"x": pa.array([], pa.int64())})


@FUZZ
@given(table=tables(), command=st.sampled_from(["show", "export", "report"]))
def test_random_parquet_tables_end_in_a_message(table, command, capsys):
    if command == "report":
        pytest.importorskip("plotly")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        path = work / "table.parquet"
        pq.write_table(table, path)
        out = work / "out" / "file.out"
        extra = {
            "show": [],
            "export": ["--format", "csv", "-o", str(out)],
            "report": ["-o", str(out)],
        }
        before = _everything_under(work)
        code = main([command, str(path), "--root", str(work / "results"), *extra[command]])
        output = capsys.readouterr()
        assert code in (0, 2), output
        assert "Traceback" not in output.out + output.err
        new = _everything_under(work) - before
        assert new <= {out, out.parent}, new
