"""The HTML report: real runs rendered to a page whose figures hold data, runs compared,
an all-failed run still explained, big sweeps kept small, and the CLI's exit codes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("plotly")

from moebench import registry
from moebench.case import Case, LayerShape, Workload
from moebench.cli import main as cli_main
from moebench.measure.timing import TimingPlan
from moebench.report.build import read_manifest, render_report, write_report
from moebench.report.data import leaderboard, load_runs, prepare, run_comparison, thin_samples
from moebench.report.facets import MAX_FACETS
from moebench.runner import run_cases
from moebench.store import read_metadata, read_run

PLAN = TimingPlan(budget_ms=50, warmup=1, min_repeats=3, max_repeats=10)
IMPLS = ("reference", "grouped", "capacity", "dense")
BROKEN = "report-test-broken"


def small_cases(impls: tuple[str, ...] = IMPLS) -> list[Case]:
    """Two expert counts x two token counts x the implementations: tiny CPU cases."""
    return [
        Case(
            LayerShape(hidden=32, ffn=64, num_experts=experts, top_k=2),
            Workload(batch=batch, seq_len=8),
            impl=impl,
        )
        for experts in (4, 8)
        for batch in (1, 4)
        for impl in impls
    ]


def run(tmp: Path, cases: list[Case], name: str = "rt") -> str:
    outcome = run_cases(
        cases, suite_name=name, plan=PLAN, timeout_s=60, out_root=tmp, isolate=False
    )
    return outcome.run_id


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, str, str]:
    """A results root with two runs of the same cases."""
    root = tmp_path_factory.mktemp("results")
    first = run(root, small_cases())
    second = run(root, small_cases())
    return root, first, second


@pytest.fixture(scope="module")
def single_page(runs, tmp_path_factory) -> tuple[str, dict]:
    root, first, _ = runs
    out = tmp_path_factory.mktemp("page") / "report.html"
    result = write_report([first], out, root=root)
    return out.read_text(), result.manifest


def figure_json(page: str, div_id: str) -> list[dict]:
    """The traces plotly.newPlot receives for one figure div."""
    match = re.search(
        r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*(\[.*?\]),\s*\{', page, re.S
    )
    assert match, f"no Plotly.newPlot call for {div_id}"
    return json.loads(match.group(1))


EXPECTED_FIGURES = {
    "fig-overview",
    "fig-throughput",
    "fig-latency",
    "fig-memory",
    "fig-parameters",
    "fig-roofline",
    "fig-balance-e4",
    "fig-balance-e8",
    "fig-phases",
    "fig-fidelity",
}


def test_every_expected_figure_has_data(single_page):
    page, manifest = single_page
    figures = {f["id"]: f for f in manifest["figures"]}
    assert set(figures) == EXPECTED_FIGURES
    for div_id, entry in figures.items():
        assert entry["traces"] > 0 and entry["points"] > 0, entry
        assert f'id="{div_id}"' in page
        traces = figure_json(page, div_id)
        assert any(t.get("y") or t.get("z") for t in traces), div_id
    omitted = {o["section"]: o["reason"] for o in manifest["omitted"]}
    assert set(omitted) == {"communication", "energy", "comparison", "kernels"}
    assert "--profile" in omitted["kernels"]
    assert "single-device" in omitted["communication"]
    for section in omitted:
        assert f'data-omitted="{section}"' in page


def test_page_is_self_contained_with_header_and_table(single_page, runs):
    page, manifest = single_page
    _, first, _ = runs
    assert "<script src=" not in page and "<link" not in page
    assert page.count("Plotly.newPlot(") == len(manifest["figures"])
    assert page.count("/*! For license information please see plotly") <= 1
    assert first in page and "torch / CUDA / triton" in page and "copy " in page
    assert manifest["cases"] == len(small_cases())
    assert page.count('<tr class="">') + page.count('<tr class="failed">') >= manifest["cases"]
    assert 'table class="sortable cases"' in page
    # Tiny CPU cases on a busy machine are often noisy: then no winner may be named.
    assert "Fastest exact implementation" in page or "beyond the noise" in page
    assert len(page.encode()) < 15e6


def test_one_colour_per_implementation_everywhere(runs):
    root, first, _ = runs
    data = load_runs([first], root)
    _, sections = render_report(data)
    seen = 0
    for section in sections:
        for _, figure in section.figures:
            for trace in figure.data:
                if trace.legendgroup in data.colors:
                    color = trace.marker.color
                    assert color == data.colors[trace.legendgroup], (section.key, trace.name)
                    seen += 1
    assert seen > 20
    assert len(set(data.colors.values())) == len(data.colors)


def test_graphed_rows_are_their_own_facet_and_contest(runs):
    """Rows captured in a CUDA graph are labelled so (facet and case label) and race only
    each other: a graphed layer never wins against plain ones."""
    root, first, _ = runs
    frame = read_run(root / first / "results.parquet")
    graphed = frame[frame["impl"] == "grouped"].assign(
        cuda_graph=True, case_id=lambda f: f["case_id"] + "g", latency_ms=1e-6
    )
    data = prepare([pd.concat([frame, graphed], ignore_index=True)], [read_metadata(root / first)])
    rows = data.frame[data.frame["cuda_graph"].astype(bool)]
    assert len(rows) == len(graphed)
    assert rows["facet_label"].str.endswith("CUDA graph").all()
    assert rows["case_label"].str.contains("CUDA graph").all()
    plain = data.frame[~data.frame["cuda_graph"].astype(bool)]
    assert plain["facet_label"].str.endswith("no graph").all()
    assert not plain["case_label"].str.contains("graph").any()
    # the graphed rows (impossibly fast) are alone on their cases: no contest, no win
    alone = {s.impl: s for s in leaderboard(prepare([frame], [read_metadata(root / first)]))}
    both = {s.impl: s for s in leaderboard(data)}
    assert (both["grouped"].contests, both["grouped"].wins) == (
        alone["grouped"].contests,
        alone["grouped"].wins,
    )


def test_latency_samples_are_thinned():
    samples = np.random.default_rng(0).exponential(size=5000)
    thinned = thin_samples(samples)
    assert len(thinned) == 200
    assert thinned[0] == pytest.approx(samples.min(), rel=1e-3)
    assert thinned[-1] == pytest.approx(samples.max(), rel=1e-3)
    assert thin_samples(None) == [] and thin_samples([3.0, 1.0]) == [1.0, 3.0]


def test_two_runs_are_compared_case_by_case(runs, tmp_path):
    root, first, second = runs
    out = tmp_path / "two.html"
    result = write_report([first, second], out, root=root)
    figures = {f["id"]: f for f in result.manifest["figures"]}
    assert figures["fig-comparison"]["points"] == len(small_cases())
    page = out.read_text()
    assert "R2 vs R1" in page and second in page


def test_a_slower_case_is_a_red_regression(runs):
    root, first, _ = runs
    frame = read_run(first, root)
    slower = frame.copy()
    slow_case = slower.index[slower["status"] == "ok"][0]
    slower.loc[slow_case, "latency_ms"] *= 2
    meta = read_metadata(first, root)
    both = prepare([frame, slower], [meta, {**meta, "run_id": "slower"}])
    table = run_comparison(both)
    worst = table.sort_values("speedup").iloc[0]
    assert worst["case_id"] == frame.loc[slow_case, "case_id"]
    assert worst["verdict"] == "regression" and worst["speedup"] == pytest.approx(0.5)
    page, sections = render_report(both)
    comparison = next(s for s in sections if s.key == "comparison")
    red = [t for _, f in comparison.figures for t in f.data if t.name.startswith("regression")]
    assert red and red[0].marker.color == "#d62728" and len(red[0].y) >= 1
    assert comparison.table is not None and comparison.table.row_classes[0] == "regression"
    assert 'class="regression"' in page


@pytest.fixture
def broken_impl():
    @registry.register(BROKEN, family="test", description="always fails to build")
    def build(weights, case):
        raise RuntimeError("boom: <b>no kernel</b> for this shape")

    yield BROKEN
    registry.unregister(BROKEN)


def test_an_all_failed_run_still_says_why(broken_impl, tmp_path):
    run_id = run(tmp_path, small_cases((broken_impl,))[:2], name="failed")
    out = tmp_path / "failed.html"
    result = write_report([run_id], out, root=tmp_path)
    page = out.read_text()
    assert result.manifest["figures"] == []
    assert result.manifest["statuses"] == {"error": 2}
    assert len(result.manifest["omitted"]) >= 10
    assert "No case finished ok" in page and "2 of 2 cases did not finish ok" in page
    assert "boom: &lt;b&gt;no kernel&lt;/b&gt;" in page and "<b>no kernel</b>" not in page
    assert "Plotly.newPlot(" not in page and len(page.encode()) < 200_000  # no plotly.js


def synthetic_sweep(shapes: int, tokens: tuple[int, ...], samples: int) -> pd.DataFrame:
    """A sweep too big to run in a test: every column the figures read, made up."""
    rng = np.random.default_rng(1)
    rows = []
    for s in range(shapes):
        experts = (8, 16, 32)[s % 3]
        for t in tokens:
            for impl in ("reference", "grouped", "capacity"):
                latency = t * (1 + s) / (3 if impl == "grouped" else 1) * 1e-3
                share = rng.multinomial(t * 2, np.ones(experts) / experts)
                rows.append(
                    {
                        "run_id": "big",
                        "case_id": f"{s}-{t}-{impl}",
                        "suite": "big",
                        "impl": impl,
                        "exact": impl != "capacity",
                        "status": "ok",
                        "hidden": 64 * (s + 1),
                        "ffn": 128,
                        "num_experts": experts,
                        "top_k": 2,
                        "shared_experts": 0,
                        "capacity_factor": 1.25,
                        "batch": 1,
                        "seq_len": t,
                        "tokens": t,
                        "mode": "forward",
                        "dtype": "bfloat16",
                        "routing": "uniform",
                        "device": "cuda",
                        "world_size": 2,
                        "seed": 0,
                        "options": "{}",
                        "preset": "",
                        "latency_ms": latency,
                        "tokens_per_s": t / latency * 1e3,
                        "samples_ms": rng.normal(latency, latency / 10, samples).tolist(),
                        "peak_mem_bytes": 2**30,
                        "weight_bytes": 2**29,
                        "activation_bytes": 2**28,
                        "total_params": experts * 100,
                        "active_params": 200,
                        "touched_params": experts * 90,
                        "flops": t * 400,
                        "min_bytes": 10**6,
                        "achieved_tflops": 1.0,
                        "roofline_frac": 0.3,
                        "comm_ms": latency / 3,
                        "dispatch_ms": latency / 6,
                        "combine_ms": latency / 7,
                        "tokens_per_expert": share.tolist(),
                        "dropped_frac": 0.01 if impl == "capacity" else 0.0,
                        "j_per_token": 1e-6 * t,
                        "router_ms": latency / 10,
                        "permute_ms": latency / 5,
                        "expert_ms": latency / 2,
                        "unpermute_ms": latency / 10,
                        "other_ms": latency / 10,
                        "phase_latency_ms": latency,
                        "device_busy_frac": 0.3 if t == 1 else 0.9,  # small calls: marked
                        "host_sync_count": 1.0 if impl == "reference" else 0.0,
                        "rel_err": 0.0 if impl != "capacity" else None,
                        "fidelity_err": 0.05 if impl == "capacity" else None,
                    }
                )
    return pd.DataFrame(rows)


def test_a_sweep_of_hundreds_of_cases_stays_readable_and_small():
    frame = synthetic_sweep(shapes=20, tokens=(1, 64, 4096, 65536), samples=1000)
    meta = {
        "run_id": "big",
        "ceilings": {"copy_gbps": 3000, "matmul_tflops_bfloat16": 800},
        "environment": {"gpus": [{"name": "NVIDIA H100 80GB HBM3", "driver": "580"}] * 2},
    }
    data = prepare([frame], [meta])
    page, sections = render_report(data)
    assert len(frame) == 240 and len(page.encode()) < 15e6
    manifest = read_manifest(page)
    figures = {f["id"]: f for f in manifest["figures"]}
    assert {"fig-communication", "fig-energy", "fig-roofline"} <= set(figures)
    assert manifest["omitted"] == [
        {"section": "kernels", "reason": "no run was made with --profile"},
        {"section": "comparison", "reason": "one run: nothing to compare (name two or more)"},
    ]
    by_key = {s.key: s for s in sections}
    throughput = by_key["throughput"].figures[0][1]
    assert throughput.layout.updatemenus, "more than MAX_FACETS shapes: a drop-down"
    assert len(throughput.layout.updatemenus[0].buttons) == 20 > MAX_FACETS
    visible = [t for t in throughput.data if t.visible]
    assert 0 < len(visible) <= 3
    latency = by_key["latency"].figures[0][1]
    assert sum(len(t.y) for t in latency.data) == len(frame) * 200
    assert "NVIDIA H100 80GB HBM3 x2" in page and "580" in page
    assert len(by_key["balance"].figures) == 3  # one heatmap per expert count


def test_runs_of_one_suite_with_no_case_in_common_are_pointed_to_merge():
    """Two runs of one suite, each filtered to other implementations: nothing to compare
    run against run, and the reason says how to join them; runs of two suites are not
    told to merge."""
    frame = synthetic_sweep(shapes=1, tokens=(1, 64), samples=5)
    parts = [frame[frame["impl"] == "grouped"], frame[frame["impl"] != "grouped"]]
    for suites, told in ((("peers", "peers"), True), (("peers", "triton"), False)):
        metas = [{"run_id": f"part{i}", "suite": suite} for i, suite in enumerate(suites)]
        _, sections = render_report(prepare([p.copy() for p in parts], metas))
        (comparison,) = [s for s in sections if s.key == "comparison"]
        assert "nothing matched" in comparison.omitted
        assert ("`moebench merge RUN RUN ...`" in comparison.omitted) is told


def test_cli_writes_the_report_and_refuses_bad_input(runs, tmp_path, capsys, monkeypatch):
    root, first, _ = runs
    out = tmp_path / "sub" / "cli.html"
    assert cli_main(["report", first, "latest", "--root", str(root), "-o", str(out)]) == 0
    assert out.is_file() and "wrote" in printed(capsys)
    assert cli_main(["report", "no-such-run", "--root", str(root), "-o", str(out)]) == 2
    assert "no run or parquet file 'no-such-run'" in printed(capsys)
    parquet = root / first / "results.parquet"
    assert cli_main(["report", str(parquet), "-o", str(tmp_path / "p.html")]) == 0
    monkeypatch.setitem(sys.modules, "kaleido", None)
    assert (
        cli_main(
            ["report", first, "--root", str(root), "-o", str(out), "--png", str(tmp_path / "png")]
        )
        == 2
    )
    assert "pip install 'moebench[png]'" in printed(capsys)
    monkeypatch.setitem(sys.modules, "plotly", None)
    assert cli_main(["report", first, "--root", str(root), "-o", str(out)]) == 2
    assert "pip install 'moebench[report]'" in printed(capsys)


def test_plotly_js_beside_many_pages_is_written_once(runs, tmp_path, capsys):
    """--plotly-js DIR: each page loads DIR/plotly-VERSION.min.js by its path relative to
    the page, in place of 5 MB of its own; the file is written once, whole."""
    import plotly
    import plotly.offline

    root, first, second = runs
    shared = tmp_path / "reference"
    pages = [shared / "a" / "a.html", shared / "b c" / "b.html"]
    for page, run_id in zip(pages, (first, second)):
        args = ["report", run_id, "--root", str(root), "-o", str(page), "--plotly-js", str(shared)]
        assert cli_main(args) == 0
        assert f"load plotly.js from {shared}" in printed(capsys)
    js = shared / f"plotly-{plotly.__version__}.min.js"
    assert js.read_text() == plotly.offline.get_plotlyjs()
    stamp = js.stat().st_mtime_ns
    for page in pages:
        text = page.read_text()
        assert f'<script src="../plotly-{plotly.__version__}.min.js"' in text
        assert "/*! For license information please see plotly" not in text
        assert len(text.encode()) < len(plotly.offline.get_plotlyjs()) / 2
    again = ["report", first, "--root", str(root), "-o", str(pages[0]), "--force"]
    assert cli_main([*again, "--plotly-js", str(shared)]) == 0
    assert js.stat().st_mtime_ns == stamp  # not written again
    assert (
        "<script src=" not in write_report([first], tmp_path / "x.html", root=root).path.read_text()
    )
    not_a_folder = ["report", first, "--root", str(root), "-o", str(tmp_path / "y.html")]
    assert cli_main([*not_a_folder, "--plotly-js", str(js)]) == 2
    assert f"--plotly-js {js}: not a folder" in printed(capsys)
    assert not (tmp_path / "y.html").exists()


def test_a_page_that_cannot_be_written_is_one_line_and_no_file(runs, tmp_path, capsys, monkeypatch):
    """A full disk while writing the page: one line naming the file (it was a traceback),
    exit 2, and no half-written page or temporary."""
    import errno
    from pathlib import Path

    root, first, _ = runs
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real_write_text(self, "<html>half", encoding="utf-8")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "full" / "r.html"
    assert cli_main(["report", first, "--root", str(root), "-o", str(out)]) == 2
    assert f"error: cannot write {out}: No space left on device" in printed(capsys)
    assert list(out.parent.iterdir()) == []


def printed(capsys) -> str:
    """What the command printed, with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().out.split())


def test_a_winner_is_named_only_beyond_the_noise() -> None:
    from moebench.report.data import clear_winner

    def group(**columns: list) -> pd.DataFrame:
        base = {"impl": ["a", "b"], "latency_ms": [1.0, 1.5], "noisy": [False, False]}
        return pd.DataFrame({**base, **columns})

    apart = group(latency_ci_low_ms=[0.9, 1.4], latency_ci_high_ms=[1.1, 1.6])
    assert clear_winner(apart) == "a"
    overlapping = group(latency_ci_low_ms=[0.9, 1.05], latency_ci_high_ms=[1.2, 1.6])
    assert clear_winner(overlapping) is None
    noisy = group(latency_ci_low_ms=[0.9, 1.4], latency_ci_high_ms=[1.1, 1.6], noisy=[False, True])
    assert clear_winner(noisy) is None
    # Runs from before the CI columns: p10-p90 must not overlap either.
    old = pd.DataFrame(
        {"impl": ["a", "b"], "latency_ms": [1.0, 1.5], "latency_p10_ms": [0.9, 1.2],
         "latency_p90_ms": [1.3, 1.8]}
    )  # fmt: skip
    assert clear_winner(old) is None
