"""The per-source accuracy table printed at the end of ``run`` and ``eval``."""

from __future__ import annotations

from typing import Any

import pandas as pd
from rich.table import Table

from metabench.stats import average_estimate, estimate, summarize

__all__ = ["domain_averages", "summary_table"]


def domain_averages(frame: pd.DataFrame) -> pd.DataFrame:
    """Plain average of per-source means for each domain (ID / OOD), as in the SMAT and PMF tables, with the
    report's half-width of that average (``metabench.stats.average_estimate``)."""
    rows = []
    for (domain, mode, steps), part in frame.groupby(["domain", "mode", "steps"], sort=False):
        parts = [estimate(g["accuracy"]) for _, g in part.groupby("source", sort=False)]
        avg = average_estimate(parts)
        rows.append({"domain": domain, "mode": mode, "steps": steps, "accuracy": 100 * avg.mean,
                     "ci95": 100 * avg.half_width, "sources": len(parts)})
    return pd.DataFrame(rows, columns=["domain", "mode", "steps", "accuracy", "ci95", "sources"])


def summary_table(frame: pd.DataFrame, manifest: dict[str, Any]) -> Table:
    """A rich table: one row per source and protocol (mean ± 95% CI), then the ID and OOD averages."""
    backbone = manifest.get("backbone", {})
    pretrained = backbone.get("pretrained", False)
    title = f"{manifest.get('config', {}).get('learner', {}).get('name', '?')} on {backbone.get('alias', '?')}"
    caption = "accuracy (%) = mean ± 1.96·σ/√n over episodes"
    if not pretrained:
        title += "  [bold red](backbone NOT pretrained: random init)[/]"
        episodes = manifest.get("config", {}).get("eval", {}).get("episodes")
        caption += (f"; random-init backbone, {episodes} episodes per source: this run checks the pipeline, "
                    "not the method (pretrained weights: --weights FILE)")
    table = Table(title=title, caption=caption)
    for col in ("source", "domain", "mode", "steps", "episodes", "accuracy (%)"):
        table.add_column(col, justify="right" if col in ("steps", "episodes", "accuracy (%)") else "left")
    per_source = summarize(frame)
    for _, r in per_source.iterrows():
        table.add_row(r.source, r.domain.upper(), r["mode"], str(r.steps), str(r.n), f"{r.accuracy:.2f} ± {r.ci95:.2f}")
    if len(per_source):
        table.add_section()
        for _, r in domain_averages(frame).iterrows():
            label = f"{r.domain.upper()} avg ({r.sources})"
            table.add_row(label, r.domain.upper(), r["mode"], str(r.steps), "", f"{r.accuracy:.2f} ± {r.ci95:.2f}")
    return table
