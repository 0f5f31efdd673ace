from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis_fixtures import write_run

from analysis.experts import (
    block_depth,
    capacity,
    dendrogram_order,
    jaccard_from_counts,
    jaccard_from_masks,
    layer_type,
    mask_stats_from_masks,
    overlap_counts_from_masks,
    source_alpha,
    task_linkage,
)
from analysis.load import ProbeMissing, load_probes
from metabench.results import ResultsError


@pytest.mark.parametrize(("name", "kind", "depth"), [
    ("model.patch_embed.proj.weight", "embed", -1),
    ("pos_embed", "embed", -1),
    ("backbone.cls_token", "embed", -1),
    ("model.blocks.3.attn.qkv.weight[q]", "q", 3),
    ("model.blocks.3.attn.qkv.bias[k]", "k", 3),
    ("blocks.11.attn.qkv.weight[v]", "v", 11),
    ("model.blocks.3.attn.qkv.weight", "qkv", 3),
    ("blocks.0.attn.proj.weight", "attn_out", 0),
    ("blocks.0.norm1.bias", "attn_norm", 0),
    ("blocks.2.mlp.fc1.weight", "mlp_in", 2),
    ("blocks.2.mlp.fc2.bias", "mlp_out", 2),
    ("blocks.2.norm2.weight", "mlp_norm", 2),
    ("blocks.2.ls1.gamma", "other", 2),
    ("norm.weight", "other", -1),
])
def test_layer_type_and_depth_from_timm_names(name: str, kind: str, depth: int) -> None:
    assert layer_type(name) == kind
    assert block_depth(name) == depth


def _vit_masks() -> dict[int, dict[str, np.ndarray]]:
    """Two experts of a 1-block ViT with dim 2: qkv weight (6, 2) whose q rows are all kept by expert 0."""
    qkv0 = np.zeros((6, 2), bool)
    qkv0[0:2] = True  # q third fully kept, k and v none
    qkv1 = np.zeros((6, 2), bool)
    qkv1[4, 0] = True  # one v entry
    fc1 = np.array([[1, 0], [0, 0]], bool)
    return {0: {"blocks.0.attn.qkv.weight": qkv0, "blocks.0.mlp.fc1.weight": fc1, "pos_embed": np.ones(4, bool)},
            1: {"blocks.0.attn.qkv.weight": qkv1, "blocks.0.mlp.fc1.weight": fc1, "pos_embed": np.zeros(4, bool)}}


def test_mask_stats_split_qkv_into_thirds_of_the_output_dim() -> None:
    stats = mask_stats_from_masks(_vit_masks())
    e0 = stats[stats["expert"] == 0].set_index("layer_name")
    assert e0.loc["blocks.0.attn.qkv.weight[q]", ["layer_type", "numel", "nonzero", "depth"]].tolist() == ["q", 4, 4, 0]
    assert e0.loc["blocks.0.attn.qkv.weight[k]", "nonzero"] == 0
    assert e0.loc["pos_embed", "depth"] == -1
    with pytest.raises(ValueError, match="divisible by 3"):
        mask_stats_from_masks({0: {"blocks.0.attn.qkv.weight": np.ones((4, 2))}})


def test_capacity_by_layer_type_and_depth() -> None:
    stats = mask_stats_from_masks(_vit_masks())
    by_type = capacity(stats, "layer_type")
    e0 = by_type[by_type["expert"] == 0].set_index("layer_type")["fraction"]
    assert list(e0.index) == ["embed", "q", "k", "v", "mlp_in"]  # LAYER_TYPES order
    assert e0.to_dict() == {"embed": 1.0, "q": 1.0, "k": 0.0, "v": 0.0, "mlp_in": 0.25}
    by_depth = capacity(stats, "depth")
    assert by_depth.set_index("expert").loc[0, "fraction"] == pytest.approx((4 + 1) / (12 + 4))
    # a probe's unsplit qkv row with an empty layer_type is classified from its name
    raw = pd.DataFrame({"expert": [0], "layer_name": ["blocks.1.attn.qkv.weight"], "layer_type": [""],
                        "depth": [1], "numel": [10], "nonzero": [5]})
    assert capacity(raw)["layer_type"].tolist() == ["qkv"]


def test_jaccard_from_masks_and_from_counts_agree() -> None:
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], bool)
    jac = jaccard_from_masks(masks)
    assert jac[0, 1] == pytest.approx(1 / 3) and jac[0, 0] == 1.0
    assert np.isnan(jac[2, 2]) and jac[0, 2] == 0.0
    counts = overlap_counts_from_masks({e: {"w": masks[e][:2], "b": masks[e][2:]} for e in range(3)})
    experts, from_counts = jaccard_from_counts(counts)
    assert experts == [0, 1, 2]
    np.testing.assert_allclose(from_counts, jac, equal_nan=True)


def test_jaccard_from_counts_sums_layers_and_fills_missing_diagonal() -> None:
    per_layer = pd.DataFrame({"expert_a": [0, 0], "expert_b": [1, 1], "layer_name": ["x", "y"],
                              "intersection": [1, 2], "nonzero_a": [2, 3], "nonzero_b": [1, 4]})
    experts, jac = jaccard_from_counts(per_layer)
    assert jac[0, 1] == jac[1, 0] == pytest.approx(3 / (5 + 5 - 3))
    assert jac[0, 0] == jac[1, 1] == 1.0


def test_dendrogram_order_groups_similar_sources() -> None:
    # sources a1/a2 prefer expert 0, b1/b2 expert 1, c is uniform; cosine + average linkage.
    alpha = {"a1": [0.9, 0.1, 0.0], "b1": [0.1, 0.9, 0.0], "a2": [0.8, 0.2, 0.0], "b2": [0.0, 0.95, 0.05],
             "c": [0.34, 0.33, 0.33]}
    scores = pd.DataFrame([{"episode_id": "e", "source": s, "domain": "id", "expert": m, "alpha": v}
                           for s, vec in alpha.items() for m, v in enumerate(vec)])
    table = source_alpha(scores)
    assert list(table.index) == list(alpha)
    linkage = task_linkage(table)
    order = dendrogram_order(linkage, list(table.index))
    assert abs(order.index("a1") - order.index("a2")) == 1
    assert abs(order.index("b1") - order.index("b2")) == 1
    # the first merge joins the closest pair (a1, a2) or (b1, b2)
    first = {table.index[int(i)] for i in linkage[0, :2]}
    assert first in ({"a1", "a2"}, {"b1", "b2"})
    assert linkage[-1, 2] == pytest.approx(max(linkage[:, 2]))


def test_load_probes_schema_and_masks_fallback(tmp_path: Path) -> None:
    masks = {f"e{e}/{name}": m for e, layers in _vit_masks().items() for name, m in layers.items()}
    run = write_run(tmp_path, "r", "smat", {"noto": [0.5]}, masks=masks,
                    probes={"expert_scores": pd.DataFrame({"episode_id": ["e0"], "source": ["noto"]})})
    stats = load_probes(run, "mask_stats")
    assert {"blocks.0.attn.qkv.weight[q]", "pos_embed"} <= set(stats["layer_name"])
    assert load_probes(run, "mask_overlap.parquet")["intersection"].sum() > 0
    with pytest.raises(ResultsError, match="lacks column"):
        load_probes(run, "expert_scores")
    with pytest.raises(ProbeMissing):
        load_probes(run, "grad_alignment")
    with pytest.raises(ValueError, match="Unknown probe"):
        load_probes(run, "nope")
