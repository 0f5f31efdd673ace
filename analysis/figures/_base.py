"""Shared figure plumbing: Agg-canvas figures (no pyplot, no GUI, no global backend switch), PNG + SVG output."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from episodes.atomic import atomic_path

__all__ = ["FigureResult", "NoData", "has_data", "new_figure", "save_figure"]

log = logging.getLogger(__name__)


class NoData(ValueError):
    """The inputs hold nothing to plot; the report skips the figure with this message instead of an empty plot."""


@dataclass(frozen=True)
class FigureResult:
    """A written figure: its name, caption (with the definitions behind it) and files."""

    name: str
    caption: str
    png: Path
    svg: Path
    figure: Figure | None = field(default=None, repr=False, compare=False)


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list]:
    """A figure on the Agg canvas and its axes as a flat list."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def has_data(ax: Axes) -> bool:
    """Whether an axes holds any data artist (line, collection such as scatter/errorbar, bar patch, image)."""
    return bool(ax.lines or ax.collections or ax.patches or ax.images)


def save_figure(fig: Figure, out_dir: Path, name: str, caption: str) -> FigureResult:
    """Write ``<name>.png`` (150 dpi) and ``<name>.svg`` into ``out_dir``; ``NoData`` if a visible axes is empty."""
    empty = [ax.get_title() or f"axes {i}" for i, ax in enumerate(fig.axes) if ax.get_visible() and ax.axison
             and not has_data(ax) and ax.get_label() != "<colorbar>"]
    if empty:
        raise NoData(f"Figure {name}: nothing to draw in {', '.join(empty)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    for path in (png, svg):
        with atomic_path(path) as tmp:  # renamed when complete: no half-written figure is left behind
            fig.savefig(tmp, format=path.suffix[1:], dpi=150)
    log.info("Wrote figure %s", png)
    return FigureResult(name, caption, png, svg, fig)
