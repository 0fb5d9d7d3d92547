"""Expert parallelism on torch.distributed: gloo ranks on the CPU (world sizes 1, 2, 4),
the output against the single-device reference, bytes on the wire against a hand count,
skew, failing ranks, the CLI with --nproc; CUDA/NCCL checks skipped without a GPU.

Ranks are real processes (forkserver children of this process, kept across the cases of
one launcher), so these tests keep the shapes tiny. `MOEBENCH_TEST_TORCHRUN=1` adds a run
under `torchrun` (about 30 s on 2 cores).

Shape legend: T tokens, D hidden, E experts, K top_k, W ranks, L = E / W.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moebench.impls.expert_parallel  # noqa: F401  (registers the ep-* implementations)
from moebench.case import Case, LayerShape, Workload
from moebench.cli import main as cli_main
from moebench.distributed.dispatcher import COUNT_BYTES
from moebench.distributed.group import ep_problem, token_bounds
from moebench.distributed.launcher import SpawnLauncher
from moebench.measure.case_run import TOLERANCE, WeightCache, measure_case
from moebench.measure.phases import EP_PHASES as PHASES
from moebench.measure.phases import PhaseTimer
from moebench.plugins import import_plugin
from moebench.routing import Router, routing_bias
from moebench.runner import run_cases
from moebench.store import read_run
from moebench.weight_sources import make_weights
from moebench.weights import make_inputs
from tests.conftest import FAST_PLAN, tiny_case

REPO = Path(__file__).resolve().parents[1]
EP_PLUGIN = "moebench.impls.expert_parallel"  # until it is among registry.BUILTIN_MODULES
EP_IMPLS = ("ep-dropless", "ep-capacity", "ep-overlap")
PHASE_COLUMNS = [f"{name}_ms" for name in PHASES if name != "exposed"]

FAULTS = '''
"""Expert-parallel layers whose rank 1 misbehaves on purpose."""
import os
import time

from moebench.distributed.group import EP_FAMILY, current_group
from moebench.distributed.layer import ExpertParallelMoE
from moebench.registry import register


class Faulty(ExpertParallelMoE):
    fault = ""
    calls = 0
    first = None

    def forward(self, x_TD):
        self.calls += 1
        if self.fault == "later" and self.rank == 1 and self.calls > 2:
            return super().forward(x_TD) * 1.5  # right on the two calls before timing
        if self.fault == "kept":  # every rank computes (the all-to-alls), returns the first
            y_TD = super().forward(x_TD)
            self.first = y_TD if self.first is None else self.first
            return self.first
        if self.rank == 1:
            if self.fault == "raises":
                raise ValueError("rank one fails on purpose")
            if self.fault == "hangs":
                time.sleep(3600)
            if self.fault == "dies":
                os._exit(3)
            if self.fault == "wrong":
                return super().forward(x_TD) * 1.5
        return super().forward(x_TD)


def builder(fault):
    def build(weights, case):
        layer = Faulty(weights, case, current_group())
        layer.fault = fault
        return layer
    return build


for fault in ("raises", "hangs", "dies", "wrong", "later", "kept"):
    register(f"test-ep-{fault}", family=EP_FAMILY, description=fault, modes=("forward",))(
        builder(fault)
    )
'''


def ep_case(impl: str = "ep-dropless", **changes) -> Case:
    """A tiny expert-parallel case on the CPU."""
    defaults = {"num_experts": 8, "capacity_factor": 1.0, "seq_len": 16}
    return tiny_case(impl, **{**defaults, **changes})


@pytest.fixture(scope="module")
def ranks():
    """Four gloo ranks, shared by the tests of this module (cases of world size W run on
    ranks 0 .. W-1)."""
    launcher = SpawnLauncher(FAST_PLAN, (EP_PLUGIN,), nproc=4, cases=[])
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plugins") / "ep_faults.py"
    path.write_text(FAULTS)
    import_plugin(str(path))
    return str(path)


def hand_count(case: Case, chunks: int = 1) -> tuple[int, list[int]]:
    """(comm_bytes, rows each rank receives) from the router run on the whole batch in this
    process: rank r owns tokens [r*T/W, (r+1)*T/W) and experts [r*L, (r+1)*L); every row
    leaving its rank crosses the wire twice (dispatch, combine), D x 4 bytes (float32)
    each; the counts are L int64 per peer per chunk."""
    W, E, D = case.world_size, case.shape.num_experts, case.shape.hidden
    T, L = case.tokens, E // W
    assert T % W == 0
    weights = make_weights(case)
    x_TD = make_inputs(case, 1)[0]
    _, expert_ids_TK, _ = Router(weights.w_router_DE, weights.router_bias_E, case.shape)(x_TD)
    remote, received = 0, [0] * W
    for rank in range(W):
        owner_TK = expert_ids_TK[rank * T // W : (rank + 1) * T // W] // L
        remote += int((owner_TK != rank).sum())
        for dest in range(W):
            received[dest] += int((owner_TK == dest).sum())
    return 2 * remote * D * 4 + W * (W - 1) * L * chunks * COUNT_BYTES, received


# ------------------------------------------------------------------------- pure helpers


def test_token_bounds_and_divisibility():
    assert token_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert token_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert ep_problem(8, 4) is None
    assert "num_experts=6 is not divisible by world_size=4" in ep_problem(6, 4)


# ------------------------------------------------------------------ ranks: correctness


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ep_output_equals_reference_on_gloo(ranks, world_size):
    cases = [ep_case(impl, world_size=world_size) for impl in EP_IMPLS]
    cases += [  # skewed routing, a shared expert and a batch that does not split evenly
        ep_case(
            impl,
            world_size=world_size,
            routing="zipf:1.2",
            shared_experts=1,
            batch=1,
            seq_len=18,
            top_k=3,
        )
        for impl in EP_IMPLS
    ]
    for case in cases:
        row = ranks.run(case, timeout_s=60)
        assert row["status"] == "ok", (case.label(), row.get("error"))
        assert row["rel_err"] <= TOLERANCE["float32"], case.label()
        assert f"gloo x{world_size}" in row["impl_detail"]
        assert len(row["tokens_per_rank"]) == world_size
        kept = round(case.tokens * case.shape.top_k * (1 - row["dropped_frac"]))
        assert sum(row["tokens_per_rank"]) == sum(row["tokens_per_expert"]) == kept
        assert all(row[column] >= 0 for column in PHASE_COLUMNS)
        assert row["expert_ms"] > 0 and row["router_ms"] > 0
        assert row["comm_ms"] == pytest.approx(row["dispatch_ms"] + row["combine_ms"])
        assert row["comm_ms"] > 0  # a one-rank all-to-all is still a (local) copy
        assert row["latency_ms"] > 0 and row["repeats"] == len(row["samples_ms"])
        if world_size == 1:
            assert row["comm_bytes"] == 0 and row["comm_gbps"] is None
        else:
            assert row["comm_bytes"] > 0 and row["comm_gbps"] > 0
        if case.impl == "ep-capacity":
            assert row["fidelity_err"] >= 0 and 0 <= row["dropped_frac"] < 1
        else:
            assert row["dropped_frac"] == 0
        if case.impl == "ep-overlap":
            assert 0 <= row["comm_hidden_frac"] <= 1 and row["chunks"] == 2
            assert row["exposed_comm_ms"] >= 0
        else:
            assert row["comm_hidden_frac"] == 0


@pytest.mark.parametrize("impl", EP_IMPLS)
def test_ep_layers_compute_the_router_convention(ranks, impl):
    """A non-default router (sigmoid, groups, raw gates x 2.5, gated shared expert) on two
    ranks equals the reference of that convention (which the base router is far from)."""
    case = ep_case(impl, world_size=2, shared_experts=1)
    case = case.with_(
        shape=replace(
            case.shape,
            scoring="sigmoid",
            n_groups=2,
            topk_groups=1,
            norm_topk_prob=False,
            routed_scaling=2.5,
            shared_expert_gate="sigmoid",
        )
    )
    row = ranks.run(case, timeout_s=60)
    assert row["status"] == "ok", row.get("error")
    assert row["rel_err"] <= TOLERANCE["float32"]


def test_capacity_drops_are_checked_against_the_same_drops(ranks):
    row = ranks.run(
        ep_case("ep-capacity", world_size=2, routing="hot:1:0.9", capacity_factor=0.5),
        timeout_s=60,
    )
    assert row["status"] == "ok" and row["dropped_frac"] > 0.3
    assert row["rel_err"] <= TOLERANCE["float32"] < row["fidelity_err"]


def test_ep_counts_and_balance_are_the_single_device_ones(ranks):
    """The same routing counted over ranks (global stats) as on one device."""
    case = ep_case("ep-dropless", world_size=2, routing="hot:1:0.6", shared_experts=1)
    row = ranks.run(case, timeout_s=60)
    single = measure_case(case.with_(impl="grouped", world_size=1), FAST_PLAN, WeightCache())
    for column in ("total_params", "active_params", "touched_params", "router_params",
                   "min_bytes", "tokens_per_expert", "experts_per_token", "imbalance"):  # fmt: skip
        assert row[column] == single[column], column
    assert row["router_entropy"] == pytest.approx(single["router_entropy"], rel=1e-6)
    drops = dict(routing="hot:1:0.9", capacity_factor=0.5)
    capacity = ranks.run(ep_case("ep-capacity", world_size=2, **drops), timeout_s=60)
    dropless = ranks.run(ep_case("ep-dropless", world_size=2, **drops), timeout_s=60)
    assert capacity["imbalance"] == dropless["imbalance"] > capacity["served_imbalance"]
    assert capacity["experts_per_token"] == dropless["experts_per_token"] == 2


# --------------------------------------------------------------------- ranks: traffic


@pytest.mark.parametrize("world_size", [2, 4])
def test_comm_bytes_equal_the_hand_count(ranks, world_size):
    for routing in ("uniform", "hot:1:0.6"):
        case = ep_case(world_size=world_size, routing=routing, seq_len=16)
        expected_bytes, received = hand_count(case)
        row = ranks.run(case, timeout_s=60)
        assert row["status"] == "ok", row.get("error")
        assert row["comm_bytes"] == expected_bytes == row["dispatch_bytes"] + row["combine_bytes"]
        assert row["tokens_per_rank"] == received
    # The overlapped variant exchanges counts once per chunk.
    case = ep_case("ep-overlap", world_size=world_size)
    row = ranks.run(case, timeout_s=60)
    assert row["comm_bytes"] == hand_count(case, chunks=2)[0]


def test_comm_bytes_of_a_constructed_routing(ranks):
    # top_k = E: every token goes to every expert, so each rank sends T/W x (E - L) rows
    # away: 2 ranks x 8 tokens x 2 rows = 32 rows, x 2 (there and back) x 32 x 4 bytes,
    # + the counts: 2 ranks x 1 peer x 2 experts x 8 bytes.
    row = ranks.run(ep_case(num_experts=4, top_k=4, world_size=2, batch=1), timeout_s=60)
    assert row["comm_bytes"] == 2 * 32 * 32 * 4 + 2 * 1 * 2 * 8 == 8224
    assert row["dispatch_bytes"] == 4096 + 32 and row["combine_bytes"] == 4096
    assert row["tokens_per_rank"] == [32, 32]  # 16 tokens x 2 experts on each rank


def test_skewed_routing_loads_the_rank_of_the_hot_expert(ranks):
    rows = {
        routing: ranks.run(ep_case(world_size=4, routing=routing, batch=4, top_k=1), timeout_s=60)
        for routing in ("uniform", "hot:1:0.9")
    }
    uniform, hot = rows["uniform"], rows["hot:1:0.9"]
    hot_rank = int(routing_bias("hot:1:0.9", 8, seed=0).argmax()) // 2  # L = 8 / 4
    assert hot["tokens_per_rank"][hot_rank] == max(hot["tokens_per_rank"])
    assert max(hot["tokens_per_rank"]) > 0.6 * 64 > max(uniform["tokens_per_rank"])
    assert hot["rank_imbalance"] > 2 > uniform["rank_imbalance"]


# ------------------------------------------------------------------ failures and skips


def test_failing_ranks_fail_their_case_and_the_sweep_goes_on(tmp_path, faults):
    cases = [
        ep_case(world_size=2),
        ep_case("test-ep-raises", world_size=2),
        ep_case("test-ep-hangs", world_size=2),
        ep_case("test-ep-dies", world_size=2),
        ep_case("test-ep-wrong", world_size=2),
        ep_case("grouped", world_size=2),  # not expert-parallel
        ep_case(num_experts=6, world_size=4),  # 6 experts over 4 ranks
        ep_case(world_size=4),  # more ranks than --nproc
        ep_case(world_size=torch.cuda.device_count() + 1, device="cuda"),
        ep_case(world_size=2, layers=2),  # a stack of layers
        ep_case(world_size=2, seed=1),
        ep_case("test-ep-later", world_size=2),
        ep_case("test-ep-kept", world_size=2),
    ]
    started = time.perf_counter()
    outcome = run_cases(
        cases,
        suite_name="t",
        plan=FAST_PLAN,
        timeout_s=4,
        out_root=tmp_path,
        isolate=False,
        plugins=(EP_PLUGIN, faults),
        nproc=2,
    )
    frame = read_run(outcome.results_path)
    rows = {row["case_id"]: row for row in frame.to_dict("records")}
    status = [rows[case.case_id]["status"] for case in cases]
    error = [rows[case.case_id]["error"] for case in cases]
    assert status == [
        "ok",
        "error",
        "timeout",
        "crashed",
        "mismatch",
        "error",
        "error",
        "skipped",
        "skipped",
        "error",
        "ok",
        "mismatch",
        "mismatch",
    ], error
    assert "rank 1: ValueError: rank one fails on purpose" in error[1]
    assert "within the 4 s timeout" in error[2] and rows[cases[2].case_id]["wall_s"] < 8
    assert "rank 1's process died (exit code 3)" in error[3]
    assert "relative error" in error[4] and "on 2 ranks" in error[4]
    assert "runs on one device" in error[5] and "ep-dropless" in error[5]
    assert "num_experts=6 is not divisible by world_size=4" in error[6]
    assert "needs 4 ranks, --nproc 2 started 2" in error[7]
    assert (
        f"needs {cases[8].world_size} CUDA devices, {torch.cuda.device_count()} visible"
        in (error[8])
    )
    assert "layers=2: expert-parallel cases measure one layer" in error[9]
    # right before timing, wrong during it: caught after timing; right on the first batch
    # alone: caught on the unseen one (both were `ok`, with the first call checked alone)
    assert error[11].startswith("drifted during timing: relative error") and "2 ranks" in error[11]
    assert error[12].startswith("wrong on an input it was not timed on: relative error")
    assert time.perf_counter() - started < 40


def test_cli_nproc_writes_comm_columns(tmp_path):
    suite = tmp_path / "tiny_ep.toml"
    suite.write_text(TINY_SUITE)
    out = tmp_path / "results"
    code = cli_main(
        [
            "run",
            str(suite),
            "--nproc",
            "2",
            "--out",
            str(out),
            "--quiet",
            "--in-process",
            "--plugin",
            EP_PLUGIN,
        ]
    )
    assert code == 0
    frame = read_run(next(out.glob("*/results.parquet")))
    assert len(frame) == 4 and set(frame["status"]) == {"ok"}
    two = frame[frame["world_size"] == 2]
    assert (two["comm_bytes"] > 0).all() and (two["comm_ms"] > 0).all()
    assert (two["comm_gbps"] > 0).all() and two["tokens_per_rank"].map(len).eq(2).all()
    one = frame[frame["world_size"] == 1]
    assert (one["comm_bytes"] == 0).all() and one["comm_gbps"].isna().all()
    for column in ("dispatch_ms", "combine_ms", "expert_ms", "comm_hidden_frac"):
        assert frame[column].notna().all(), column
    assert cli_main(["run", str(suite), "--nproc", "0", "--out", str(out)]) == 2


TINY_SUITE = """
[suite]
name = "tiny-ep"
device = "cpu"
timeout_s = 60
budget_ms = 20
warmup = 1
min_repeats = 2
max_repeats = 5

