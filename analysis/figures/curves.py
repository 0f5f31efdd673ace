"""Curves over meta-training: meta-gradient alignment (SMAT §5) and ID/OOD validation accuracy (SMAT Fig. 1)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from analysis.figures._base import FigureResult, NoData, new_figure, save_figure

__all__ = ["learning_curves", "plot_alignment", "plot_learning_curves", "speedup"]

CURVE_KEYS = ("val_id", "val_ood")
PARAM_GROUP_NAMES = {"delta": r"shared delta $\theta^\delta$", "expert_m": r"experts $z_m \odot \theta^\delta$"}


def plot_alignment(alignment: pd.DataFrame, out_dir: Path, name: str = "grad_alignment") -> FigureResult:
    """Alignment vs tasks seen, one panel per parameter group, one line per sparsity level (or label)."""
    if alignment.empty:
        raise NoData("No meta-gradient alignment measurements (grad_alignment is empty).")
    line_key = "sparsity" if "sparsity" in alignment.columns and alignment["sparsity"].notna().all() else "label"
    groups = list(dict.fromkeys(alignment["param_group"]))
    fig, axes = new_figure(ncols=len(groups))
    for ax, group in zip(axes, groups):
        part = alignment[alignment["param_group"] == group]
        for level, line in part.groupby(line_key, sort=True):
            mean = line.groupby("tasks_seen")["alignment"].mean().sort_index()
            tag = f"sparsity {level:g}" if line_key == "sparsity" else str(level)
            ax.plot(mean.index, mean.to_numpy(), marker="o", markersize=3, label=tag)
        ax.axhline(0.0, color="gray", linewidth=0.5)
        ax.set(xlabel="tasks seen", ylabel="meta-gradient alignment", title=PARAM_GROUP_NAMES.get(group, str(group)))
        ax.legend(fontsize=7)
    caption = ("Meta-gradient alignment vs meta-training tasks seen: alignment = mean pairwise cosine similarity "
               "of the per-task meta-gradients within a meta-batch (of the parameter group in the panel title), "
               "averaged over the measurements logged at the same number of tasks; one line per "
               f"{'target sparsity' if line_key == 'sparsity' else 'setting'}.")
    return save_figure(fig, out_dir, name, caption)


def learning_curves(logs: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Long frame (label, tasks, val_id, val_ood, val_id_ci95, val_ood_ci95) from training logs per label;
    keeps the records that have ``tasks`` and at least one of ``val_id`` / ``val_ood``."""
    frames = []
    for label, log in logs.items():
        if log.empty or "tasks" not in log.columns or not set(CURVE_KEYS) & set(log.columns):
            continue
        cols = ["tasks", *(c for c in (*CURVE_KEYS, "val_id_ci95", "val_ood_ci95") if c in log.columns)]
        part = log[cols].dropna(subset=[c for c in CURVE_KEYS if c in cols], how="all")
        frames.append(part.assign(label=label))
    columns = ["label", "tasks", *CURVE_KEYS, "val_id_ci95", "val_ood_ci95"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True).reindex(columns=columns).sort_values(["label", "tasks"], kind="stable")


def _tasks_to_reach(curve: pd.DataFrame, metric: str, target: float) -> float:
    reached = curve[curve[metric] >= target - 1e-12]
    return float(reached["tasks"].min()) if len(reached) else math.nan


def speedup(curves: pd.DataFrame, baseline: str, metric: str = "val_id") -> pd.DataFrame:
    """Tasks each setting needs to reach the baseline's final ``metric`` (its value at its last logged record).

    tasks_to_target = the first logged ``tasks`` whose value is ≥ the target (resolution = the logging interval;
    NaN if never reached). speedup = baseline's tasks_to_target / the setting's; fewer_tasks = 1 − 1/speedup
    (SMAT: "reaches PMF's final ID average 43% sooner" is fewer_tasks = 0.43).
    """
    base = curves[(curves["label"] == baseline)].dropna(subset=[metric]).sort_values("tasks")
    if base.empty:
        raise NoData(f'The baseline "{baseline}" has no "{metric}" records in its training log.')
    target = float(base[metric].iloc[-1])
    base_tasks = _tasks_to_reach(base, metric, target)
    rows = []
    for label, curve in curves.dropna(subset=[metric]).groupby("label", sort=False):
        needed = _tasks_to_reach(curve, metric, target)
        ratio = base_tasks / needed if needed and not math.isnan(needed) else math.nan
        rows.append({"label": label, "metric": metric, "target": 100 * target, "tasks_to_target": needed,
                     "baseline_tasks": base_tasks, "speedup": ratio,
                     "fewer_tasks": 1 - 1 / ratio if ratio == ratio and ratio else math.nan})
    return pd.DataFrame(rows)


def plot_learning_curves(curves: pd.DataFrame, out_dir: Path, baseline: str | None = None,
                         name: str = "learning_curves") -> FigureResult:
    """ID and OOD validation accuracy vs tasks seen, one line per setting; dashed: the baseline's final ID."""
    if curves.empty:
        raise NoData("No training log has validation records (keys tasks, val_id / val_ood).")
    panels = [k for k in CURVE_KEYS if curves[k].notna().any()]
    fig, axes = new_figure(ncols=len(panels))
    for ax, key in zip(axes, panels):
        for label, curve in curves.dropna(subset=[key]).groupby("label", sort=False):
            y = 100 * curve[key]
            ax.plot(curve["tasks"], y, marker="o", markersize=3, label=str(label))
            ci = curve[f"{key}_ci95"]
            if ci.notna().any():
                ax.fill_between(curve["tasks"], y - 100 * ci, y + 100 * ci, alpha=0.2)
        domain = "ID" if key == "val_id" else "OOD"
        ax.set(xlabel="meta-training tasks seen", ylabel=f"{domain} validation accuracy (%)")
        ax.legend(fontsize=7)
    caption = ("Learning curves: mean validation accuracy over the ID (OOD) sources, logged in train_log.jsonl as "
               "val_id (val_ood) against tasks = meta-training tasks seen; bands = logged 95% half-widths.")
    if baseline is not None and "val_id" in panels and (curves["label"] == baseline).any():
        table = speedup(curves, baseline)
        axes[0].axhline(table["target"].iloc[0], color="gray", linestyle="--", linewidth=0.8)
        reached = [f"{r.label}: {r.tasks_to_target:g} tasks ({r.speedup:.2f}× the baseline's speed)"
                   for r in table.itertuples() if r.label != baseline and r.tasks_to_target == r.tasks_to_target]
        caption += (f" Dashed: {baseline}'s final ID accuracy ({table['target'].iloc[0]:.2f}%), which it first "
                    f"reaches at {table['baseline_tasks'].iloc[0]:g} tasks; first logged point at or above it — "
                    + ("; ".join(reached) if reached else "no other setting reaches it") + ".")
    return save_figure(fig, out_dir, name, caption)
