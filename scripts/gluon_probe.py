"""The warp-specialised Gluon GEMMs (`gluon_down.py`, `gluon_gate_up.py`) on a Hopper card,
before the tuner races them (by default since version 31; `MOEBENCH_GLUON_WS=0`: not): a
kernel that hangs there would stop a whole run, so here each config runs in a child
process under a watchdog first (after any edit of a Gluon kernel, before a suite).

    python scripts/gluon_probe.py [--gemm down | gate_up]
                                  [--points mixtral-8x7b:8192 qwen3-30b-a3b:8192 ...]
                                  [--timeout-s 90] [--rounds 3] [--all] [--json FILE]

At each point (preset and token count; by default the ones issue 14 misses: 8192 tokens
of every preset, Mixtral-8x7B's 1024), tokens are routed uniformly at random (top_k
distinct experts each), aligned at every row-block height the tuner races, and each
Gluon config of the GEMM (`--gemm`: down, the default, or inference's gate_up) is:
- checked against the TMA tile of the same BLOCK_N and BLOCK_K (`tma.launch_down`, or
  `tma.launch_gate_up`'s two-product tile: the same K steps in the same order): `bits`
  true where the output (down's rows of out, gate_up's h) is equal bit for bit, else the
  largest difference;
- timed in a CUDA graph (L2 flushed before each replay, `tuning.graphed_ms`) in turns
  with the config moebench ships for that point (`SHIPPED`; where none was shipped for
  this code, or with `--all`, every pointer and TMA candidate the layer races there),
  after a warm-up, `--rounds` times (median ms). gate_up's times include the gather of
  x's rows that its TMA tiles and Gluon kernels launch first, as the layer's do.
A child that prints nothing for `--timeout-s` is ended, and one that dies is recorded;
the config it was checking is recorded as `hang` or `crash`, and a new child goes on
without it (a hang or crash while timing ends the point). One JSON line a
config on stdout (and in `--json`), then a summary a point: the fastest of each kind.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import torch

DEFAULT_POINTS = (
    "deepseek-v3:8192",
    "mixtral-8x7b:8192",
    "qwen3-30b-a3b:8192",
    "olmoe-1b-7b:8192",
    "mixtral-8x7b:1024",
)


GEMMS = ("down", "gate_up")


def _problem(gemm: str, preset: str, tokens: int, block_m: int, seed: int = 0) -> dict:
    """The GEMM's inputs on the card for a preset's shape, its alignment and top_k: down's
    h_PF, w_down_EFD and gate_A, gate_up's x_TD and w_gate_up_E2FD."""
    from moebench.impls.triton.align import align_to_blocks
    from moebench.presets import PRESETS

    shape = PRESETS[preset]
    D, F, E, K = shape.hidden, shape.ffn, shape.num_experts, shape.top_k
    generator = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(tokens, E, device="cuda", generator=generator)
    ids_TK = scores.topk(K, dim=1).indices.to(torch.int32)
    alignment = align_to_blocks(ids_TK, E, block_m)
    # drawn in bfloat16: DeepSeek-V3's weights in float32 would be 15 GB, twice over
    bf16 = {"device": "cuda", "dtype": torch.bfloat16, "generator": generator}
    if gemm == "gate_up":
        x_TD = torch.randn(tokens, D, **bf16)
        w_E2FD = torch.randn(E, 2 * F, D, **bf16).mul_(D**-0.5)
        return {"x_TD": x_TD, "w_E2FD": w_E2FD, "alignment": alignment, "K": K}
    h_PF = torch.randn(alignment.max_rows, F, **bf16)
    w_EFD = torch.randn(E, F, D, **bf16).mul_(F**-0.5)
    gate_A = torch.rand(tokens * K, **bf16)
    return {"h_PF": h_PF, "w_EFD": w_EFD, "gate_A": gate_A, "alignment": alignment, "K": K}


def _output(gemm: str, problem: dict) -> torch.Tensor:
    """The GEMM's output buffer: gate_up's h (a row a padded row), down's out (a row an
    assignment)."""
    if gemm == "gate_up":
        rows, F = problem["alignment"].max_rows, problem["w_E2FD"].shape[1] // 2
    else:
        rows, F = problem["gate_A"].numel(), problem["w_EFD"].shape[2]
    return torch.empty(rows, F, device="cuda", dtype=torch.bfloat16)


def _launcher(gemm: str, config: dict, problem: dict, out: torch.Tensor):
    """A function launching `config`'s kernel of `gemm` on `problem` into `out`, as the
    layer does (`layer.launch_gate_up`, `layer.launch_down`)."""
    from moebench.impls.triton.layer import launch_down, launch_gate_up

    alignment = problem["alignment"]
    if gemm == "gate_up":
        x_TD, w_E2FD, K = problem["x_TD"], problem["w_E2FD"], problem["K"]
        return lambda: launch_gate_up(config, x_TD, w_E2FD, out, alignment, K)
    h_PF, w_EFD, gate_A = problem["h_PF"], problem["w_EFD"], problem["gate_A"]
    return lambda: launch_down(config, h_PF, w_EFD, gate_A, out, alignment)


