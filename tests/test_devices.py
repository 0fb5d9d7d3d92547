"""`--devices`: parsing, the physical GPU behind an index, and single-device cases spread
over several (faked) GPUs, one pinned worker each, every case once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from moebench.devices import DevicesError, parse_devices, physical_index
from moebench.measure.timing import TimingPlan
from moebench.pool import run_on_gpus, weight_groups
from moebench.runner import run_cases
from moebench.store import read_run, resolve_run
from tests.conftest import tiny_case

PLUGIN = str(Path(__file__).with_name("plugin_pinned.py"))


def test_parse_devices_all_and_lists():
    assert parse_devices("all", available=3) == [0, 1, 2]
    assert parse_devices("cuda:2,cuda:0", available=3) == [2, 0]
    assert parse_devices("1", available=2) == [1]


@pytest.mark.parametrize(
    ("spec", "available", "message"),
    [
        ("cuda:4", 2, "'cuda:4' does not exist; this process sees 2 GPU(s), cuda:0 to cuda:1"),
        ("cuda:0,cuda:0", 2, "'cuda:0' is named twice"),
        ("cpu", 2, "'cpu' is not a GPU"),
        ("all", 0, "no CUDA device is visible"),
    ],
)
def test_parse_devices_names_the_bad_entry(spec, available, message):
    with pytest.raises(DevicesError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_devices(spec, available=available)


def test_physical_index_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert physical_index(1) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert physical_index(0) == 3 and physical_index(1) == 5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc,GPU-def")
    assert physical_index(1) == "GPU-def"


def test_weight_groups_keep_cases_of_one_weight_set_together():
    cases = [
        tiny_case(impl, num_experts=experts, batch=batch)
        for experts in (4, 8)
        for batch in (1, 2)
        for impl in ("grouped", "reference")
    ]
    groups = weight_groups(cases)
    assert [len(g) for g in groups] == [4, 4]  # tokens and impl share the weights
    assert [c for g in groups for c in g] == cases


def test_run_on_gpus_measures_each_case_once_concurrently():
    cases = [tiny_case("grouped", num_experts=4 + i) for i in range(8)]
    running, most = set(), [0]
    lock = threading.Lock()

    class Fake:
        def __init__(self, gpu):
            self.gpu, self.closed = gpu, False

        def close(self):
            self.closed = True

    made: list[Fake] = []

    def make(gpu):
        made.append(Fake(gpu))
        return made[-1]

    def run_one(case, executor, gpu):
        with lock:
            running.add(gpu)
            most[0] = max(most[0], len(running))
        time.sleep(0.05)
        with lock:
            running.discard(gpu)
        return {"case_id": case.case_id, "gpu": gpu}

    rows = []
    interrupted = run_on_gpus(cases, [0, 1, 2], make, run_one, lambda c, r: rows.append(r))
    assert not interrupted
    assert sorted(r["case_id"] for r in rows) == sorted(c.case_id for c in cases)
    assert most[0] >= 2  # really concurrent
    assert {r["gpu"] for r in rows} == {0, 1, 2}
    assert all(e.closed for e in made)


def test_run_on_gpus_surfaces_a_worker_error():
    def run_one(case, executor, gpu):
        raise RuntimeError("boom")

    class Quiet:
        def close(self):
            pass

    with pytest.raises(RuntimeError, match="boom"):
        run_on_gpus([tiny_case()], [0, 1], lambda g: Quiet(), run_one, lambda c, r: None)


def test_a_run_over_two_faked_gpus_pins_each_worker_and_keeps_every_case(tmp_path):
    cases = [tiny_case("test-pinned", num_experts=e, batch=b) for e in (4, 8) for b in (1, 2)]
    plan = TimingPlan(budget_ms=10, warmup=1, min_repeats=2, max_repeats=3)
    outcome = run_cases(
        cases,
        suite_name="pinned",
        plan=plan,
        timeout_s=120,
        out_root=tmp_path,
        plugins=(PLUGIN,),
        gpus=[0, 1],
    )
    frame = read_run(resolve_run(outcome.run_id, tmp_path))
    assert sorted(frame["case_id"]) == sorted(c.case_id for c in cases)
    assert set(frame["status"]) == {"ok"}
    assert set(frame["gpu_index"]) == {0, 1}  # two weight sets: one per worker
    # each worker saw exactly the GPU it was pinned to
    assert (frame["probe_visible_devices"] == frame["gpu_index"].astype(str)).all()
