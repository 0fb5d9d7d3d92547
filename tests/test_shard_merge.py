"""Shards (`run --shard I/N`) and `moebench merge`: the shards of a suite, merged, are the
unsharded run case for case; merge refuses what cannot be one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moebench.cli import main as cli_main
from moebench.merge import merge_runs
from moebench.runner import run_cases
from moebench.shard import ShardError, assign_shards, expected_cost, parse_shard, select_shard
from moebench.store import ResultStore, read_metadata, read_run
from moebench.suite import load_suite
from tests.conftest import FAST_PLAN


@pytest.fixture
def one_thread():
    """One intra-op thread: a sleeping OpenMP pool stalls tiny cases on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(cases, out: Path, shard: tuple[int, int] | None = None) -> Path:
    # Empty ceilings: no roofline, and no seconds spent measuring the machine per run.
    meta: dict = {"ceilings": {}}
    if shard:
        meta["shard"] = {"index": shard[0], "count": shard[1]}
    chosen = select_shard(cases, *shard) if shard else cases
    outcome = run_cases(
        chosen, suite_name="smoke", plan=FAST_PLAN, timeout_s=60, out_root=out,
        isolate=False, meta=meta,
    )  # fmt: skip
    return outcome.run_dir


def test_shards_of_smoke_merged_equal_the_unsharded_run(tmp_path: Path, one_thread) -> None:
    cases = list(load_suite("smoke").cases)
    whole = read_run(_run(cases, tmp_path / "whole"))
    shard_dirs = [_run(cases, tmp_path / "shards", (i, 3)) for i in (1, 2, 3)]
    sizes = [len(read_run(d)) for d in shard_dirs]
    assert sum(sizes) == len(cases) and min(sizes) >= len(cases) // 3 - 2
    assert cli_main(["merge", *map(str, shard_dirs), "--out", str(tmp_path / "merged")]) == 0
    (merged_dir,) = (tmp_path / "merged").iterdir()
    merged = read_run(merged_dir)
    assert sorted(merged["case_id"]) == sorted(whole["case_id"])  # each case once
    statuses = dict(zip(merged["case_id"], merged["status"]))
    assert statuses == dict(zip(whole["case_id"], whole["status"]))
    assert set(merged["run_id"]) == {merged_dir.name}
    meta = read_metadata(merged_dir)
    assert [m["shard"]["index"] for m in meta["merged_from"]] == [1, 2, 3]
    assert meta["cases_total"] == len(cases) and "shard" not in meta


def test_a_merged_run_lands_beside_its_shards(tmp_path: Path, monkeypatch) -> None:
    """Without --out, the merged run goes where the shards are (it went to results/ of
    the working directory, where `show latest --root SHARDS` does not look)."""
    cases = list(load_suite("smoke").cases)[:4]
    shard_dirs = [_run(cases, tmp_path / "shards", (i, 2)) for i in (1, 2)]
    monkeypatch.chdir(tmp_path)
    assert cli_main(["merge", *map(str, shard_dirs)]) == 0
    assert not (tmp_path / "results").exists()
    merged = set((tmp_path / "shards").iterdir()) - set(shard_dirs)
    (merged_dir,) = merged
    assert len(read_run(merged_dir)) == 4
    # run ids under --root: beside them too
    ids = [d.name for d in shard_dirs]
    assert cli_main(["merge", *ids, "--root", str(tmp_path / "shards")]) == 0
    assert len(list((tmp_path / "shards").iterdir())) == 4


def test_shards_are_deterministic_disjoint_and_balanced() -> None:
    cases = list(load_suite("default", device="cpu").cases)
    assert assign_shards(cases, 4) == assign_shards(list(cases), 4)
    shards = [select_shard(cases, i, 4) for i in range(1, 5)]
    ids = [c.case_id for shard in shards for c in shard]
    assert sorted(ids) == sorted(c.case_id for c in cases)
    loads = [sum(expected_cost(c) for c in shard) for shard in shards]
    # Greedy longest-first: no shard exceeds another by more than the largest case.
    assert max(loads) - min(loads) <= max(expected_cost(c) for c in cases)
    # Each shard keeps the suite's order.
    order = {c.case_id: i for i, c in enumerate(cases)}
    assert all([order[c.case_id] for c in s] == sorted(order[c.case_id] for c in s) for s in shards)


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "a/b", "1-3", ""])
def test_bad_shard_specs(text: str) -> None:
    with pytest.raises(ShardError, match="--shard"):
        parse_shard(text)


def test_more_shards_than_cases_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["run", "smoke", "--filter", "impl=dense", "--shard", "9/9"]) == 2
    assert "no case falls in this shard" in capsys.readouterr().out


