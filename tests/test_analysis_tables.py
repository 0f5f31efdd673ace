from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from test_analysis_fixtures import write_run

from analysis.compare import breakdown, paired_comparison
from analysis.load import load_runs, run_labels
from analysis.render import to_csv, to_latex, to_markdown
from analysis.tables import results_table

A_NOTO = [0.90, 0.92, 0.94, 0.96]
B_NOTO = [0.60, 0.62, 0.64, 0.66]


@pytest.fixture()
def two_runs(tmp_path: Path) -> pd.DataFrame:
    a = write_run(tmp_path, "run-a", "smat", {"noto": A_NOTO, "omni": [0.5, 0.6, 0.7, 0.8], "digits": [0.7, 0.8]})
    b = write_run(tmp_path, "run-b", "pmf", {"noto": B_NOTO, "omni": [0.5, 0.6, 0.7, 0.8], "digits": [0.2, 0.3]},
                  pretrained=False)
    return load_runs([a, b])


def test_load_runs_joins_manifest_columns(two_runs: pd.DataFrame) -> None:
    assert set(two_runs["label"]) == {"smat", "pmf"}
    first = two_runs[two_runs["label"] == "pmf"].iloc[0]
    assert not first["pretrained"] and first["weights_source"] == "random" and first["git_sha"] == "abc123"
    assert first["preset"] == "cpu" and first["seed"] == 0


def test_labels_tell_apart_runs_of_one_learner() -> None:
    def manifest(tau: float, seed: int = 0) -> dict:
        return {"config": {"learner": {"name": "smat", "sparsity": tau}, "seed": seed, "out_dir": f"/x/{tau}"}}

    labels = run_labels({"r1": manifest(0.5), "r2": manifest(0.9), "r3": {"config": {"learner": {"name": "pmf"}}}})
    assert labels == {"r1": "smat[sparsity=0.5]", "r2": "smat[sparsity=0.9]", "r3": "pmf"}
    twins = run_labels({"r1": manifest(0.5), "r2": manifest(0.5)})
    assert twins == {"r1": "smat[r1]", "r2": "smat[r2]"}
    # only the keys needed to tell runs apart, backbone first
    runs = {f"r{i}": {"config": {"learner": {"name": "pre"}, "backbone": {"name": bb}, "data": {"image_size": size}}}
            for i, (bb, size) in enumerate((("vit_small", 84), ("vit_base", 84), ("vit_base", 224)))}
    assert run_labels(runs) == {"r0": "pre[backbone=vit_small, data.image_size=84]",
                                "r1": "pre[backbone=vit_base, data.image_size=84]",
                                "r2": "pre[backbone=vit_base, data.image_size=224]"}


def test_results_table_cells_averages_ranks(two_runs: pd.DataFrame) -> None:
    table = results_table(two_runs)
    smat, pmf = ("smat", "zero_shot", 0), ("pmf", "zero_shot", 0)
    assert table.columns == [smat, pmf]
    rows = {r.name: r for r in table.rows}
    assert [r.name for r in table.rows] == ["noto", "omni", "ID average", "digits", "OOD average", "Average rank"]
    noto = rows["noto"].cells[smat]
    assert noto.mean == pytest.approx(np.mean(A_NOTO))
    assert noto.half_width == pytest.approx(1.96 * np.std(A_NOTO) / 2)
    assert rows["noto"].bold == {smat} and rows["noto"].ranks == {smat: 1.0, pmf: 2.0}
    assert rows["omni"].bold == set() and rows["omni"].ranks == {smat: 1.5, pmf: 1.5}  # identical: tied
    assert rows["ID average"].cells[smat].mean == pytest.approx((np.mean(A_NOTO) + 0.65) / 2)
    assert rows["Average rank"].cells[smat].mean == pytest.approx((1 + 1.5 + 1) / 3)
    assert rows["Average rank"].bold == {smat}
    assert table.not_pretrained == {"pmf"}


def test_all_equal_rows_have_no_bold(tmp_path: Path) -> None:
    a = write_run(tmp_path, "a", "smat", {"noto": [0.9, 0.8]})
    b = write_run(tmp_path, "b", "pmf", {"noto": [0.9, 0.8]})
    rows = {r.name: r for r in results_table(load_runs([a, b])).rows}
    assert rows["noto"].bold == set() and rows["Average rank"].bold == set()
    assert rows["Average rank"].cells[("smat", "zero_shot", 0)].mean == 1.5


def test_average_needs_every_source(tmp_path: Path) -> None:
    a = write_run(tmp_path, "a", "smat", {"noto": [0.9, 0.8], "omni": [0.5, 0.6]})
    b = write_run(tmp_path, "b", "pmf", {"noto": [0.9, 0.8]})
    rows = {r.name: r for r in results_table(load_runs([a, b])).rows}
    assert ("pmf", "zero_shot", 0) not in rows["ID average"].cells
    assert ("pmf", "zero_shot", 0) not in rows["Average rank"].cells


def test_renderers(two_runs: pd.DataFrame) -> None:
    table = results_table(two_runs)
    md = to_markdown(table)
    assert "| Source | smat · zero_shot | pmf · zero_shot † |" in md
    assert f"**{100 * np.mean(A_NOTO):.2f} ± " in md and "† backbone NOT pretrained" in md
    tex = to_latex(table)
    assert r"\textbf{93.00 $\pm$" in tex and r"\toprule" in tex and "$^\\dagger$" in tex
    csv = pd.read_csv(pd.io.common.StringIO(to_csv(table)))
    cell = csv[(csv["row"] == "noto") & (csv["label"] == "smat")].iloc[0]
    assert cell["mean"] == pytest.approx(93.0) and bool(cell["bold"]) and cell["rank"] == 1.0
    assert not csv[csv["label"] == "pmf"]["pretrained"].any()