def shipped_choice(
    preset: str, tokens: int, block_m: int, device_name: str, gemm: str = "down"
) -> dict | None:
    """The config of `gemm` moebench ships for this point and row-block height on a card
    of `device_name`, or None where none was shipped for this code: under the key the
    layer looks up and any fingerprint it may take there (`layer.shipped_fingerprints`:
    the Gluon and merged-tail races on or off, chosen with the tuner's run-off or by one
    pass), today's defaults first. Since version 33 both cards ship choices made with
    every race on, so the shipped choice may be a Gluon config itself."""
    from moebench.impls.triton import layer, tuning
    from moebench.presets import PRESETS

    shape = PRESETS[preset]
    D, F, E, K = shape.hidden, shape.ffn, shape.num_experts, shape.top_k
    x_TD = torch.empty(tokens, D, device="meta", dtype=torch.bfloat16)
    w_down_EFD = torch.empty(E, F, D, device="meta", dtype=torch.bfloat16)
    if gemm == "gate_up":  # (the layer's: E x D x F views of the K-major storage)
        w_E2FD = torch.empty(E, 2 * F, D, device="meta", dtype=torch.bfloat16)
        layout = tuning.weight_layout(w_E2FD.transpose(1, 2))
    else:
        layout = tuning.weight_layout(w_down_EFD)
    key = tuning.key(gemm, x_TD, w_down_EFD, K, layout, block_m)
    table = tuning.read_table(tuning.shipped_dir() / tuning.device_file_name(device_name))
    for fingerprint in layer.shipped_fingerprints(gemm, block_m, D, F, tokens):
        found = table.get(f"{key} {fingerprint}")
        if found is not None:
            return found
    return None


def _configs(gemm: str, preset: str, tokens: int, race_all: bool) -> list[dict]:
    """The Gluon configs of `gemm` at each row-block height the layer may take at this
    point, then what they race: the shipped choice of each height (`"SHIPPED": True`),
    or, where none was shipped or `race_all`, every pointer and TMA candidate there."""
    from moebench.impls.triton import tuning
    from moebench.impls.triton.layer import gemm_candidates
    from moebench.presets import PRESETS

    shape = PRESETS[preset]
    D, F, E, K = shape.hidden, shape.ffn, shape.num_experts, shape.top_k
    gluon, others = [], []
    for block_m in tuning.block_m_choices(tokens, K, E):
        candidates = gemm_candidates(gemm, block_m, D, F, 2, True, True)
        gluon += [config for config in candidates if config.get("GLUON_WS")]
        shipped = (
            None if race_all else shipped_choice(preset, tokens, block_m, _device_name(), gemm)
        )
        if shipped is not None:
            others.append({**shipped, "SHIPPED": True})
        else:
            others += [config for config in candidates if not config.get("GLUON_WS")]
    return gluon + others


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def run_child(
    gemm: str, preset: str, tokens: int, skip: set[int], rounds: int, race_all: bool
) -> None:
    """Check and time every config not in `skip`, announcing each first ("START i
    config") so that the parent knows which one a hang was in."""
    from moebench.impls.triton import tuning

    configs = _configs(gemm, preset, tokens, race_all)
    # one problem and one output a row-block height, shared by its configs (an output
    # each would hold 48 GB at DeepSeek-V3's 8192 tokens): each is checked as it is
    # launched, and timing only overwrites
    problems: dict[int, tuple[dict, torch.Tensor]] = {}
    timed = []
    for index, config in enumerate(configs):
        if index in skip:
            continue
        print(f"START {index} {json.dumps(config)}", flush=True)
        block_m = config["BLOCK_M"]
        if block_m not in problems:
            problem = _problem(gemm, preset, tokens, block_m)
            problems[block_m] = problem, _output(gemm, problem)
        problem, out = problems[block_m]
        out.fill_(float("nan"))
        launch = _launcher(gemm, config, problem, out)
        launch()
        torch.cuda.synchronize()
        record = {"point": f"{preset}:{tokens}", "gemm": gemm, "index": index, "config": config}
        if config.get("GLUON_WS"):
            want = torch.full_like(out, float("nan"))
            tile = {"BLOCK_M": block_m, "BLOCK_N": config["BLOCK_N"],
                    "BLOCK_K": config["BLOCK_K"], "GROUP_M": 8, "num_warps": 8,
                    "num_stages": 3, "TMA": True}  # fmt: skip
            _launcher(gemm, tile, problem, want)()
            torch.cuda.synchronize()
            # (gate_up leaves the rows past the last block unwritten: NaN in both)
            got, want = out.nan_to_num(7.0), want.nan_to_num(7.0)
            record["bits"] = bool(torch.equal(got, want))
            record["max_diff"] = float((got.float() - want.float()).abs().max())
        timed.append((record, launch))
        print(f"CHECKED {json.dumps(record)}", flush=True)
    print("TIMING", flush=True)
    for record, launch in timed:  # the clock settles under the power cap first
        tuning.graphed_ms(launch, torch.device("cuda"))
        print(f"WARMED {record['index']}", flush=True)
    times: dict[int, list[float]] = {}
    for _ in range(rounds):
        for record, launch in timed:
            times.setdefault(record["index"], []).append(
                tuning.graphed_ms(launch, torch.device("cuda"))
            )
            print(f"TIMED {record['index']}", flush=True)
    for record, _ in timed:
        record["ms"] = statistics.median(times[record["index"]])
        print(f"RESULT {json.dumps(record)}", flush=True)


