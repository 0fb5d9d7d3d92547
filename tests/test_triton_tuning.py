"""The fused `triton` layer's tuner (moebench/impls/triton/tuning.py), on a CPU: its cache
file, the fingerprint that keeps a choice from being reused for other code, the tuning
log and its summary script, token buckets, row-block sizes and the keys' weight layouts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
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
    k1 = f"k1 {tuning.code_fingerprint((), candidates, tuning.timing_way(graphed=False))}"
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


def test_other_kernels_raced_for_a_key_are_chosen_again_in_the_same_process(tmp_path, monkeypatch):
    """A switch that adds tiles to the race (MOEBENCH_MERGE_TAIL) flipped between two
    layers of one process: the second layer's choice is made for its own kernels, not
    the first's remembered."""
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    tuner, cpu = tuning.Tuner(), torch.device("cpu")
    plain, merged = {"BLOCK_M": 16}, {"BLOCK_M": 16, "MERGE_TAIL": True}
    assert tuner.choose(cpu, "k", lambda: [plain], print, code=(_kernel_v1,)) == plain
    both = (_kernel_v1, _kernel_v2)
    assert tuner.choose(cpu, "k", lambda: [merged, plain], print, code=both) == merged
    assert tuner.choose(cpu, "k", lambda: [{"BLOCK_M": 99}], print, code=(_kernel_v1,)) == plain


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
    seconds = {"precompile_s": 1.5, "tune_s": 2.25}
    tuning._log_trials("down nmajor D8 T64 abc", [(tile, 0.2)], tile, "graph", seconds)
    assert summary["main"]([str(log), "--key", "down"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "down nmajor D8 T64 abc: M16 N128 K64 w4 s3 0.2 ms; timed from a CUDA graph;"
        " tuned in 2.2 s, 1.5 of them compiling every candidate at once",
        "in all: 2.2 s of tuning (1 logged with their time)",
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


def _shipped_setup(tmp_path, monkeypatch, shipped: dict) -> tuple[Path, Path]:
    """A cache directory and a shipped directory holding `shipped` as cpu.json, the
    shipped choices switched on (conftest switches them off for every other test)."""
    cache, into = tmp_path / "cache", tmp_path / "tuned"
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(cache))
    monkeypatch.setenv(tuning.SHIPPED_SWITCH, "1")
    monkeypatch.setattr(tuning, "shipped_dir", lambda: into)
    into.mkdir()
    (into / "cpu.json").write_text(json.dumps(shipped))
    return cache, into


def test_a_key_missing_from_the_cache_takes_the_shipped_choice(tmp_path, monkeypatch):
    """Cache first, then the shipped choice, then tuning (in the interpreter: the first
    candidate); a shipped choice for other code is not taken; `MOEBENCH_TRITON_SHIPPED=0`
    ignores the shipped ones; a shipped choice is not copied into the cache."""
    candidates = [{"BLOCK_M": 16}, {"BLOCK_M": 32}, {"BLOCK_M": 64}]
    fingerprint = tuning.code_fingerprint((_kernel_v1,), candidates, tuning.timing_way(False))
    stale = tuning.code_fingerprint((_kernel_v2,), candidates, tuning.timing_way(False))
    cache, _ = _shipped_setup(
        tmp_path,
        monkeypatch,
        {f"k {fingerprint}": candidates[1], f"old {stale}": candidates[2]},
    )

    def choose(key: str) -> dict:
        return tuning.Tuner().choose(
            torch.device("cpu"), key, lambda: candidates, lambda c: pytest.fail("timed"),
            code=(_kernel_v1,),
        )  # fmt: skip

    assert choose("k") == candidates[1]
    assert choose("old") == candidates[0]  # tuned: the shipped one is for other code
    assert not (cache / "cpu.json").exists()
    monkeypatch.setenv(tuning.SHIPPED_SWITCH, "0")
    assert choose("k") == candidates[0]
    monkeypatch.setenv(tuning.SHIPPED_SWITCH, "1")
    cache.mkdir()
    (cache / "cpu.json").write_text(json.dumps({f"k {fingerprint}": candidates[2]}))
    assert choose("k") == candidates[2]  # tuned on this machine: the cache wins


def _ship(argv: list[str]) -> int:
    import runpy

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "ship_tuning.py"))
    return script["main"](argv)