def test_paired_comparison_matches_scipy(two_runs: pd.DataFrame) -> None:
    paired = paired_comparison(two_runs, "smat", "pmf")
    noto = paired[(paired["level"] == "source") & (paired["name"] == "noto")].iloc[0]
    a, b = 100 * np.array(A_NOTO), 100 * np.array(B_NOTO)
    assert noto["n"] == 4 and noto["diff"] == pytest.approx(30.0)
    # constant differences: t undefined-infinite; check the pooled ID row against scipy instead
    id_row = paired[paired["name"] == "ID (pooled)"].iloc[0]
    a_id = np.concatenate([a, 100 * np.array([0.5, 0.6, 0.7, 0.8])])
    b_id = np.concatenate([b, 100 * np.array([0.5, 0.6, 0.7, 0.8])])
    assert id_row["n"] == 8
    assert id_row["p_t"] == pytest.approx(sps.ttest_rel(a_id, b_id).pvalue)
    assert id_row["p_wilcoxon"] == pytest.approx(sps.wilcoxon(a_id - b_id).pvalue)
    assert paired[paired["level"] == "all"]["n"].iloc[0] == 10


def test_paired_comparison_only_uses_shared_episodes(tmp_path: Path) -> None:
    a = write_run(tmp_path, "a", "smat", {"noto": [0.9, 0.8, 0.7]})
    b = write_run(tmp_path, "b", "pmf", {"noto": [0.5, 0.4]})
    paired = paired_comparison(load_runs([a, b]), "smat", "pmf")
    assert paired.loc[paired["level"] == "source", "n"].tolist() == [2]
    assert paired.loc[paired["level"] == "source", "diff"].iloc[0] == pytest.approx(40.0)


def test_breakdowns(two_runs: pd.DataFrame) -> None:
    by_way = breakdown(two_runs, "way")
    smat = by_way[by_way["label"] == "smat"]
    assert smat["way"].tolist() == ["5", "6", "7"]  # fixture ways: 5 + i % 3
    # way 5 = episode indices 0 and 3: noto 0.90, 0.96; omni 0.5, 0.8; digits 0.7
    assert smat.iloc[0]["accuracy"] == pytest.approx(100 * np.mean([0.90, 0.96, 0.5, 0.8, 0.7]))
    assert smat.iloc[0]["episodes"] == 5
    shots = breakdown(two_runs, "shots_per_class")
    assert set(shots["shots_per_class"]) <= {"(2, 5]", "(5, 10]"}
    imbalance = breakdown(two_runs.drop(columns="imbalance", errors="ignore"), "imbalance", domain="ood")
    # Rows without the measured column: (way 5, shots 25) divisible -> undetermined; (6, 26) -> must be imbalanced
    assert imbalance[imbalance["label"] == "smat"]["imbalance"].tolist() == ["imbalanced (unmeasured)", "undetermined"]
    with pytest.raises(ValueError, match="Unknown breakdown"):
        breakdown(two_runs, "colour")


def test_imbalance_breakdown_uses_the_measured_class_shares() -> None:
    frame = pd.DataFrame({"label": "x", "mode": "zero_shot", "steps": 0, "way": 2, "shots": [10, 10, 10, 11],
                          "imbalance": [0.0, 0.2, 0.6, np.nan], "accuracy": [0.9, 0.8, 0.5, 0.7], "domain": "id"})
    out = breakdown(frame, "imbalance").set_index("imbalance")
    assert out.loc["balanced", "accuracy"] == pytest.approx(90.0)
    assert out.loc["(0.1, 0.2]", "accuracy"] == pytest.approx(80.0)
    assert out.loc["(0.2, 1]", "accuracy"] == pytest.approx(50.0)
    assert out.loc["imbalanced (unmeasured)", "episodes"] == 1


def test_engine_records_the_support_imbalance() -> None:
    import torch

    from episodes.episode import Episode, Split
    from metabench.backbones import create_backbone
    from metabench.engine import EvalContext, evaluate
    from metabench.finetuning import EvalProtocol
    from metabench.learners import create_learner

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (9, 3, 32, 32), generator=g, dtype=torch.uint8)
    support_y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1][:7])  # 5 + 2 of 7: shares 5/7, 2/7
    ep = Episode(x[:7], support_y, x[7:], torch.tensor([0, 1]), "s", Split.TEST, "e0")
    learner = create_learner("pre", create_backbone("vit_test"))
    (row,) = evaluate(learner, [ep], EvalContext("r", "pre", "vit_test", {}), protocols=[EvalProtocol("zero_shot", 0)],
                      device=torch.device("cpu"), progress=False)
    assert row.imbalance == pytest.approx(3 / 7)


def test_support_size_buckets_are_ordered() -> None:
    frame = pd.DataFrame({"label": "x", "mode": "zero_shot", "steps": 0, "way": 5, "shots": [3, 7, 300, 60],
                          "accuracy": [0.1, 0.2, 0.3, 0.4], "domain": "id"})
    out = breakdown(frame, "support_size")
    assert out["support_size"].tolist() == ["(0, 5]", "(5, 10]", "(50, 100]", ">250"]
    assert not math.isnan(out["accuracy"].iloc[0])