def _fake_run(root: Path, run_id: str, suite: str, case_ids: list[str], **meta) -> Path:
    store = ResultStore.create(root, run_id)
    store.write_meta({"run_id": run_id, "suite": suite, **meta})
    for case_id in case_ids:
        store.write_row({"run_id": run_id, "case_id": case_id, "suite": suite, "status": "ok"})
    store.consolidate()
    return store.run_dir


def test_merge_refuses_mixed_suites_versions_and_repeated_cases(tmp_path: Path) -> None:
    env = {"environment": {"moebench": "0.1.0"}}
    a = _fake_run(tmp_path, "a", "smoke", ["c1", "c2"], **env)
    b = _fake_run(tmp_path, "b", "default", ["c3"], **env)
    c = _fake_run(tmp_path, "c", "smoke", ["c3"], environment={"moebench": "0.2.0"})
    d = _fake_run(tmp_path, "d", "smoke", ["c2", "c4"], **env)
    e = _fake_run(tmp_path, "e", "smoke", ["c5"], timing={"warmup_ms": 0.0}, **env)
    out = tmp_path / "merged"
    refused = ((b, "different suites"), (c, "moebench versions"), (d, "case c2"), (e, "timing"))
    for other, message in refused:
        with pytest.raises(ValueError, match=message):
            merge_runs([str(a), str(other)], str(tmp_path), str(out))
    assert not out.exists()  # nothing written when refused
    assert cli_main(["merge", str(a), str(b), "--out", str(out)]) == 2


def test_merge_notes_missing_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"environment": {"moebench": "0.1.0"}}
    a = _fake_run(tmp_path, "a", "smoke", ["c1"], shard={"index": 1, "count": 3}, **env)
    b = _fake_run(tmp_path, "b", "smoke", ["c2"], shard={"index": 3, "count": 3}, **env)
    assert cli_main(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    assert "shard(s) 2 of 3 missing" in capsys.readouterr().out
    (merged,) = (tmp_path / "m").iterdir()
    assert json.loads((merged / "run.json").read_text())["cases_total"] == 2


def test_a_merged_run_reports_the_highest_ceilings_of_its_parts() -> None:
    """merge keeps each part's ceilings (merged_from); the report's roof and header use
    the highest of each, since each row's roofline_frac already used its own run's."""
    from moebench.report.data import RunInfo

    parts = [
        {"run_id": "a", "ceilings": {"copy_gbps": 4000.0, "matmul_tflops_bfloat16": 806.0}},
        {"run_id": "b", "ceilings": {"copy_gbps": 4200.0, "matmul_tflops_bfloat16": 790.0}},
        {"run_id": "c", "ceilings": None},
    ]
    merged = RunInfo(0, "R1", "m", "m", "m", {"merged_from": parts}, 3)
    assert merged.ceilings == {"copy_gbps": 4200.0, "matmul_tflops_bfloat16": 806.0}
    own = RunInfo(0, "R1", "r", "r", "r", {"ceilings": {"copy_gbps": 1.0}}, 1)
    assert own.ceilings == {"copy_gbps": 1.0}
    assert RunInfo(0, "R1", "r", "r", "r", {}, 1).ceilings == {}


def test_merge_prints_the_folder_it_wrote_as_written(
    tmp_path: Path, one_thread, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out folder with brackets in its name is printed as it is (rich markup would
    read "[v2]" as a tag and drop it)."""
    cases = list(load_suite("smoke").cases)[:4]
    shard_dirs = [_run(cases, tmp_path / "shards", (i, 2)) for i in (1, 2)]
    out = tmp_path / "merged[v2]"
    capsys.readouterr()
    assert cli_main(["merge", *map(str, shard_dirs), "--out", str(out)]) == 0
    (merged_dir,) = out.iterdir()
    assert f"merged 2 runs, 4 cases: {merged_dir}" in capsys.readouterr().out


def test_a_merge_that_cannot_be_written_leaves_nothing(
    tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk half-way through a merge: one line naming the file, exit 2, and no
    half-merged run left beside the shards."""
    import errno

    import moebench.store

    a = _fake_run(tmp_path, "a", "smoke", ["c1", "c2"])
    b = _fake_run(tmp_path, "b", "smoke", ["c3"])
    real_write = moebench.store.pq.write_table
    calls = []

    def full_after_one(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "Error writing bytes to file")
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(moebench.store.pq, "write_table", full_after_one)
    assert cli_main(["merge", str(a), str(b)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "error: cannot write " in out and "No space left on device" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
