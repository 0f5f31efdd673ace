"""End to end through the real command line, on the tiny test ViT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from metabench.results import EPISODE_COLUMNS

pytestmark = pytest.mark.slow  # subprocesses (CLI, torchrun, kills): `pytest -m "not slow"` skips them

FAST = ["--backbone", "vit_test", "--quiet", "data.image_size=32", "eval.episodes=3"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "metabench", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    proc = _cli("run", "--learner", "pre", *FAST, "--out", str(out), "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert all(s in proc.stdout for s in ("noto", "digits", "mnist", "NOT pretrained"))
    (run,) = out.iterdir()
    return run


def test_run_writes_the_results_schema(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["seed"] == 3 and manifest["config"]["seed"] == 3
    assert manifest["backbone"]["alias"] == "vit_test" and manifest["backbone"]["pretrained"] is False
    assert manifest["versions"]["torch"]
    assert set(manifest["sources"]) == {"noto", "digits", "mnist"}
    assert "learner:" in (run_dir / "config.yaml").read_text()
    frame = pd.read_parquet(run_dir / "episodes.parquet")
    assert list(frame.columns) == EPISODE_COLUMNS
    assert len(frame) == 9 and set(frame["source"]) == {"noto", "digits", "mnist"}
    assert set(frame["domain"]) == {"id", "ood"}
    assert frame["accuracy"].between(0, 1).all() and (frame["way"] >= 5).all()


def test_eval_of_a_saved_run_is_reproducible(run_dir: Path) -> None:
    before = pd.read_parquet(run_dir / "episodes.parquet")
    proc = _cli("eval", "--run", str(run_dir), "--quiet", "eval.episodes=4")
    assert proc.returncode == 0, proc.stderr
    after = pd.read_parquet(run_dir / "episodes.parquet")
    assert len(after) == 12  # the 9 earlier episodes are evaluated again (replaced), plus one more per source
    merged = before.merge(after, on=["episode_id", "mode", "steps"], suffixes=("", "_again"))
    assert len(merged) == 9
    assert (merged["accuracy"] == merged["accuracy_again"]).all()
    assert json.loads((run_dir / "manifest.json").read_text())["evaluations"]


def test_example_plugin_learner_meta_trains(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "linear_probe_learner.py"
    proc = _cli("run", "--plugin", str(example), "--learner", "protolinear", *FAST, "--out", str(tmp_path),
                "train.episodes=4", "train.tasks_per_update=2", "train.log_every=1", "learner.dim=16")
    assert proc.returncode == 0, proc.stderr
    (run,) = tmp_path.iterdir()
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["tasks"] for r in log] == [2, 4] and all(r["loss"] > 0 for r in log)
    assert (run / "checkpoints" / "learner.safetensors").is_file()
    assert json.loads((run / "manifest.json").read_text())["learner"]["trainable_parameters"] > 0


def test_ls_lists_registries() -> None:
    for what, expected in (("learners", "pre"), ("backbones", "efficientnet_lite0"), ("sources", "noto")):
        proc = _cli("ls", what)
        assert proc.returncode == 0 and expected in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "eval.episode=3"], 'Unknown config key "eval.episode"'),
        (["run", "--learner", "smatt"], 'Unknown learner "smatt"'),
        (["run", "--backbone", "vit_smal", "eval.episodes=1"], 'Unknown backbone "vit_smal". Did you mean "vit_small"?'),
        (["run", "--backbone", "vit_test", "data.eval_sources=[notto]"], 'Unknown source "notto". Did you mean "noto"?'),
        (["eval", "--run", "/nonexistent/run"], "is not a metabench run folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    from metabench.cli import main

    code = main([*args, "--out", str(tmp_path)] if args[0] == "run" else args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.strip().count("\n") == 0
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_eval_on_a_frozen_suite_matches_sampled_episodes(tmp_path: Path, capsys) -> None:
    from metabench.cli import main

    common = ["--learner", "pre", *FAST, "data.eval_sources=[digits]", "eval.episodes=2"]
    assert main(["run", *common, "--out", str(tmp_path / "sampled")]) == 0
    assert main(["run", *common, "eval.suite=embedded-test", "--out", str(tmp_path / "suite")]) == 0
    (sampled,) = (tmp_path / "sampled").iterdir()
    (suite,) = (tmp_path / "suite").iterdir()
    a = pd.read_parquet(sampled / "episodes.parquet")
    b = pd.read_parquet(suite / "episodes.parquet")
    assert a["episode_id"].tolist() == b["episode_id"].tolist()
    assert a["accuracy"].tolist() == b["accuracy"].tolist()


def test_episodes_freeze_and_ls(tmp_path: Path, capsys) -> None:
    from metabench.cli import main

    args = ["episodes", "freeze", "--suite", "tiny", "--sources", "digits", "--split", "test", "--n", "3",
            "--out", str(tmp_path)]
    assert main(args) == 0
    assert "3 episodes" in capsys.readouterr().out
    assert main(["episodes", "ls", "--out", str(tmp_path)]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["episodes", "freeze", "--suite", "nonsense", "--out", str(tmp_path)]) == 2
    assert "has no recipe" in capsys.readouterr().err


def test_data_convert_digits_to_hdf5(tmp_path: Path, capsys) -> None:
    from metabench.cli import main

    out = tmp_path / "digits.h5"
    assert main(["data", "convert", "digits", "--out", str(out), "--quiet"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_eval_modes_and_steps_from_the_command_line(run_dir: Path) -> None:
    proc = _cli("eval", "--run", str(run_dir), "--quiet", "--mode", "zero_shot", "full", "--steps", "0", "2",
                "eval.episodes=1", "data.eval_sources=[digits]", "eval.lr=0.0001")
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_parquet(run_dir / "episodes.parquet")
    full = frame[frame["mode"] == "full"]
    assert len(full) == 1 and full["steps"].tolist() == [2] and full["source"].tolist() == ["digits"]


def test_run_writes_its_report_and_report_command(run_dir: Path, tmp_path: Path, capsys) -> None:
    from metabench.cli import main

    html = (run_dir / "report" / "report.html").read_text()
    assert "NOT PRETRAINED" in html.upper() and "noto" in html
    assert main(["report", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    assert str(tmp_path / "rep") in capsys.readouterr().out


def test_smat_run_writes_probes_for_the_analysis(tmp_path: Path, capsys) -> None:
    from metabench.cli import main

    code = main(["run", "--learner", "smat", *FAST, "--out", str(tmp_path), "train.episodes=2",
                 "train.probe_every=1", "learner.n_experts=2", "data.eval_sources=[digits]", "eval.episodes=2"])
    assert code == 0, capsys.readouterr().err
    (run,) = tmp_path.iterdir()
    probes = {p.name for p in (run / "probes").iterdir()}
    assert {"expert_scores.parquet", "mask_stats.parquet", "mask_overlap.parquet", "grad_alignment.parquet"} <= probes
    scores = pd.read_parquet(run / "probes" / "expert_scores.parquet")
    assert len(scores) == 2 * 2 and scores.groupby("episode_id")["alpha"].sum().round(5).eq(1).all()
    frame = pd.read_parquet(run / "episodes.parquet")
    assert frame["sparsity"].between(0, 1).all()
    assert (run / "report" / "report.html").is_file()
    figures = {p.name for p in (run / "report" / "figures").iterdir()}
    assert any("overlap" in f for f in figures) and any("capacity" in f for f in figures)


def test_validation_during_meta_training_feeds_learning_curves(tmp_path: Path, capsys) -> None:
    from metabench.cli import main

    code = main(["run", "--learner", "pmf", *FAST, "--out", str(tmp_path), "train.episodes=4", "train.val_every=2",
                 "train.val_episodes=2", "train.val_ood_sources=[digits]", "data.eval_sources=[digits]",
                 "eval.episodes=1"])
    assert code == 0, capsys.readouterr().err
    (run,) = tmp_path.iterdir()
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    val = [r for r in log if "val_id" in r]
    assert [r["tasks"] for r in val] == [2, 4] and all(0 <= r["val_id"] <= 1 for r in val)
    assert all(r["val_id_episodes"] == r["val_ood_episodes"] == 2 and 0 <= r["val_ood"] <= 1 for r in val)
    assert all(r["val_ood_splits"] == "digits:test" for r in val)  # digits has no validation classes
    figures = {p.name for p in (run / "report" / "figures").iterdir()}
    assert any("curve" in f for f in figures), figures
