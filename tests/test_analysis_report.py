from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from test_analysis_fixtures import write_run

from analysis.experts import mask_stats_from_masks, overlap_counts_from_masks
from analysis.report import write_report

ACC = {"noto": [0.8, 0.85, 0.9], "omni": [0.6, 0.65, 0.7], "digits": [0.5, 0.55, 0.6], "mnist": [0.7, 0.75, 0.8]}


def _smat_probes() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(1)
    masks = {e: {"pos_embed": rng.random(8) < 0.3, "blocks.0.attn.qkv.weight": rng.random((6, 4)) < 0.2,
                 "blocks.0.mlp.fc1.weight": rng.random((8, 4)) < 0.1} for e in range(4)}
    scores = pd.DataFrame([{"episode_id": f"e{i}", "source": s, "domain": d, "expert": m, "alpha": a}
                           for s, d in (("noto", "id"), ("omni", "id"), ("digits", "ood"), ("mnist", "ood"))
                           for i in range(2) for m, a in enumerate(rng.dirichlet(np.ones(4)))])
    alignment = pd.DataFrame([{"tasks_seen": t, "sparsity": 0.9, "param_group": g, "alignment": 0.04 / t}
                              for t in (1, 2, 3) for g in ("delta", "expert_m")])
    return {"mask_stats": mask_stats_from_masks(masks), "mask_overlap": overlap_counts_from_masks(masks),
            "expert_scores": scores, "grad_alignment": alignment}


def _runs(root: Path) -> list[Path]:
    pre = write_run(root, "pre-run", "pre", ACC, pretrained=False, modes=(("zero_shot", 0), ("full", 10)))
    smat = write_run(root, "smat-run", "smat", {s: [a + 0.05 for a in v] for s, v in ACC.items()},
                     probes=_smat_probes(), modes=(("zero_shot", 0), ("full", 10)),
                     train_log=[{"update": 1, "tasks": 10, "loss": 1.0, "val_id": 0.6, "val_ood": 0.5},
                                {"update": 2, "tasks": 20, "loss": 0.8, "val_id": 0.8, "val_ood": 0.6}])
    return [pre, smat]


def test_report_html_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "report"
    path = write_report(_runs(tmp_path / "runs"), out)
    assert path == out / "report.html"
    page = path.read_text()
    assert "NOT PRETRAINED" in page and "class='banner'" in page
    assert "pre (pre-run) used a randomly initialised backbone" in page
    # smat: alignment, capacity, overlap, dendrogram, learning curves; the pre run has no probes
    assert page.count("data:image/png;base64,") == 5
    assert "Skipped expert capacity (pre)" not in page and "<b>learning curves.</b>" in page
    for needed in ("Average rank", "ID average", "OOD average", "Paired comparisons", "by way", "abc123",
                   "weights source", "config.yaml", "Skipped sparsity trade-off"):
        assert needed in page, needed
    md = (out / "report.md").read_text()
    links = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
    assert links and all((out / link).is_file() for link in links)
    assert "† backbone NOT pretrained" in md and "**NOT PRETRAINED**" in md
    for name in ("results.md", "results.tex", "results.csv", "paired.csv", "breakdown_way.csv"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.rglob("*.tmp"))


def test_report_skips_figures_without_data(tmp_path: Path) -> None:
    run = write_run(tmp_path / "runs", "only-pre", "pre", ACC)
    page = write_report([run], tmp_path / "out").read_text()
    assert "data:image/png" not in page
    for skipped in ("expert capacity", "mask overlap", "task dendrogram", "meta-gradient alignment",
                    "learning curves", "sparsity trade-off"):
        assert f"Skipped {skipped}" in page, skipped
    assert "NOT PRETRAINED" not in page.split("<h2>Runs and provenance</h2>")[0].replace("NOT PRETRAINED)", "")
    assert not list((tmp_path / "out").glob("figures/*.png"))


def test_report_learning_curves_with_baseline(tmp_path: Path) -> None:
    log = [{"tasks": t, "val_id": v, "val_ood": 0.5} for t, v in ((10, 0.5), (20, 0.7))]
    a = write_run(tmp_path / "runs", "a", "pmf", ACC, train_log=log)
    b = write_run(tmp_path / "runs", "b", "smat", ACC, train_log=[{"tasks": 10, "val_id": 0.75, "val_ood": 0.6}])
    out = tmp_path / "out"
    page = write_report([a, b], out, baseline="pmf").read_text()
    assert "smat: 10 tasks (2.00× the baseline" in page
    speed = pd.read_csv(out / "speedup.csv").set_index("label")
    assert speed.loc["smat", "speedup"] == 2.0


def test_analysis_never_imports_torch(tmp_path: Path) -> None:
    runs = _runs(tmp_path / "runs")
    code = f"""
import sys, json
import analysis
from analysis.load import load_runs
from analysis.tables import results_table
from analysis.render import to_markdown
to_markdown(results_table(load_runs({json.dumps([str(r) for r in runs])})))
from analysis.report import write_report
write_report({json.dumps([str(r) for r in runs])}, {json.dumps(str(tmp_path / 'out'))})
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_report_notes_a_malformed_probe_file(tmp_path: Path) -> None:
    bad = pd.DataFrame({"expert": [0], "layer_name": ["pos_embed"]})  # lacks numel / nonzero ...
    run = write_run(tmp_path / "runs", "smat", "smat", ACC, probes={"mask_stats": bad})
    page = write_report([run], tmp_path / "out").read_text()
    assert "Skipped expert capacity (smat): unreadable input:" in page and "lacks column(s)" in page
