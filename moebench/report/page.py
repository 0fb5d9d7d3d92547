"""The HTML page: one self-contained file (plotly.js inlined once, no network), filled from
templates with named slots; every piece of text from the data is HTML-escaped.

The page embeds a JSON manifest (`<script id="moebench-manifest">`: each figure with its
trace and point counts, each section left out with the reason) and a small script that
records script errors into `#moebench-errors` and, once loaded, writes
`<div id="moebench-ready" data-plots=N>` (tests and headless browsers read both), with
the plot areas drawn smaller than 300 x 200 px and the titles drawn over an axis label.
The templates, CSS and scripts are in `templates.py` (`tpl` here).
"""

from __future__ import annotations

import html
import json
import math
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from moebench.report import templates as tpl
from moebench.report.data import (
    ReportData,
    RunInfo,
    Standing,
    ceilings_parts,
    leaderboard,
    timing_text,
)
from moebench.report.headlines import headlines
from moebench.report.sections import Section, TableData
from moebench.report.style import FONT, STATUS_COLORS, figure_json

MIB = 2**20


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _num(value: Any, spec: str) -> str:
    return "-" if _missing(value) else format(value, spec)


def render_page(
    data: ReportData, sections: list[Section], *, plotly_script: str, version: str
) -> str:
    """The whole page as one string; `plotly_script`: the tag that loads plotly.js."""
    import plotly.io as pio

    figures_manifest, omitted_manifest, rendered = [], [], []
    for section in sections:
        body: list[str] = []
        if section.omitted:
            body.append(tpl.OMITTED.substitute(key=_e(section.key), reason=_e(section.omitted)))
            omitted_manifest.append({"section": section.key, "reason": section.omitted})
        for div_id, figure in section.figures:
            plot = pio.to_html(
                figure_json(figure),
                full_html=False,
                include_plotlyjs=False,
                div_id=div_id,
                config=tpl.PLOTLY_CONFIG,
                default_width="100%",
                default_height=f"{figure.layout.height or 460}px",
                validate=False,
            )
            body.append(tpl.FIGURE.substitute(section=_e(section.key), plot=plot))
            figures_manifest.append(_figure_manifest(section.key, div_id, figure))
        body += [tpl.NOTE.substitute(text=_e(note)) for note in section.notes]
        if section.table is not None:
            body.append(_small_table(section.table))
        rendered.append(
            tpl.SECTION.substitute(
                key=_e(section.key),
                title=_e(section.title),
                description=_e(section.description),
                body="".join(body),
            )
        )
    frame = data.frame
    manifest = {
        "version": version,
        "runs": [{"label": r.label, "run_id": r.run_id, "cases": r.cases} for r in data.runs],
        "cases": len(frame),
        "statuses": {str(k): int(v) for k, v in frame["status"].value_counts().items()},
        "colors": data.colors,
        "figures": figures_manifest,
        "omitted": omitted_manifest,
    }
    run_ids = ", ".join(r.run_id for r in data.runs)
    title = "moebench report" + (f": {data.runs[0].run_id}" if len(data.runs) == 1 else "")
    subtitle = (
        f"{len(frame)} cases from {len(data.runs)} run{'s' if data.multi_run else ''} ({run_ids})"
    )
    return tpl.PAGE.substitute(
        version=_e(version),
        title=_e(title),
        subtitle=_e(subtitle),
        css=tpl.CSS,
        font=FONT,
        error_hook=tpl.ERROR_HOOK,
        plotly_script=plotly_script,
        environment=_environment(data.runs),
        nav=_nav(sections, data),
        verdict=_verdict(data),
        failures=_failures(data),
        sections="".join(rendered),
        cases=_cases(data),
        made=_e(datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        manifest=json.dumps(manifest).replace("</", "<\\/"),
        page_js=tpl.PAGE_JS,
    )


def _figure_manifest(section: str, div_id: str, figure: Any) -> dict[str, Any]:
    points = 0
    for trace in figure.data:
        for name in ("z", "y", "x"):
            values = getattr(trace, name, None)
            if values is not None:
                points += sum(1 for v in values if v is not None)
                break
    return {"id": div_id, "section": section, "traces": len(figure.data), "points": points}


def _nav(sections: list[Section], data: ReportData) -> str:
    links = [tpl.NAV_LINK.substitute(key="verdict", css_class="", title="At a glance")]
    if (data.frame["status"] != "ok").any():
        links.append(tpl.NAV_LINK.substitute(key="failures", css_class="", title="Failures"))
    links += [
        tpl.NAV_LINK.substitute(
            key=_e(s.key), css_class="off" if s.omitted else "", title=_e(s.title)
        )
        for s in sections
    ]
    links.append(tpl.NAV_LINK.substitute(key="cases", css_class="", title="All cases"))
    return " ".join(links)


def _gpu_text(env: dict[str, Any]) -> str:
    gpus = env.get("gpus") or []
    if not gpus:
        cpu = env.get("cpu") or "?"
        cores = env.get("cpu_count")
        return f"CPU: {cpu}" + (f" ({cores} cores)" if cores else "")
    names: dict[str, int] = {}
    for gpu in gpus:
        names[gpu.get("name", "?")] = names.get(gpu.get("name", "?"), 0) + 1
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in names.items())