def test_ship_tuning_folds_a_cache_and_a_log_into_the_shipped_file(tmp_path, monkeypatch, capsys):
    """A cache named for its device and a tuning log with --device land in one shipped
    file; a choice replaces the shipped ones of its key made for other code, keeps the
    other keys; --replace starts afresh; the tuner then takes what was shipped."""
    into = tmp_path / "tuned"
    into.mkdir()
    shipped = into / "NVIDIA_H200.json"
    shipped.write_text(json.dumps({"down D8 T1 old": {"BLOCK_N": 1}, "keep D8 T1 f0": {"B": 2}}))
    cache = tmp_path / "NVIDIA_H200.json"
    cache.write_text(json.dumps({"down D8 T1 new": {"BLOCK_N": 3}}))
    log = tmp_path / "tune-log.jsonl"
    lines = [
        {"key": "gate_up D8 T1 f1", "timed_by": "graph", "trials": [], "chosen": {"BLOCK_N": 4}},
        {"key": "failed D8 T1 f1", "timed_by": "graph", "trials": [], "chosen": None},
    ]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    into_args = ["--into", str(into)]
    assert _ship([str(cache), str(log), "--device", "NVIDIA H200", *into_args]) == 0
    assert capsys.readouterr().out.strip() == f"{shipped}: 3 choices (2 new, 1 dropped)"
    assert json.loads(shipped.read_text()) == {
        "down D8 T1 new": {"BLOCK_N": 3},
        "keep D8 T1 f0": {"B": 2},
        "gate_up D8 T1 f1": {"BLOCK_N": 4},
    }
    assert _ship([str(cache), *into_args, "--replace"]) == 0
    assert json.loads(shipped.read_text()) == {"down D8 T1 new": {"BLOCK_N": 3}}

    # What was shipped is what the tuner takes, under the key it computes.
    candidates = [{"BLOCK_M": 16}, {"BLOCK_M": 32}]
    full_key = f"k {tuning.code_fingerprint((_kernel_v1,), candidates, tuning.timing_way(False))}"
    run_cache = tmp_path / "run" / "cpu.json"
    run_cache.parent.mkdir()
    run_cache.write_text(json.dumps({full_key: candidates[1]}))
    assert _ship([str(run_cache), *into_args]) == 2  # no cpu.json shipped yet: say which
    assert "no device ships cpu.json yet" in capsys.readouterr().err
    assert not (into / "cpu.json").exists()
    assert _ship([str(run_cache), "--device", "cpu", *into_args]) == 0
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv(tuning.SHIPPED_SWITCH, "1")
    monkeypatch.setattr(tuning, "shipped_dir", lambda: into)
    choice = tuning.Tuner().choose(
        torch.device("cpu"), "k", lambda: candidates, print, code=(_kernel_v1,)
    )
    assert choice == candidates[1]


def test_ship_tuning_names_a_bad_source(tmp_path, capsys):
    into = ["--into", str(tmp_path / "tuned")]
    log = tmp_path / "tune-log.jsonl"
    log.write_text('{"key": "k f", "trials": [], "chosen": {"B": 1}}\n')
    assert _ship([str(log), *into]) == 2
    assert "does not name its device; pass --device" in capsys.readouterr().err
    log.write_text('{"key": "k f", "trials": [], "chosen": {"B": 1}}\nnot json\n')
    assert _ship([str(log), "--device", "x", *into]) == 2
    assert f"{log}: line 2: not a tuning line" in capsys.readouterr().err
    bad = {
        "list.json": "[1, 2]",
        "text.json": "not json",
        "nokey.json": '{"nofingerprint": {"B": 1}}',
        "nochoice.json": '{"k f": 3}',
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        assert _ship([str(tmp_path / name), *into]) == 2, name
        assert str(tmp_path / name) in capsys.readouterr().err
    assert _ship([str(tmp_path / "missing.json"), *into]) == 2
    assert "missing.json: cannot read it" in capsys.readouterr().err
    assert not (tmp_path / "tuned").exists()  # nothing written from a bad source
    good = tmp_path / "NVIDIA_H200.json"
    good.write_text('{"k f": {"B": 1}}')
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "NVIDIA_H200.json").write_text("[broken")
    assert _ship([str(good), *into]) == 2
    assert "NVIDIA_H200.json: not a shipped file" in capsys.readouterr().err
    assert (tmp_path / "tuned" / "NVIDIA_H200.json").read_text() == "[broken"  # untouched
    assert _ship([str(good), *into, "--replace"]) == 0


def _timer(times: dict[int, list[float]]):
    """A fake `time_one` for `tuning.race`: config {"id": i} takes the next of times[i]
    (a float) or raises (a string), and every call is recorded."""
    calls = []

    def time_one(config: dict) -> float:
        calls.append(config["id"])
        result = times[config["id"]].pop(0)
        if isinstance(result, str):
            raise RuntimeError(result)
        return result

    return time_one, calls


