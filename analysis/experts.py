"""Expert analyses as numbers: mask capacity by layer type and depth, mask overlap, task clustering by α.

Layer types come from timm ViT parameter names (any prefix such as ``model.`` or ``backbone.`` is ignored):

=========== ======================================================================================
embed       ``patch_embed.*``, ``pos_embed``, ``cls_token``, ``reg_token`` (patch and position embedding)
q, k, v     the first, second and last third of the *output* dimension (dim 0) of a fused
            ``attn.qkv.weight`` / ``attn.qkv.bias`` (timm orders the fused projection q, k, v), written as
            ``...attn.qkv.weight[q]`` by ``mask_stats_from_masks``; also separate ``attn.q/k/v`` layers
qkv         a fused qkv parameter that was *not* split (a probe that counted it whole)
attn_out    ``attn.proj.*`` (attention output projection)
attn_norm   ``norm1.*`` (pre-attention LayerNorm) and ``attn.q_norm`` / ``attn.k_norm``
mlp_in      ``mlp.fc1.*``;  mlp_out: ``mlp.fc2.*``;  mlp_norm: ``norm2.*`` (pre-MLP LayerNorm)
other       everything else: layer scales ``ls1/ls2``, final ``norm``, ``fc_norm``, ``head``
=========== ======================================================================================

Depth is the block index ``i`` of ``blocks.i.`` (as in the names, counted from 0); -1 outside blocks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy.cluster import hierarchy
from scipy.spatial.distance import pdist

__all__ = [
    "LAYER_TYPES",
    "LAYER_TYPE_NAMES",
    "block_depth",
    "capacity",
    "jaccard_from_counts",
    "jaccard_from_masks",
    "layer_type",
    "mask_stats_from_masks",
    "overlap_counts_from_masks",
    "source_alpha",
    "task_linkage",
    "dendrogram_order",
]

LAYER_TYPES = ("embed", "q", "k", "v", "qkv", "attn_out", "attn_norm", "mlp_in", "mlp_out", "mlp_norm", "other")
LAYER_TYPE_NAMES = {"embed": "patch/pos embed", "q": "Q", "k": "K", "v": "V", "qkv": "QKV (unsplit)",
                    "attn_out": "attn out", "attn_norm": "attn norm", "mlp_in": "MLP in", "mlp_out": "MLP out",
                    "mlp_norm": "MLP norm", "other": "other"}
_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(patch_embed\.|pos_embed$|cls_token$|reg_token$)", "embed"),
    (r"attn\.qkv\.(weight|bias)\[([qkv])\]$", r"\2"),
    (r"attn\.qkv\.", "qkv"),
    (r"attn\.([qkv])(_proj)?\.", r"\1"),
    (r"attn\.proj\.", "attn_out"),
    (r"(norm1\.|attn\.[qk]_norm\.)", "attn_norm"),
    (r"mlp\.fc1\.", "mlp_in"),
    (r"mlp\.fc2\.", "mlp_out"),
    (r"norm2\.", "mlp_norm"),
)
_QKV = re.compile(r"attn\.qkv\.(weight|bias)$")
_BLOCK = re.compile(r"(^|\.)blocks\.(\d+)\.")


def layer_type(name: str) -> str:
    """The layer type of a parameter name (table in the module docstring)."""
    for pattern, kind in _RULES:
        match = re.search(pattern, name)
        if match:
            return match.expand(kind)
    return "other"


def block_depth(name: str) -> int:
    """Block index from ``blocks.<i>.`` in the name; -1 for parameters outside the blocks."""
    match = _BLOCK.search(name)
    return int(match.group(2)) if match else -1


def _split_qkv(name: str, mask: np.ndarray) -> list[tuple[str, np.ndarray]]:
    if not _QKV.search(name):
        return [(name, mask)]
    if mask.shape[0] % 3:
        raise ValueError(f"{name}: a fused qkv parameter needs an output dim divisible by 3, got shape {mask.shape}.")
    return [(f"{name}[{part}]", chunk) for part, chunk in zip("qkv", np.split(mask, 3, axis=0))]


def mask_stats_from_masks(masks: Mapping[int, Mapping[str, np.ndarray]]) -> pd.DataFrame:
    """The ``mask_stats`` probe frame from raw masks (expert -> layer name -> array; non-zero = kept)."""
    rows = []
    for expert, layers in masks.items():
        for name, mask in layers.items():
            for part_name, part in _split_qkv(name, np.asarray(mask)):
                rows.append({"expert": int(expert), "layer_name": part_name, "layer_type": layer_type(part_name),
                             "depth": block_depth(part_name), "numel": int(part.size),
                             "nonzero": int(np.count_nonzero(part))})
    return pd.DataFrame(rows, columns=["expert", "layer_name", "layer_type", "depth", "numel", "nonzero"])


def capacity(mask_stats: pd.DataFrame, by: str = "layer_type") -> pd.DataFrame:
    """Fraction of non-zero mask entries, Σ nonzero / Σ numel, per expert and ``by`` (layer_type or depth).

    A missing or empty ``layer_type`` is derived from ``layer_name``; depth -1 (outside blocks) is dropped
    from the by-depth view. Layer types come out in ``LAYER_TYPES`` order.
    """
    if by not in ("layer_type", "depth"):
        raise ValueError(f'capacity(by="{by}"): use "layer_type" or "depth".')
    stats = mask_stats.copy()
    derived = stats["layer_name"].map(layer_type)
    given = stats["layer_type"].astype(object) if "layer_type" in stats.columns else pd.Series(None, index=stats.index)
    stats["layer_type"] = given.where(given.notna() & (given.astype(str) != ""), derived)
    if "depth" not in stats.columns:
        stats["depth"] = stats["layer_name"].map(block_depth)
    if by == "depth":
        stats = stats[stats["depth"].astype(int) >= 0].assign(depth=lambda f: f["depth"].astype(int))
    out = stats.groupby(["expert", by], sort=False)[["nonzero", "numel"]].sum().reset_index()
    out["fraction"] = out["nonzero"] / out["numel"]
    if by == "layer_type":
        rank = {t: i for i, t in enumerate(LAYER_TYPES)}
        return out.sort_values(["expert", by], key=lambda s: s.map(rank).fillna(len(rank)) if s.name == by else s,
                               ignore_index=True)
    return out.sort_values(["expert", by], ignore_index=True)


def _intersections(masks: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """|A∩B| for every pair of rows of an (M, N) mask array; exact (float64 sums of 0/1 products)."""
    m = masks.shape[0]
    inter = np.zeros((m, m))
    for start in range(0, masks.shape[1], chunk):
        block = (masks[:, start:start + chunk] != 0).astype(np.float64)
        inter += block @ block.T
    return inter


def jaccard_from_masks(masks: np.ndarray) -> np.ndarray:
    """Jaccard index |A∩B| / |A∪B| of the non-zero sets of M flattened masks (array of shape (M, N)).

    An empty pair (both masks all zero) is NaN.
    """
    inter = _intersections(np.asarray(masks))
    return _jaccard(inter, np.diag(inter).copy())


def _jaccard(inter: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)


def overlap_counts_from_masks(masks: Mapping[int, Mapping[str, np.ndarray]]) -> pd.DataFrame:
    """The ``mask_overlap`` probe frame (pair counts summed over layers) from raw masks."""
    experts = sorted(masks)
    layers = sorted(set.intersection(*(set(masks[e]) for e in experts))) if experts else []
    if not layers:
        raise ValueError("No layer has a mask in every expert; cannot compare the experts' masks.")
    inter = _intersections(np.stack([np.concatenate([np.ravel(masks[e][n]) != 0 for n in layers]) for e in experts]))
    rows = [{"expert_a": a, "expert_b": b, "intersection": int(inter[i, j]), "nonzero_a": int(inter[i, i]),
             "nonzero_b": int(inter[j, j])} for i, a in enumerate(experts) for j, b in enumerate(experts) if i <= j]
    return pd.DataFrame(rows, columns=["expert_a", "expert_b", "intersection", "nonzero_a", "nonzero_b"])


def jaccard_from_counts(overlap: pd.DataFrame) -> tuple[list[int], np.ndarray]:
    """Experts and their Jaccard matrix from ``mask_overlap`` counts: J = n_ab / (n_a + n_b − n_ab).

    Rows with the same pair (one per layer) are summed first; the matrix is symmetric, NaN for an empty pair.
    """
    pairs = overlap.groupby(["expert_a", "expert_b"], sort=True)[["intersection", "nonzero_a", "nonzero_b"]].sum()
    experts = sorted({int(e) for pair in pairs.index for e in pair})
    index = {e: i for i, e in enumerate(experts)}
    inter = np.full((len(experts), len(experts)), np.nan)
    sizes = np.zeros(len(experts))
    for (a, b), r in pairs.iterrows():
        i, j = index[int(a)], index[int(b)]
        inter[i, j] = inter[j, i] = r["intersection"]
        sizes[i], sizes[j] = r["nonzero_a"], r["nonzero_b"]
    missing_diag = np.isnan(np.diag(inter))
    inter[missing_diag, missing_diag] = sizes[missing_diag]  # |A∩A| = |A| when the probe skipped a == b
    return experts, _jaccard(inter, sizes)


def source_alpha(expert_scores: pd.DataFrame) -> pd.DataFrame:
    """Mean router weight α per source (rows, first-appearance order) and expert (columns)."""
    table = expert_scores.pivot_table(index="source", columns="expert", values="alpha", aggfunc="mean", sort=False)
    return table.reindex(columns=sorted(table.columns))


def task_linkage(alpha: pd.DataFrame) -> np.ndarray:
    """Average-linkage hierarchical clustering of the rows of ``alpha`` under cosine distance (1 − cos)."""
    if len(alpha) < 2:
        raise ValueError(f"Clustering needs at least 2 sources with expert scores, got {len(alpha)}.")
    return hierarchy.linkage(pdist(alpha.to_numpy(dtype=float), metric="cosine"), method="average")


def dendrogram_order(linkage: np.ndarray, labels: list[str]) -> list[str]:
    """Leaf labels in the left-to-right order scipy's dendrogram draws them."""
    return list(hierarchy.dendrogram(linkage, labels=labels, no_plot=True)["ivl"])
