"""The Python API (metabench.load_run / metabench.evaluate) reproduces a run's rows and scores custom episodes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import metabench
from episodes.loader import EpisodeSet
from episodes.readers.embedded import SklearnDigits
from episodes.sampler import SamplerConfig
from metabench.config import load_config
from metabench.results import EPISODE_COLUMNS, load_run
from metabench.runs import execute

RUN = ["data.image_size=32", "data.train_sources=[noto]", "data.eval_sources=[noto,digits]", "eval.episodes=2",
       "train.episodes=3", "train.log_every=1", "data.train_sampler.way=3", "data.train_sampler.shot=2",
       "data.train_sampler.query=2", "eval.lr_selection=fixed", "eval.lr=1e-3", "eval.steps=1"]
EXACT = ["run_id", "learner", "backbone", "source", "split", "domain", "episode_id", "mode", "steps", "way", "shots",
         "n_query"]


@pytest.fixture(scope="module")
def pmf_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(overrides=[*RUN, f"out_dir={out}", "eval.modes=[zero_shot,full]"],
                      flags={"learner": {"name": "pmf"}, "backbone": {"name": "vit_test"}})
    return execute(cfg, progress=False).run_dir


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    keys = ["source", "episode_id", "mode", "steps"]
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[EXACT], b[EXACT], check_dtype=False)
    np.testing.assert_allclose(a["accuracy"], b["accuracy"], atol=1e-6)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4, atol=1e-5)


def test_load_run_and_evaluate_reproduce_the_runs_rows(pmf_run: Path) -> None:
    run = metabench.load_run(pmf_run)
    assert run.config.learner.name == "pmf" and run.manifest["status"] == "finished"
    assert run.learner.cfg.name == "pmf" and str(run.device) == "cpu"
    rows = metabench.evaluate(run.learner, run.episodes(), run=run)
    assert list(rows.columns) == EPISODE_COLUMNS
    _, saved = load_run(pmf_run)
    assert set(zip(rows["mode"], rows["steps"])) == {("zero_shot", 0), ("full", 1)}
    _same_rows(rows, saved)


def test_evaluate_scores_custom_episodes(pmf_run: Path) -> None:
    run = metabench.load_run(pmf_run)
    mine = EpisodeSet([SklearnDigits()], "test", SamplerConfig(mode="fixed", way=4, shot=3, query=2), n_episodes=3,
                      seed=7, image_size=32, per_source=True)
    rows = metabench.evaluate(run.learner, mine, modes=["zero_shot"], domains={"digits": "ood"})
    assert len(rows) == 3 and set(rows["way"]) == {4} and set(rows["n_query"]) == {8}
    assert set(rows["domain"]) == {"ood"} and set(rows["run_id"]) == {"api"}
    assert rows["accuracy"].between(0, 1).all()


def test_readme_api_example_runs(pmf_run: Path, monkeypatch) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    marker = "<!-- api-example -->"
    assert marker in readme, "README lacks the Python API example"
    block = readme.split(marker, 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.setattr(sys, "argv", ["example"])
    scope: dict = {"RUN_DIR": str(pmf_run)}
    exec(compile(block.replace('"runs/my-run"', "RUN_DIR"), "README-api-example", "exec"), scope)
    assert isinstance(scope["rows"], pd.DataFrame) and len(scope["rows"]) > 0


def test_a_random_init_backbone_gets_the_smaller_evaluation_budget(tmp_path: Path) -> None:
    flags = {"learner": {"name": "pre"}, "backbone": {"name": "vit_test"}}
    base = ["data.image_size=32", "data.eval_sources=[digits]", f"out_dir={tmp_path}", "eval.episodes=8"]
    capped = execute(load_config(overrides=base, flags=flags), progress=False)
    assert capped.manifest["config"]["eval"]["episodes"] == 5 and len(load_run(capped.run_dir)[1]) == 5
    full = execute(load_config(overrides=[*base, "eval.episodes_random_init=0"], flags=flags), progress=False)
    assert len(load_run(full.run_dir)[1]) == 8
