"""Figures of the report; each ``plot_*`` writes PNG + SVG and returns a ``FigureResult`` with its caption,
or raises ``NoData`` when there is nothing to draw (never an empty plot)."""

from __future__ import annotations

from analysis.figures._base import FigureResult, NoData
from analysis.figures.curves import learning_curves, plot_alignment, plot_learning_curves, speedup
from analysis.figures.expert_plots import plot_capacity, plot_dendrogram, plot_overlap
from analysis.figures.sweep import plot_sparsity_tradeoff, sweep_summary, swept_key

__all__ = [
    "FigureResult",
    "NoData",
    "learning_curves",
    "plot_alignment",
    "plot_capacity",
    "plot_dendrogram",
    "plot_learning_curves",
    "plot_overlap",
    "plot_sparsity_tradeoff",
    "speedup",
    "sweep_summary",
    "swept_key",
]
