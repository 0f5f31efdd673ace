"""Sparsity trade-off (SMAT §5): ID average vs OOD average over the runs of a sweep, and each vs the swept value."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.figures._base import FigureResult, NoData, new_figure, save_figure
from analysis.load import config_value, varying_keys
from analysis.tables import protocol_label, setting_frame
from metabench.stats import average_estimate, estimate

__all__ = ["plot_sparsity_tradeoff", "swept_key", "sweep_summary"]

log = logging.getLogger(__name__)
SPARSITY_HINTS = ("sparsity", "tau", "density")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def swept_key(manifests: Mapping[str, Mapping[str, Any]]) -> str:
    """The config key a sweep varies: the only numeric key that differs between the runs, else the only one
    of those whose name mentions sparsity/tau/density. ``NoData`` when that does not single one out."""
    if len(manifests) < 2:
        raise NoData("A sweep needs at least 2 runs.")
    keys = varying_keys(list(manifests.values()))
    numeric = [k for k in keys if all(_is_number(config_value(m, k)) for m in manifests.values())]
    hinted = [k for k in numeric if any(h in k.rsplit(".", 1)[-1] for h in SPARSITY_HINTS)]
    for candidates in (numeric, hinted):
        if len(candidates) == 1:
            return candidates[0]
    raise NoData(f"Cannot tell which config key the runs sweep (numeric keys that differ: "
                 f"{', '.join(numeric) or 'none'}); "
                 "pass key=... explicitly.")


def _common_protocol(frame: pd.DataFrame) -> tuple[str, int]:
    per_run = frame.groupby("run_id")[["mode", "steps"]].apply(lambda f: set(zip(f["mode"], f["steps"])))
    common = set.intersection(*per_run) if len(per_run) else set()
    if not common:
        raise NoData("The runs share no evaluation protocol (mode, steps).")
    return ("zero_shot", 0) if ("zero_shot", 0) in common else sorted(common)[0]


def sweep_summary(frame: pd.DataFrame, manifests: Mapping[str, Mapping[str, Any]], key: str | None = None,
                  group_key: str | None = None, protocol: tuple[str, int] | None = None) -> pd.DataFrame:
    """One row per run: swept value, group, ID/OOD averages with 95% half-widths (percent), measured sparsity.

    The ID (OOD) average is the plain mean of the run's per-source mean accuracies; its half-width is
    1.96·√(Σ σᵢ²/nᵢ)/k. ``sparsity`` is the mean of the episodes' ``sparsity`` column (NaN when not recorded).
    Protocol: ``protocol`` if given, else zero_shot when every run has it, else the first protocol all share.
    """
    frame = setting_frame(frame)
    frame = frame[frame["run_id"].isin(list(manifests))]
    if frame.empty:
        raise NoData("None of the sweep's runs has evaluated episodes.")
    key = key or swept_key(manifests)
    mode, steps = protocol or _common_protocol(frame)
    rows = []
    for run_id, run in frame[(frame["mode"] == mode) & (frame["steps"] == int(steps))].groupby("run_id", sort=False):
        manifest = manifests[run_id]
        row = {"run_id": run_id, "label": run["label"].iloc[0], "value": config_value(manifest, key),
               "group": config_value(manifest, group_key) if group_key else "", "mode": mode, "steps": int(steps)}
        for domain in ("id", "ood"):
            parts = [estimate(g["accuracy"]) for _, g in run[run["domain"] == domain].groupby("source")]
            avg = average_estimate(parts)
            row.update({f"{domain}_mean": 100 * avg.mean, f"{domain}_ci95": 100 * avg.half_width,
                        f"{domain}_sources": len(parts)})
        row["sparsity"] = float(np.nanmean(run["sparsity"])) if run["sparsity"].notna().any() else math.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        raise NoData(f"No run of the sweep was evaluated with protocol {protocol_label(mode, steps)}.")
    if out[["id_sources", "ood_sources"]].nunique().max() > 1:
        log.warning("The sweep's runs were evaluated on different source sets; their averages are not comparable.")
    return out.sort_values(["group", "value"], ignore_index=True)


def plot_sparsity_tradeoff(summary: pd.DataFrame, out_dir: Path, key: str,
                           name: str = "sparsity_tradeoff") -> FigureResult:
    """(a) OOD vs ID average per setting, (b) ID average vs ``key``, (c) OOD average vs ``key``; 95% CI bars."""
    points = summary.dropna(subset=["id_mean", "ood_mean"])
    if len(points) < 2:
        raise NoData("The sparsity trade-off needs at least 2 runs with both ID and OOD results.")
    fig, (ax_a, ax_b, ax_c) = new_figure(ncols=3)
    for group, part in points.groupby("group", sort=False):
        tag = f"{group}" if group != "" else None
        ax_a.errorbar(part["id_mean"], part["ood_mean"], xerr=part["id_ci95"], yerr=part["ood_ci95"], marker="o",
                      capsize=3, label=tag)
        for r in part.itertuples():
            ax_a.annotate(f"{r.value:g}", (r.id_mean, r.ood_mean), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)
        ax_b.errorbar(part["value"], part["id_mean"], yerr=part["id_ci95"], marker="o", capsize=3, label=tag)
        ax_c.errorbar(part["value"], part["ood_mean"], yerr=part["ood_ci95"], marker="o", capsize=3, label=tag)
    ax_a.set(xlabel="ID average accuracy (%)", ylabel="OOD average accuracy (%)", title="(a) ID vs OOD")
    ax_b.set(xlabel=key, ylabel="ID average accuracy (%)", title=f"(b) ID vs {key}")
    ax_c.set(xlabel=key, ylabel="OOD average accuracy (%)", title=f"(c) OOD vs {key}")
    if points["group"].nunique() > 1:
        ax_a.legend(fontsize=7)
    mode, steps = points["mode"].iloc[0], points["steps"].iloc[0]
    caption = (f"Sparsity trade-off over {len(points)} runs that differ in `{key}` (protocol "
               f"{protocol_label(mode, steps)}). ID/OOD average = plain mean of the per-source mean episode "
               "accuracies; error bars = 95% CI of that average, 1.96·√(Σσᵢ²/nᵢ)/k over its k sources (population "
               f"σ). Points in (a) are labelled with their `{key}` value.")
    return save_figure(fig, out_dir, name, caption)
