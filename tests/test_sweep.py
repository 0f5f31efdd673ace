"""``metabench sweep``: a grid of settings, each a run, one report; checked up front; resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metabench.cli import main
from metabench.config import ConfigError
from metabench.sweep import SweepAxis, parse_axes, settings

FAST = ["--learner", "smat", "--backbone", "vit_test", "--quiet", "data.image_size=32", "eval.episodes=2",
        "train.episodes=2", "learner.n_experts=2", "data.eval_sources=[noto,digits]"]


def test_axes_and_grid() -> None:
    axes = parse_axes(["learner.sparsity=0.5, 0.9", "learner.n_experts=2,4"])
    assert axes == [SweepAxis("learner.sparsity", ("0.5", "0.9")), SweepAxis("learner.n_experts", ("2", "4"))]
    assert settings(axes) == [["learner.sparsity=0.5", "learner.n_experts=2"], ["learner.sparsity=0.5", "learner.n_experts=4"],
                              ["learner.sparsity=0.9", "learner.n_experts=2"], ["learner.sparsity=0.9", "learner.n_experts=4"]]
    for bad, message in ((["learner.sparsity"], "is not KEY=V1,V2"), (["a=1", "a=2"], "given twice"),
                         (["a=1", "b=1", "c=1"], "one or two"), (["a="], "is not KEY=V1,V2")):
        with pytest.raises(ConfigError, match=message):
            parse_axes(bad)


@pytest.mark.slow  # several end-to-end runs
def test_sweep_runs_every_setting_reports_and_resumes(tmp_path: Path, capsys) -> None:
    argv = ["sweep", *FAST, "--out", str(tmp_path), "--name", "tau", "--over", "learner.sparsity=0.5,0.9"]
    assert main(argv) == 0, capsys.readouterr().err
    sweep = tmp_path / "tau"
    runs = sorted(p for p in sweep.iterdir() if p.name.startswith("learner."))
    assert [p.name for p in runs] == ["learner.sparsity=0.5", "learner.sparsity=0.9"]
    for run, tau in zip(runs, (0.5, 0.9)):
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "finished" and manifest["config"]["learner"]["sparsity"] == tau
    state = json.loads((sweep / "sweep.json").read_text())
    assert state["axes"] == {"learner.sparsity": ["0.5", "0.9"]}
    assert {s["status"] for s in state["settings"].values()} == {"finished"}
    figures = {p.name for p in (sweep / "report" / "figures").iterdir()}
    assert "sparsity_tradeoff_smat.png" in figures and (sweep / "report" / "sweep_smat.csv").is_file()

    # Again with the same name: the finished run is kept, the unfinished one is set aside and redone.
    kept = (runs[0] / "episodes.parquet").stat().st_mtime_ns
    manifest = json.loads((runs[1] / "manifest.json").read_text())
    (runs[1] / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    assert main(argv) == 0, capsys.readouterr().err
    assert (runs[0] / "episodes.parquet").stat().st_mtime_ns == kept
    assert json.loads((runs[1] / "manifest.json").read_text())["status"] == "finished"
    assert len([p for p in sweep.iterdir() if ".incomplete-" in p.name]) == 1


def test_a_bad_setting_stops_the_sweep_before_any_run(tmp_path: Path, capsys) -> None:
    code = main(["sweep", *FAST, "--out", str(tmp_path), "--over", "learner.sparsity=0.5,2.0"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("metabench: error: Sweep setting learner.sparsity=2.0:") and "\n" not in err
    assert not any(tmp_path.iterdir())