[grid]
hidden = 32
ffn = 48
num_experts = 4
top_k = 2
batch = 2
seq_len = 8
world_size = [1, 2]
impl = ["ep-dropless", "ep-overlap"]
"""


@pytest.mark.skipif(
    os.environ.get("MOEBENCH_TEST_TORCHRUN") != "1", reason="set MOEBENCH_TEST_TORCHRUN=1"
)
def test_torchrun_gives_the_results_of_nproc(tmp_path):
    suite = tmp_path / "tiny_ep.toml"
    suite.write_text(TINY_SUITE)
    common = ["--quiet", "--in-process", "--plugin", EP_PLUGIN]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "-m",
        "moebench",
        "run",
        str(suite),
        "--out",
        str(tmp_path / "torchrun"),
        *common,
    ]
    done = subprocess.run(torchrun, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        cli_main(["run", str(suite), "--nproc", "2", "--out", str(tmp_path / "nproc"), *common])
        == 0
    )
    runs = [
        read_run(next((tmp_path / name).glob("*/results.parquet"))).set_index("case_id")
        for name in ("torchrun", "nproc")
    ]
    assert [len(list((tmp_path / name).iterdir())) for name in ("torchrun", "nproc")] == [1, 1]
    by_torchrun, by_nproc = (r.sort_index() for r in runs)
    assert set(by_torchrun["status"]) == {"ok"}
    for column in ("rel_err", "comm_bytes", "tokens_per_expert", "tokens_per_rank"):
        assert by_torchrun[column].map(str).equals(by_nproc[column].map(str)), column


# ------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_case(impl: str, world_size: int = 1) -> Case:
    """Big enough to be bound by the GPU, not by kernel launches (so the phases' CUDA-event
    times add up to about the latency)."""
    return Case(
        LayerShape(2048, 4096, 16, 4, shared_experts=1),
        Workload(16384, 1),
        impl,
        device="cuda",
        dtype="bfloat16",
        world_size=world_size,
    )


@cuda
def test_cuda_phase_timer_uses_events():
    timer = PhaseTimer(torch.device("cuda"))
    a = torch.randn(4096, 4096, device="cuda")
    with timer.phase("expert"):
        for _ in range(10):
            a = a @ a / 64
    totals = timer.collect()  # synchronises
    assert timer.cuda and totals["expert"] > 0 and totals["router"] == 0


@cuda
def test_cuda_one_rank_nccl_group():
    launcher = SpawnLauncher(FAST_PLAN, (EP_PLUGIN,), nproc=1, cases=[])
    try:
        for impl in EP_IMPLS:
            row = launcher.run(cuda_case(impl), timeout_s=300)
            assert row["status"] == "ok", (impl, row.get("error"))
            assert row["rel_err"] <= TOLERANCE["bfloat16"]
            assert "nccl x1" in row["impl_detail"] and row["backend"] == "nccl"
            assert row["comm_bytes"] == 0 and row["comm_ms"] > 0
            for column in ("router_ms", "permute_ms", "expert_ms", "unpermute_ms", "shared_ms"):
                assert row[column] > 0, column
            # The phases (CUDA events, slowest rank) account for most of the latency.
            phases = sum(row[column] for column in PHASE_COLUMNS)
            assert 0.5 * row["latency_ms"] < phases < 2 * row["latency_ms"], (phases, row)
    finally:
        launcher.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_cuda_two_rank_nccl_group():
    launcher = SpawnLauncher(FAST_PLAN, (EP_PLUGIN,), nproc=2, cases=[])
    try:
        for impl in EP_IMPLS:
            row = launcher.run(cuda_case(impl, world_size=2), timeout_s=300)
            assert row["status"] == "ok", (impl, row.get("error"))
            assert "nccl x2" in row["impl_detail"]
            assert row["comm_bytes"] > 0 and row["comm_gbps"] > 0
            if impl == "ep-overlap":
                assert 0 <= row["comm_hidden_frac"] <= 1
    finally:
        launcher.close()