def test_a_race_without_run_off_takes_the_pass_and_drops_failures():
    configs = [{"id": i} for i in range(4)]
    time_one, calls = _timer({0: [1.0], 1: ["out of shared memory"], 2: [0.98], 3: [2.0]})
    best, trials, runoff = tuning.race(configs, time_one)
    assert best == {"id": 2} and runoff == [] and calls == [0, 1, 2, 3]
    assert trials[1] == ({"id": 1}, "RuntimeError: out of shared memory")
    time_one, _ = _timer({0: ["no"], 1: ["no"]})
    assert tuning.race(configs[:2], time_one, runoff=True)[0] is None  # none ran


def test_the_run_off_times_the_close_ones_again_in_turns_and_takes_the_steadier():
    """The pass's best (a lucky first reading) loses the run-off to one that is faster
    in every turn; a candidate beyond RUNOFF_MARGIN, and one that failed, take no part;
    the order turns round each round."""
    configs = [{"id": i} for i in range(5)]
    rounds = tuning.RUNOFF_ROUNDS
    time_one, calls = _timer(
        {
            0: [0.95] + [1.10] * rounds,  # the pass's best, slower in the run-off
            1: [0.97] + [1.00] * rounds,
            2: [0.99, 1.20, "lost the device", 1.20],  # ran, then failed once
            3: [1.30],  # beyond the margin
            4: ["CompilationError"],
        }
    )
    best, trials, runoff = tuning.race(configs, time_one, runoff=True)
    assert best == {"id": 1}
    assert [config["id"] for config, _ in runoff] == [0, 1, 2]
    assert runoff[1][1] == [1.00] * rounds and runoff[2][1][1] == float("inf")
    assert calls[5:] == [0, 1, 2, 2, 1, 0, 0, 1, 2][: 3 * rounds]  # in turns
    assert [ms for _, ms in trials][:4] == [0.95, 0.97, 0.99, 1.30]
    # one candidate within the margin: nothing to run off
    time_one, calls = _timer({0: [1.0], 1: [1.2]})
    assert tuning.race(configs[:2], time_one, runoff=True)[2] == [] and calls == [0, 1]


def test_the_tune_log_shows_the_run_off_and_the_chosen_ones_own_time(tmp_path, monkeypatch, capsys):
    import runpy

    summary = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "tune_log.py"))
    log = tmp_path / "tune.jsonl"
    monkeypatch.setenv("MOEBENCH_TRITON_TUNE_LOG", str(log))
    lucky, steady = {"BLOCK_M": 64, "num_warps": 4}, {"BLOCK_M": 128, "num_warps": 8}
    trials = [(lucky, 0.95), (steady, 0.97)]
    runoff = [(lucky, [1.1, 1.1, 1.1]), (steady, [1.0, 1.0, 1.0])]
    key = "gate_up kmajor D8 T8192 abc"
    tuning._log_trials(key, trials, steady, "graph, run-off", None, runoff)
    assert summary["main"]([str(log)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "gate_up kmajor D8 T8192 abc: M128 w8 0.97 ms; next M64 w4 0.95 ms; run-off of 2 in"
        " 3 turns, medians 1.1, 1 ms; timed from a CUDA graph"
    ]


def test_a_run_off_makes_its_own_choices(tmp_path, monkeypatch):
    """The run-off (on unless `MOEBENCH_TRITON_RUNOFF=0`) is a way of timing: a choice
    made without it is not reused with it, in the process (the memo) or on disk (the
    fingerprint), and back; unset, it is on."""
    monkeypatch.setenv("MOEBENCH_TRITON_CACHE", str(tmp_path))
    monkeypatch.setenv(tuning.TRITON_RUNOFF_SWITCH, "0")
    assert tuning.timing_way(graphed=True) == "graph"
    tuner, cpu = tuning.Tuner(), torch.device("cpu")
    first, second = {"BLOCK_M": 16}, {"BLOCK_M": 32}
    assert tuner.choose(cpu, "k", lambda: [first], print, code=(_kernel_v1,)) == first
    monkeypatch.delenv(tuning.TRITON_RUNOFF_SWITCH)  # the default: on
    assert tuning.timing_way(graphed=True) == "graph, run-off"
    assert tuning.timing_way(graphed=False) == "do_bench, run-off"
    assert tuner.choose(cpu, "k", lambda: [second], print, code=(_kernel_v1,)) == second
    monkeypatch.setenv(tuning.TRITON_RUNOFF_SWITCH, "1")
    assert tuner.choose(cpu, "k", lambda: [first], print, code=(_kernel_v1,)) == second
    monkeypatch.setenv(tuning.TRITON_RUNOFF_SWITCH, "0")
    assert tuner.choose(cpu, "k", lambda: [second], print, code=(_kernel_v1,)) == first
    fingerprints = {
        tuning.code_fingerprint((_kernel_v1,), [first], timed_by)
        for timed_by in ("graph", "graph, run-off", "do_bench", "do_bench, run-off")
    }
    assert len(fingerprints) == 4
