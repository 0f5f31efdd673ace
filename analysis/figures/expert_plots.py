"""Expert figures (SMAT §5): capacity by layer type and depth, mask overlap heatmap, task dendrogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.cluster import hierarchy

from analysis.experts import LAYER_TYPE_NAMES, capacity, jaccard_from_counts, source_alpha, task_linkage
from analysis.figures._base import FigureResult, NoData, new_figure, save_figure

__all__ = ["plot_capacity", "plot_dendrogram", "plot_overlap"]

DOMAIN_COLOURS = {"id": "tab:blue", "ood": "tab:red"}


def _capacity_panel(ax, cap: pd.DataFrame, by: str, names: dict | None = None) -> None:
    groups = list(dict.fromkeys(cap[by]))
    x = np.arange(len(groups))
    mean = cap.groupby(by, sort=False)["fraction"].mean().reindex(groups)
    ax.bar(x, mean.to_numpy(), color="lightgray", edgecolor="gray", label="mean over experts")
    experts = sorted(cap["expert"].unique())
    jitter = np.linspace(-0.3, 0.3, len(experts)) if len(experts) > 1 else [0.0]
    for offset, expert in zip(jitter, experts):
        part = cap[cap["expert"] == expert].set_index(by)["fraction"].reindex(groups)
        ax.scatter(x + offset, part.to_numpy(), s=10, label=f"expert {expert}", zorder=3)
    ax.set_xticks(x, [names.get(g, g) if names else str(g) for g in groups], rotation=45 if names else 0,
                  ha="right" if names else "center", fontsize=7)
    ax.set_ylabel("fraction of non-zero mask entries")


def plot_capacity(mask_stats: pd.DataFrame, out_dir: Path, name: str = "expert_capacity") -> FigureResult:
    """Fraction of non-zero mask entries per expert, (a) by layer type, (b) by block depth."""
    if mask_stats.empty or mask_stats["numel"].sum() == 0:
        raise NoData("No mask statistics (mask_stats is empty).")
    fig, (ax_t, ax_d) = new_figure(ncols=2, width=5.0)
    _capacity_panel(ax_t, capacity(mask_stats, "layer_type"), "layer_type", LAYER_TYPE_NAMES)
    ax_t.set_title("(a) by layer type")
    by_depth = capacity(mask_stats, "depth")
    if by_depth.empty:
        ax_d.set_axis_off()
    else:
        _capacity_panel(ax_d, by_depth, "depth")
        ax_d.set(title="(b) by depth", xlabel="block index (as in parameter names, from 0)")
    if mask_stats["expert"].nunique() <= 16:
        fig.legend(*ax_t.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    caption = ("Expert capacity: fraction of non-zero mask entries, Σ nonzero / Σ numel over the parameters of "
               "each group, for each expert (dots) and its mean over experts (bars). Layer types from timm ViT "
               "names: patch/pos embed = patch_embed, pos_embed, cls_token; Q, K, V = the thirds of the fused qkv "
               "output dimension; attn out = attn.proj; attn norm = norm1; MLP in/out = mlp.fc1/fc2; MLP norm = "
               "norm2; other = layer scales, final norm, head. Depth: transformer blocks only.")
    return save_figure(fig, out_dir, name, caption)


def plot_overlap(mask_overlap: pd.DataFrame, out_dir: Path, name: str = "mask_overlap") -> FigureResult:
    """Heatmap of the Jaccard index between experts' non-zero mask sets."""
    if mask_overlap.empty:
        raise NoData("No mask overlap counts (mask_overlap is empty).")
    experts, jac = jaccard_from_counts(mask_overlap)
    off_diag = ~np.eye(len(experts), dtype=bool)
    off = jac[off_diag]
    top = float(np.nanmax(off)) if off.size and not np.all(np.isnan(off)) else 1.0
    fig, (ax,) = new_figure(width=4.6, height=4.0)
    image = ax.imshow(np.where(off_diag, jac, np.nan), vmin=0, vmax=top or 1.0, cmap="viridis")
    ticks = np.arange(len(experts))
    ax.set_xticks(ticks, [str(e) for e in experts])
    ax.set_yticks(ticks, [str(e) for e in experts])
    for i in ticks:
        for j in ticks:
            if i != j and not np.isnan(jac[i, j]):
                ax.text(j, i, f"{jac[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if jac[i, j] < 0.5 * top else "black")
    ax.set(xlabel="expert", ylabel="expert", title="Mask overlap (Jaccard)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    has_off = off.size and not np.all(np.isnan(off))
    summary = f" Off-diagonal mean {np.nanmean(off):.3f}, max {top:.3f}." if has_off else ""
    caption = ("Mask overlap between experts: Jaccard index |A∩B| / |A∪B| of the sets of non-zero mask entries "
               "over all masked parameters, computed from counts of intersections (|A∩B|, |A|, |B| summed over "
               "layers: J = n_ab / (n_a + n_b − n_ab)). The diagonal (J = 1) is left blank and the colour scale "
               "runs from 0 to the largest off-diagonal value; a blank off-diagonal cell means both masks are "
               "empty." + summary)
    return save_figure(fig, out_dir, name, caption)


def plot_dendrogram(expert_scores: pd.DataFrame, out_dir: Path, name: str = "task_dendrogram") -> FigureResult:
    """Dendrogram of sources clustered by their mean router weights α."""
    if expert_scores.empty:
        raise NoData("No expert scores (expert_scores is empty).")
    alpha = source_alpha(expert_scores)
    if len(alpha) < 2:
        raise NoData(f"The dendrogram needs at least 2 sources with expert scores, got {len(alpha)}.")
    linkage = task_linkage(alpha)
    fig, (ax,) = new_figure(width=max(4.0, 0.45 * len(alpha)), height=3.6)
    tree = hierarchy.dendrogram(linkage, labels=list(alpha.index), ax=ax, leaf_rotation=60, color_threshold=0)
    domains = expert_scores.drop_duplicates("source").set_index("source")["domain"].astype(str).to_dict()
    for tick in ax.get_xticklabels():
        tick.set_color(DOMAIN_COLOURS.get(domains.get(tick.get_text(), ""), "black"))
        tick.set_fontsize(8)
    ax.set(ylabel="cosine distance (average linkage)", title="Tasks clustered by expert scores α")
    caption = ("Task dendrogram: for each source, α = the mean over its episodes of the router's normalised "
               f"expert weights ({alpha.shape[1]} experts); sources are clustered by hierarchical clustering "
               "(scipy) with cosine distance 1 − cos(α_s, α_t) and average linkage. Leaf labels: blue = ID, "
               f"red = OOD. Leaf order: {', '.join(tree['ivl'])}.")
    return save_figure(fig, out_dir, name, caption)
