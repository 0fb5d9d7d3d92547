"""Every figure of the report, one function per question a reader asks, in reading order.
Each returns a `Section` (moebench.report.sections): its figures, or the one-line reason it
was left out (a figure is never drawn empty), plus notes and an optional small table. The
figures live by family: speed (figures_speed), cost (figures_cost), routing
(figures_routing) and profiling (figures_profile).

Colours: one per implementation (style.impl_colors), the same in every figure; a run is
told by its line dash and marker. Only imported while a report is built (imports plotly).
"""

from __future__ import annotations

from collections.abc import Callable

from moebench.report.data import ReportData, series_options
from moebench.report.figures_cost import energy, memory, parameters, roofline
from moebench.report.figures_routing import balance, communication, fidelity
from moebench.report.figures_speed import latency, overview, run_speedups, throughput
from moebench.report.sections import Section, TableData

__all__ = ["Section", "TableData", "build_sections"]


def build_sections(data: ReportData) -> list[Section]:
    """All sections, in reading order."""
    builders: list[Callable[[ReportData], Section]] = [
        overview,
        throughput,
        latency,
        memory,
        parameters,
        roofline,
        balance,
        communication,
        energy,
        fidelity,
        run_speedups,
    ]
    sections = [build(data) for build in builders]
    legend = series_options(data.frame)
    if legend:
        note = "Options behind the legend names: " + "; ".join(
            f"{name} = {text}" for name, text in legend.items()
        )
        for section in sections:
            if section.figures:
                section.notes.append(note)
    return sections


# -- helpers ---------------------------------------------------------------------------
