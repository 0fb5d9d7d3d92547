"""The fused `triton` layer's tuner (moebench/impls/triton/tuning.py), on a CPU: its cache
file, the fingerprint that keeps a choice from being reused for other code, the tuning
log and its summary script, token buckets, row-block sizes and the keys' weight layouts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from moebench import registry
from moebench.impls.triton import tuning
from moebench.weight_sources import make_weights
from tests.conftest import tiny_case


def test_tuner_reads_the_cache_file_and_keeps_other_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    assert tuning.cache_dir() == tmp_path
    cached = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4}
    candidates = [{"BLOCK_M": 99}]
    k1 = f"k1 {tuning.code_fingerprint((), candidates)}"
    (tmp_path / "cpu.json").write_text(json.dumps({k1: cached}))
    tuner = tuning.Tuner()
    calls = []
    choice = tuner.choose(torch.device("cpu"), "k1", lambda: candidates, calls.append)
    assert choice == cached and calls == []  # from the file, nothing run
    # A key not in the file: in the interpreter (CPU) the first candidate, nothing timed.
    assert tuner.choose(torch.device("cpu"), "k3", lambda: candidates, calls.append) == {
        "BLOCK_M": 99
    }
    tuner._save(tmp_path / "cpu.json", "k2 abc", {"BLOCK_M": 32})
    on_disk = json.loads((tmp_path / "cpu.json").read_text())
    assert on_disk == {k1: cached, "k2 abc": {"BLOCK_M": 32}}


def _kernel_v1(x):
    return x + 1


def _kernel_v2(x):
    return x + 2


def test_tuning_log_holds_each_candidates_time_or_failure(tmp_path, monkeypatch):
    log = tmp_path / "tune.jsonl"
    tuning._log_trials("k 1", [({"BLOCK_M": 16}, 0.5)], {"BLOCK_M": 16})  # unset: no file
    assert not log.exists()
    monkeypatch.setenv("MOEBENCH_TRITON_TUNE_LOG", str(log))
    tuning._log_trials(
        "k 1", [({"BLOCK_M": 16}, 0.5), ({"BLOCK_M": 32}, "OutOfResources: smem")], {"BLOCK_M": 16}
    )
    tuning._log_trials("k2 1", [({"BLOCK_M": 64}, "CompilationError: x")], None)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0] == {
        "key": "k 1",
        "timed_by": "do_bench",
        "trials": [[{"BLOCK_M": 16}, 0.5], [{"BLOCK_M": 32}, "OutOfResources: smem"]],
        "chosen": {"BLOCK_M": 16},
    }
    assert lines[1]["chosen"] is None


def test_tune_log_summary_reads_what_the_tuner_wrote(tmp_path, monkeypatch, capsys):
    import runpy

    summary = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "tune_log.py"))
    log = tmp_path / "tune.jsonl"
    monkeypatch.setenv("MOEBENCH_TRITON_TUNE_LOG", str(log))
    tile = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    trials = [
        (tile, 0.25),
        ({"kernel": "grouped_mm"}, 0.5),
        ({**tile, "BLOCK_N": 512}, "OutOfResources: smem"),
    ]
    tuning._log_trials("dh nmajor D8 T64 abc", trials, tile)
    tuning._log_trials("gate_up nmajor D8 T64 abc", [(tile, 0.1)], tile, "graph")
    assert summary["main"]([str(log), "--key", "dh"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "dh nmajor D8 T64 abc: M16 N128 K64 w4 s3 0.25 ms; next grouped_mm 0.5 ms;"
        " grouped GEMM 0.5 ms, best Triton tile 0.25 ms; 1 failed (OutOfResources: smem)"
    ]
    assert summary["main"]([str(log), "--key", "gate_up"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "gate_up nmajor D8 T64 abc: M16 N128 K64 w4 s3 0.1 ms; timed from a CUDA graph"
    ]
    log.write_text("not json\n")
    assert summary["main"]([str(log)]) == 2
    assert "not a tuning line" in capsys.readouterr().err
    assert summary["main"]([str(tmp_path / "missing.jsonl")]) == 2


def test_a_choice_made_for_other_code_is_not_reused_and_is_dropped(tmp_path, monkeypatch):
    """The key's fingerprint covers the kernels' code and the candidate list: a choice
    tuned for another kernel or another list of candidates is not taken, and saving the
    new choice drops it (and an entry from before keys had fingerprints)."""
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    candidates = [{"BLOCK_M": 16}, {"BLOCK_M": 32}]
    fingerprint = tuning.code_fingerprint((_kernel_v1,), candidates)
    assert fingerprint == tuning.code_fingerprint((_kernel_v1,), list(candidates))
    assert fingerprint != tuning.code_fingerprint((_kernel_v2,), candidates)
    assert fingerprint != tuning.code_fingerprint((_kernel_v1,), candidates[::-1])
    assert fingerprint != tuning.code_fingerprint((_kernel_v1,), candidates[:1])
    # a choice timed from a CUDA graph is not one timed by do_bench, nor the other way
    assert fingerprint != tuning.code_fingerprint((_kernel_v1,), candidates, "graph")

    stale = {"BLOCK_M": 64}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({f"k {fingerprint}": stale, "other 123": stale}))
    choice = tuning.Tuner().choose(
        torch.device("cpu"), "k", lambda: candidates, print, code=(_kernel_v2,)
    )
    assert choice == candidates[0]  # not the stale entry: in the interpreter, the first
    path.write_text(json.dumps({f"k {fingerprint}": stale, "k": stale, "k2 1": stale}))
    new_key = f"k {tuning.code_fingerprint((_kernel_v2,), candidates)}"
    tuning.Tuner()._save(path, new_key, candidates[1])
    assert json.loads(path.read_text()) == {new_key: candidates[1], "k2 1": stale}


def test_token_buckets_and_block_rows():
    assert [tuning.token_bucket(t) for t in (1, 2, 3, 64, 65, 8192)] == [1, 2, 4, 64, 128, 8192]
    assert tuning.block_m_for(1, 8, 128) == 16
    assert tuning.block_m_for(8192, 8, 128) == 128
    # Raced between 32 and 256 rows per expert (the default first): Qwen3-30B-A3B and
    # OLMoE-1B-7B at 1024 tokens; not DeepSeek-V3 there (32 rows), decode nor 8192.
    assert tuning.block_m_choices(1024, 8, 128) == [64, 128]
    assert tuning.block_m_choices(1024, 8, 64) == [128, 64]
    assert tuning.block_m_choices(1024, 8, 256) == [64]
    assert tuning.block_m_choices(64, 8, 128) == [16]
    assert tuning.block_m_choices(8192, 8, 128) == [128]
    x_TD, w_down_EFD = torch.zeros(1024, 8), torch.zeros(4, 16, 8)
    assert tuning.key("down", x_TD, w_down_EFD, 2, "nmajor", 64).endswith("T1024 M64")
    assert tuning.key("down", x_TD, w_down_EFD, 2, "nmajor").endswith("T1024")
    for kernel in ("gate_up", "down"):
        for block_m in (16, 64, 128):
            assert all(c["BLOCK_M"] == block_m for c in tuning.candidates(kernel, block_m))


def test_tuning_keys_name_each_gemms_weight_layout():
    """Block sizes tuned on one weight layout are not reused for another: the layer's
    gate|up views run along K (stored E x 2F x D), its down projection along N."""
    E, D, F = 4, 32, 48
    w_gate_up_E2FD, w_down_EFD = torch.zeros(E, 2 * F, D), torch.zeros(E, F, D)
    assert tuning.weight_layout(w_gate_up_E2FD[:, :F].transpose(1, 2)) == "kmajor"
    assert tuning.weight_layout(w_down_EFD) == "nmajor"
    x_TD = torch.zeros(8, D)
    keys = {tuning.key("down", x_TD, w_down_EFD, 2, layout) for layout in ("kmajor", "nmajor")}
    assert len(keys) == 2
    if importlib.util.find_spec("triton") is not None:  # the layer stores them so
        case = tiny_case("triton")
        layer = registry.get("triton").build(make_weights(case), case)
        stored = (layer.w_gate_up_E2FD, layer.w_down_EFD)
        assert [tuple(w.shape) for w in stored] == [(E, 2 * F, D), (E, F, D)]
        assert all(w.is_contiguous() for w in stored)
