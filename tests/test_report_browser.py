"""The report in a real browser: headless Chromium loads the page offline, every figure
draws its traces and no script error is raised. Skipped where Chromium is not installed
(`apt-get install chromium`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("plotly")

from moebench.measure.timing import TimingPlan
from moebench.report.build import plotly_file, read_manifest, render_report, write_report
from moebench.report.data import prepare
from moebench.runner import run_cases
from tests.test_report import small_cases, synthetic_sweep

CHROMIUM = next(
    (
        found
        for name in ("/usr/bin/chromium", "chromium", "chromium-browser")
        if (found := shutil.which(name))
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)"
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--window-size=1400,1000",
)


def rendered_dom(page: Path, tmp_path: Path) -> str:
    """The DOM after the page's scripts ran (5 s of virtual time)."""
    profile = tmp_path / f"profile-{page.stem}"
    out = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def check_rendered(dom: str, manifest: dict) -> None:
    ready = re.search(r'<div id="moebench-ready"[^>]*>', dom)
    assert ready, "the page's load handler never ran"
    marker = ready.group(0)
    assert 'data-errors="0"' in marker, re.search(r'id="moebench-errors"[^<]*', dom)
    assert f'data-plots="{len(manifest["figures"])}"' in marker
    assert re.search(r'<pre id="moebench-errors" hidden="?"?>\s*</pre>', dom)
    # Every plot area at least 300 x 200 px, no figure title over an axis label.
    assert 'data-small-plots=""' in marker, marker
    assert 'data-overlaps=""' in marker, marker
    ids = [f["id"] for f in manifest["figures"]]
    assert dom.count('class="main-svg"') >= 2 * len(ids)
    for index, div_id in enumerate(ids):
        start = dom.index(f'id="{div_id}"')
        end = dom.index(f'id="{ids[index + 1]}"') if index + 1 < len(ids) else len(dom)
        segment = dom[start:end]
        assert "js-plotly-plot" in segment, div_id
        assert re.search(r'class="[^"]*\btrace\b', segment), f"{div_id} drew no trace"
        assert (
            re.search(
                r'class="(?:point|hm|bars|box|js-line)|<path class="js-line|'
                r'class="[^"]*point',
                segment,
            )
            or "<image" in segment
        ), div_id


def test_a_real_run_renders_in_chromium(tmp_path):
    plan = TimingPlan(budget_ms=50, warmup=1, min_repeats=3, max_repeats=10)
    cases = [c for c in small_cases(("grouped", "capacity")) if c.shape.num_experts == 4]
    outcome = run_cases(
        cases, suite_name="browser", plan=plan, timeout_s=60, out_root=tmp_path, isolate=False
    )
    page = tmp_path / "real.html"
    result = write_report([outcome.run_id], page, root=tmp_path)
    assert len(result.manifest["figures"]) >= 8
    check_rendered(rendered_dom(page, tmp_path), result.manifest)


def test_a_page_loading_plotly_js_beside_it_renders_and_says_when_it_is_missing(tmp_path):
    """`--plotly-js DIR`: the page draws every figure from the shared file; without the
    file it says in the page which file it needed, not a blank page."""
    import plotly.offline

    frame = synthetic_sweep(shapes=2, tokens=(1, 64), samples=20)
    page = tmp_path / "reference" / "run" / "run.html"
    js, src = plotly_file(tmp_path / "reference", page)
    page_text, _ = render_report(prepare([frame], [{"run_id": "beside"}]), src)
    page.parent.mkdir(parents=True)
    page.write_text(page_text)
    js.write_text(plotly.offline.get_plotlyjs())
    check_rendered(rendered_dom(page, tmp_path), read_manifest(page_text))
    js.unlink()
    dom = rendered_dom(page, tmp_path)
    assert re.search(r'<pre id="moebench-errors">[^<]*plotly.js did not load from', dom), dom[:500]


def test_every_kind_of_figure_renders_in_chromium(tmp_path):
    """Two runs of a sweep with more shapes than panels fit (drop-downs), communication,
    energy, phases and a comparison: every figure of the report drawn (the kernel table
    is read from a profiled run's folder: tests/test_profiling.py)."""
    frame = synthetic_sweep(shapes=13, tokens=(1, 4096), samples=200)
    slower = frame.assign(latency_ms=frame["latency_ms"] * 1.5)
    meta = {"run_id": "big", "ceilings": {"copy_gbps": 3000, "matmul_tflops_bfloat16": 800}}
    page_text, _ = render_report(prepare([frame, slower], [meta, {**meta, "run_id": "b2"}]))
    manifest = read_manifest(page_text)
    assert [o["section"] for o in manifest["omitted"]] == ["kernels"]
    assert "sync-bound" in page_text and "launch-bound" in page_text
    page = tmp_path / "big.html"
    page.write_text(page_text)
    dom = rendered_dom(page, tmp_path)
    check_rendered(dom, manifest)
    assert "updatemenu" in dom


def test_long_option_labels_leave_every_plot_readable(tmp_path):
    """Implementations run with long option sets (two of deepseek, as the seeds suite
    does): legends and categories carry short names, every plot area stays at least
    300 x 200 px and no title overlaps an axis label (checked in the rendered page)."""
    frame = synthetic_sweep(shapes=3, tokens=(1, 64, 4096), samples=50)
    long_options = [
        '{"n_groups": 4, "routed_scaling": 1.0, "scoring": "sigmoid", "topk_groups": 2}',
        '{"n_groups": 8, "routed_scaling": 2.5, "scoring": "softmax", "topk_groups": 4}',
    ]
    variants = [
        frame[frame["impl"] == "capacity"].assign(
            impl="deepseek", options=options, exact=False, case_id=lambda d, i=i: d.case_id + str(i)
        )
        for i, options in enumerate(long_options)
    ]
    frame = pd.concat([frame, *variants], ignore_index=True)
    meta = {"run_id": "long", "ceilings": {"copy_gbps": 3000, "matmul_tflops_bfloat16": 800}}
    page_text, sections = render_report(prepare([frame], [meta]))
    names = {trace.name for s in sections for _, f in s.figures for trace in f.data}
    assert {"deepseek·1", "deepseek·2"} <= names
    assert not any(name and "scoring" in name for name in names)
    roofline = next(s for s in sections if s.key == "roofline")
    assert any("deepseek·1 = n_groups=4" in note for note in roofline.notes)
    page = tmp_path / "long.html"
    page.write_text(page_text)
    check_rendered(rendered_dom(page, tmp_path), read_manifest(page_text))


def test_png_export_through_kaleido(tmp_path):
    pytest.importorskip("kaleido", reason="PNG export needs kaleido (pip install 'moebench[png]')")
    from moebench.report.png import export_pngs

    frame = synthetic_sweep(shapes=2, tokens=(1, 64), samples=50)
    _, sections = render_report(prepare([frame], [{"run_id": "png"}]))
    figures = [figure for section in sections for figure in section.figures][:2]
    paths = export_pngs(figures, tmp_path / "png")
    assert [p.name for p in paths] == [f"{div_id[4:]}.png" for div_id, _ in figures]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