def _child_lines(command: list[str], timeout_s: float) -> tuple[list[str], str | None, str]:
    """A child's stdout lines, and "hang" (no line for `timeout_s`: it is killed),
    "crash" (a non-zero exit) or None, and the end of its stderr."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in child.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output: list[str] = []
    while True:
        try:
            line = lines.get(timeout=timeout_s)
        except queue.Empty:
            child.kill()
            child.wait()
            return output, "hang", f"no output for {timeout_s:g} s"
        if line is None:
            break
        output.append(line)
    status = "crash" if child.wait() else None
    return output, status, child.stderr.read()[-800:]


def probe_point(
    point: str, timeout_s: float, rounds: int, race_all: bool = False, gemm: str = "down"
) -> list[dict]:
    """Children until every config of `gemm` at `point` has a result or was ended (hang,
    crash)."""
    preset, tokens = point.split(":")
    skip: set[int] = set()
    ended: list[dict] = []
    while True:
        command = [sys.executable, __file__, "--child", preset, tokens, "--gemm", gemm]
        command += ["--rounds", str(rounds)]
        command += ["--skip", ",".join(map(str, sorted(skip)))] if skip else []
        command += ["--all"] if race_all else []
        output, status, error = _child_lines(command, timeout_s)
        if status is None:
            return ended + [json.loads(line[7:]) for line in output if line.startswith("RESULT ")]
        # "START index config": the config a hang or crash was in, for the summary
        started = [line[6:].split(" ", 1) for line in output if line.startswith("START ")]
        if not started:
            raise RuntimeError(f"{point}: the child failed before any config: {error}")
        if any(line.startswith("TIMING") for line in output):  # every config checked: a
            # hang or crash while timing is no one config's to skip
            ended.append(
                {"point": point, "gemm": gemm, "index": None, status: True, "error": error}
            )
            return ended
        index, config = int(started[-1][0]), json.loads((started[-1] + ["{}"])[1])
        ended.append(
            {"point": point, "gemm": gemm, "index": index, "config": config, status: True,
             "error": error}
        )  # fmt: skip
        skip.add(index)


def summary(records: list[dict]) -> str:
    """The fastest config of each kind (pointer, TMA, Gluon) a point and GEMM, and the
    Gluon configs whose bits differ or that were ended."""
    lines = []
    for point, gemm in dict.fromkeys((r["point"], r.get("gemm", "down")) for r in records):
        mine = [r for r in records if (r["point"], r.get("gemm", "down")) == (point, gemm)]
        best = {}
        for record in mine:
            if "ms" not in record:
                continue
            config = record["config"]
            kind = "gluon" if config.get("GLUON_WS") else "tma" if config.get("TMA") else "pointer"
            if kind not in best or record["ms"] < best[kind]["ms"]:
                best[kind] = record
        parts = [f"{kind} {r['ms'] * 1e3:.1f} us" for kind, r in sorted(best.items())]
        shipped = [r for r in mine if r.get("config", {}).get("SHIPPED") and "ms" in r]
        parts += [f"shipped {r['ms'] * 1e3:.1f} us" for r in shipped]
        bad = [r for r in mine if r.get("hang") or r.get("crash") or r.get("bits") is False]
        gluon_bad = sum(bool(r.get("config", {}).get("GLUON_WS")) for r in bad)
        lines.append(
            f"{point} {gemm}: {', '.join(parts)}; {gluon_bad} Gluon config(s) wrong or ended,"
            f" {len(bad) - gluon_bad} other(s) ended"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gemm", choices=GEMMS, default="down")
    parser.add_argument("--points", nargs="+", default=list(DEFAULT_POINTS))
    parser.add_argument("--timeout-s", type=float, default=90.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--all", action="store_true", dest="race_all")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "TOKENS"), help=argparse.SUPPRESS)
    parser.add_argument("--skip", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        skip = {int(i) for i in args.skip.split(",") if i}
        run_child(args.gemm, args.child[0], int(args.child[1]), skip, args.rounds, args.race_all)
        return 0
    from moebench.presets import PRESETS

    for point in args.points:
        preset, _, tokens = point.partition(":")
        if preset not in PRESETS or not tokens.isdigit() or int(tokens) < 1:
            known = ", ".join(PRESETS)
            parser.error(f"--points {point!r}: want PRESET:TOKENS, a preset of {known}")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("gluon_probe: needs a Hopper card (capability 9.x)", file=sys.stderr)
        return 2
    records = []
    for point in args.points:
        for record in probe_point(point, args.timeout_s, args.rounds, args.race_all, args.gemm):
            print(json.dumps(record), flush=True)
            records.append(record)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(summary(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
