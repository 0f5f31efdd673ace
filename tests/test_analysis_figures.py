from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis_fixtures import write_run

from analysis import figures as figs
from analysis.experts import mask_stats_from_masks, overlap_counts_from_masks
from analysis.figures._base import has_data
from analysis.load import load_manifests, load_runs


def _check(result: figs.FigureResult) -> None:
    assert result.png.stat().st_size > 0 and result.svg.stat().st_size > 0
    assert result.svg.read_text().lstrip().startswith("<?xml")
    visible = [ax for ax in result.figure.axes if ax.axison]
    assert visible and all(has_data(ax) for ax in visible)
    assert result.caption


@pytest.fixture()
def sweep(tmp_path: Path) -> tuple[pd.DataFrame, dict]:
    runs = []
    for tau, id_acc, ood_acc in ((0.5, 0.86, 0.66), (0.9, 0.85, 0.68), (0.99, 0.83, 0.69)):
        acc = {"noto": [id_acc - 0.02, id_acc + 0.02], "omni": [id_acc, id_acc],
               "digits": [ood_acc - 0.01, ood_acc + 0.01]}
        runs.append(write_run(tmp_path / "runs", f"smat-{tau}", "smat", acc, learner_cfg={"sparsity": tau},
                              sparsity=tau))
    return load_runs(runs), load_manifests(runs)


def test_sweep_summary_and_tradeoff_figure(sweep: tuple[pd.DataFrame, dict], tmp_path: Path) -> None:
    frame, manifests = sweep
    assert figs.swept_key(manifests) == "learner.sparsity"
    summary = figs.sweep_summary(frame, manifests)
    assert summary["value"].tolist() == [0.5, 0.9, 0.99]
    first = summary.iloc[0]
    assert first["id_mean"] == pytest.approx(86.0) and first["ood_mean"] == pytest.approx(66.0)
    # ID half-width = 1.96·sqrt(var_noto + var_omni)/2 with var_noto = 0.02²/2, var_omni = 0
    assert first["id_ci95"] == pytest.approx(100 * 1.96 * np.sqrt(0.02**2 / 2) / 2)
    assert first["sparsity"] == pytest.approx(0.5)
    result = figs.plot_sparsity_tradeoff(summary, tmp_path / "fig", "learner.sparsity")
    _check(result)
    assert len(result.figure.axes) == 3


def test_sweep_needs_a_swept_key(tmp_path: Path) -> None:
    runs = [write_run(tmp_path, f"r{i}", "smat", {"noto": [0.5]}) for i in range(2)]
    with pytest.raises(figs.NoData, match="Cannot tell"):
        figs.swept_key(load_manifests(runs))


def test_alignment_curves(tmp_path: Path) -> None:
    rows = [{"tasks_seen": t, "sparsity": s, "param_group": g, "alignment": a / (1 + t / 1000)}
            for t in (1000, 2000, 3000) for s, a in ((0.2, 0.01), (0.9, 0.04)) for g in ("delta", "expert_m")]
    result = figs.plot_alignment(pd.DataFrame(rows), tmp_path)
    _check(result)
    assert len(result.figure.axes) == 2 and len(result.figure.axes[0].lines) == 2 + 1  # 2 levels + zero line
    assert "mean pairwise cosine similarity" in result.caption
    with pytest.raises(figs.NoData):
        figs.plot_alignment(pd.DataFrame(columns=["tasks_seen", "param_group", "alignment"]), tmp_path)


def _masks() -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    names = {"pos_embed": (4, 8), "blocks.0.attn.qkv.weight": (24, 8), "blocks.0.attn.proj.weight": (8, 8),
             "blocks.1.mlp.fc1.weight": (16, 8), "blocks.1.norm2.weight": (8,)}
    return {e: {n: rng.random(shape) < 0.1 * (e + 1) for n, shape in names.items()} for e in range(3)}


def test_capacity_and_overlap_figures(tmp_path: Path) -> None:
    masks = _masks()
    capacity = figs.plot_capacity(mask_stats_from_masks(masks), tmp_path)
    _check(capacity)
    overlap = figs.plot_overlap(overlap_counts_from_masks(masks), tmp_path)
    _check(overlap)
    assert overlap.figure.axes[0].images[0].get_array().shape == (3, 3)
    assert "counts of intersections" in overlap.caption
    with pytest.raises(figs.NoData):
        figs.plot_capacity(mask_stats_from_masks({}), tmp_path)


def test_dendrogram_figure(tmp_path: Path) -> None:
    alpha = {"noto": [0.7, 0.3], "omni": [0.6, 0.4], "digits": [0.1, 0.9]}
    scores = pd.DataFrame([{"episode_id": "e", "source": s, "domain": "ood" if s == "digits" else "id",
                            "expert": m, "alpha": v} for s, vec in alpha.items() for m, v in enumerate(vec)])
    result = figs.plot_dendrogram(scores, tmp_path)
    _check(result)
    assert "cosine" in result.caption and "average linkage" in result.caption
    with pytest.raises(figs.NoData, match="at least 2 sources"):
        figs.plot_dendrogram(scores[scores["source"] == "noto"], tmp_path)


def test_learning_curves_and_speedup(tmp_path: Path) -> None:
    pmf = pd.DataFrame({"tasks": [1000, 2000, 3000, 4000], "val_id": [0.5, 0.6, 0.7, 0.8],
                        "val_ood": [0.4, 0.45, 0.5, 0.5]})
    smat = pd.DataFrame({"tasks": [1000, 2000, 3000, 4000], "val_id": [0.6, 0.8, 0.85, 0.9],
                         "val_ood": [0.5, 0.55, 0.6, 0.6]})
    noise = pd.DataFrame({"update": [1], "loss": [2.0]})  # a record without tasks/val keys is ignored
    curves = figs.learning_curves({"pmf": pmf, "smat": smat, "pre": noise})
    assert set(curves["label"]) == {"pmf", "smat"}
    table = figs.speedup(curves, "pmf").set_index("label")
    assert table.loc["smat", "tasks_to_target"] == 2000 and table.loc["pmf", "tasks_to_target"] == 4000
    assert table.loc["smat", "speedup"] == pytest.approx(2.0)
    assert table.loc["smat", "fewer_tasks"] == pytest.approx(0.5)
    result = figs.plot_learning_curves(curves, tmp_path, baseline="pmf")
    _check(result)
    assert "smat: 2000 tasks" in result.caption
    with pytest.raises(figs.NoData):
        figs.plot_learning_curves(figs.learning_curves({"pre": noise}), tmp_path)