def _environment(runs: list[RunInfo]) -> str:
    def facts(run: RunInfo) -> dict[str, str]:
        """The header's lines for one run, from its run.json."""
        meta = run.meta
        env = meta.get("environment") or {}
        gpus = env.get("gpus") or []
        ceilings = run.ceilings
        roofs = ", ".join(ceilings_parts(ceilings))
        sha = env.get("git_sha") or "-"
        return {
            "run": f"{run.label}: {run.run_id}",
            "suite": str(meta.get("suite") or "-"),
            "date": str(meta.get("started_at") or "-").replace("T", " ")[:19],
            "device": _gpu_text(env),
            "driver": str(env.get("driver") or (gpus[0].get("driver") if gpus else None) or "-"),
            "torch / CUDA / triton": (
                f"{env.get('torch') or '-'} / {env.get('torch_cuda') or '-'} / "
                f"{env.get('triton') or '-'}"
            ),
            "moebench / git": f"{env.get('moebench') or '-'} / {sha[:12]}",
            "host": str(env.get("host") or "-"),
            "ceilings (measured)": (roofs or "-")
            + (
                f" (highest of {len(meta['merged_from'])} merged runs)"
                if roofs and not meta.get("ceilings") and meta.get("merged_from")
                else ""
            ),
            "timing": timing_text(meta) or "-",
            "cases": f"{run.cases}"
            + (
                f" of {meta['cases_total']}"
                if meta.get("cases_total") not in (None, run.cases)
                else ""
            )
            + (" (interrupted)" if meta.get("interrupted") else ""),
        }

    table = [facts(run) for run in runs]
    rows = (
        [
            tpl.ENV_ROW.substitute(
                key=_e(key),
                cells="".join(tpl.ENV_CELL.substitute(value=_e(t[key])) for t in table),
            )
            for key in table[0]
        ]
        if table
        else []
    )
    return tpl.ENV.substitute(rows="".join(rows))


def _table(
    headers: list[tuple[str, str]],
    rows: list[tuple[str, list[str]]],
    css_class: str,
    wrap_class: str = "",
) -> str:
    head = "".join(tpl.HEAD_CELL.substitute(kind=kind, text=_e(text)) for text, kind in headers)
    body = "".join(tpl.ROW.substitute(css_class=cls, cells="".join(cells)) for cls, cells in rows)
    return tpl.TABLE.substitute(head=head, body=body, css_class=css_class, wrap_class=wrap_class)


def _cell(text: str, sort: Any = "", css_class: str = "", raw: bool = False) -> str:
    return tpl.CELL.substitute(
        css_class=css_class,
        sort=_e("" if _missing(sort) else sort),
        text=text if raw else _e(text),
    )


def _small_table(table: TableData) -> str:
    classes = table.row_classes or [""] * len(table.rows)
    rows = [(cls, [_cell(text) for text in row]) for cls, row in zip(classes, table.rows)]
    return _table([(h, "text") for h in table.headers], rows, "sortable", "small")


def _status_html(status: str) -> str:
    return tpl.STATUS.substitute(color=STATUS_COLORS.get(status, "#666"), text=_e(status))


def _impl_html(data: ReportData, impl: str) -> str:
    return tpl.SWATCH.substitute(color=_e(data.colors.get(impl, "#999")), text=_e(impl))


def _verdict(data: ReportData) -> str:
    standings = leaderboard(data)
    headlines = [
        tpl.HEADLINE.substitute(css_class=css, text=text)
        for css, text in _headlines(data, standings)
    ]
    base_names = sorted({b for b in data.base_impls.values() if b})
    base = " / ".join(base_names) or "base"
    most = max((s.contests for s in standings), default=0) or 1
    rows = []
    for s in standings:
        wins = (
            f"{s.wins} of {s.contests}"
            + tpl.BAR.substitute(
                pct=f"{100 * s.wins / most:.0f}", color=_e(data.colors.get(s.impl, "#999"))
            )
            if s.exact and s.contests
            else "-"
        )
        rows.append(
            (
                "",
                [
                    _cell(_impl_html(data, s.impl), s.impl, raw=True),
                    _cell("exact" if s.exact else "variant"),
                    _cell(f"{s.ok} / {s.total}", s.ok, "num"),
                    _cell(wins, s.wins, raw=True),
                    _cell(
                        _num(s.geomean_speedup, ".3g") + ("x" if s.geomean_speedup else ""),
                        s.geomean_speedup,
                        "num",
                    ),
                    _cell(_num(s.median_rel_err, ".2e"), s.median_rel_err, "num"),
                    _cell(_num(s.median_fidelity_err, ".2e"), s.median_fidelity_err, "num"),
                ],
            )
        )
    table = _table(
        [
            ("implementation", "text"),
            ("kind", "text"),
            ("ok / cases", "num"),
            ("fastest exact on", "num"),
            (f"speed vs {base} (geomean)", "num"),
            ("median rel_err (own check)", "num"),
            (f"median fidelity_err (vs {base})", "num"),
        ],
        rows,
        "sortable",
        "small",
    )
    return tpl.VERDICT.substitute(headlines="".join(headlines), table=table)


