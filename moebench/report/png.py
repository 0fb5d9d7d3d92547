"""PNG export of the report's figures through kaleido (which drives a Chrome/Chromium;
the system's Chromium is used when kaleido finds no browser of its own)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

PNG_WIDTH = 1200
SYSTEM_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class PngUnavailableError(RuntimeError):
    """kaleido is not installed."""


def require_kaleido() -> None:
    """Raise `PngUnavailableError` (with what to install) when kaleido cannot be imported."""
    try:
        import kaleido  # noqa: F401
    except ImportError as exc:
        raise PngUnavailableError(
            "PNG export needs kaleido: pip install 'moebench[png]' (it drives the system "
            "Chromium: apt-get install chromium)"
        ) from exc


def _point_at_system_browser() -> None:
    """kaleido (through choreographer) reads BROWSER_PATH; point it at a system browser."""
    if os.environ.get("BROWSER_PATH"):
        return
    for name in SYSTEM_BROWSERS:
        found = shutil.which(name)
        if found:
            os.environ["BROWSER_PATH"] = found
            return


def export_pngs(figures: list[tuple[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write each (div id, figure) as `<out_dir>/<div id>.png`; the written paths."""
    require_kaleido()
    import plotly.io as pio

    from moebench.report.style import figure_json

    _point_at_system_browser()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs, paths, heights = [], [], []
    for div_id, figure in figures:
        specs.append(figure_json(figure))
        heights.append(int(figure.layout.height or 460))
        paths.append(out / f"{div_id.removeprefix('fig-')}.png")
    if specs:  # one browser session for all of them
        pio.write_images(
            specs,
            paths,
            format="png",
            scale=1,
            width=[PNG_WIDTH] * len(specs),
            height=heights,
            validate=False,
        )
    return paths