def _headlines(data: ReportData, standings: list[Standing]) -> list[tuple[str, str]]:
    """(css class, escaped HTML) of each statement of `headlines`."""
    lines = []
    for statement in headlines(data, standings):
        text = _e(statement.text)
        if statement.kind == "win" and statement.impl:
            # the winner's name with its colour swatch, in bold
            text = text.replace(_e(statement.impl), f"<b>{_impl_html(data, statement.impl)}</b>", 1)
        lines.append((statement.kind, text))
    return lines


def _failures(data: ReportData) -> str:
    frame = data.frame
    failed = frame[frame["status"] != "ok"]
    if failed.empty:
        return ""
    counts = failed["status"].value_counts()
    by_status = ", ".join(f"{n} {s}" for s, n in counts.items())
    rows = [
        (
            "failed",
            [
                _cell(_impl_html(data, r["impl"]), r["impl"], raw=True),
                _cell(r["case_label"]),
                _cell(_status_html(str(r["status"])), r["status"], raw=True),
                _cell(
                    "(no message)" if _missing(r.get("error")) else str(r["error"]),
                    css_class="error",
                ),
            ],
        )
        for r in failed.to_dict("records")
    ]
    table = _table(
        [("implementation", "text"), ("case", "text"), ("status", "text"), ("error", "text")],
        rows,
        "sortable",
    )
    return tpl.FAILURES.substitute(
        count=len(failed), total=len(frame), by_status=_e(by_status), table=table
    )


def _cases(data: ReportData) -> str:
    frame = data.frame.sort_values(["run_index", "facet_label", "tokens", "impl"])
    headers = [("impl", "text")]
    if data.multi_run:
        headers.append(("run", "text"))
    headers += [
        ("shape", "text"),
        ("tokens", "num"),
        ("mode", "text"),
        ("dtype", "text"),
        ("routing", "text"),
        ("status", "text"),
        ("latency ms", "num"),
        ("p10-p90 ms", "num"),
        ("tokens/s", "num"),
        ("vs base", "num"),
        ("peak MiB", "num"),
        ("weights MiB", "num"),
        ("roofline", "num"),
        ("rel_err", "num"),
        ("fidelity_err", "num"),
        ("message", "text"),
    ]
    rows = []
    for r in frame.to_dict("records"):
        status = str(r.get("status"))
        cells = [_cell(_impl_html(data, r["impl"]), r["impl"], raw=True)]
        if data.multi_run:
            cells.append(_cell(r["run_label"]))
        spread = "-"
        if not _missing(r.get("latency_p10_ms")) and not _missing(r.get("latency_p90_ms")):
            spread = f"{r['latency_p10_ms']:.3g}-{r['latency_p90_ms']:.3g}"
        speedup = r.get("base_speedup")
        cells += [
            _cell(r["shape_label"]),
            _cell(_num(r.get("tokens"), ".0f"), r.get("tokens"), "num"),
            _cell(str(r.get("mode"))),
            _cell(str(r.get("dtype"))),
            _cell(str(r.get("routing"))),
            _cell(_status_html(status), status, raw=True),
            _cell(
                ("~" if r.get("noisy") is True else "") + _num(r.get("latency_ms"), ".4g"),
                r.get("latency_ms"),
                "num",
            ),
            _cell(spread, r.get("latency_p10_ms"), "num"),
            _cell(_num(r.get("tokens_per_s"), ",.0f"), r.get("tokens_per_s"), "num"),
            _cell("-" if _missing(speedup) else f"{speedup:.3g}x", speedup, "num"),
            _cell(_mib(r.get("peak_mem_bytes")), r.get("peak_mem_bytes"), "num"),
            _cell(_mib(r.get("weight_bytes")), r.get("weight_bytes"), "num"),
            _cell(_num(r.get("roofline_frac"), ".1%"), r.get("roofline_frac"), "num"),
            _cell(_num(r.get("rel_err"), ".2e"), r.get("rel_err"), "num"),
            _cell(_num(r.get("fidelity_err"), ".2e"), r.get("fidelity_err"), "num"),
            _cell(
                "" if _missing(r.get("error")) else str(r["error"]),
                css_class="error" if status != "ok" else "",
            ),
        ]
        rows.append(("failed" if status != "ok" else "", cells))
    base_names = sorted({b for b in data.base_impls.values() if b})
    return tpl.CASES.substitute(
        table=_table(headers, rows, "sortable cases"),
        base=_e(" / ".join(base_names) or "the base layer"),
    )


def _mib(value: Any) -> str:
    return "-" if _missing(value) else f"{value / MIB:,.2f}"
