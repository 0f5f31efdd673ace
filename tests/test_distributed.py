"""Determinism across processes: torchrun with 2 CPU processes (gloo) evaluates into the single-process table and
meta-trains like one process with the same meta-batch; loader workers do not change any result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocesses (CLI, torchrun, kills): `pytest -m "not slow"` skips them

COMMON = ["--backbone", "vit_test", "--quiet", "data.image_size=32", "data.eval_sources=[noto,digits]",
          "eval.episodes=3", "data.sampler.mode=fixed", "data.sampler.use_bilevel_hierarchy=false", "data.sampler.way=3", "data.sampler.shot=2",
          "data.sampler.query=2", "data.train_sampler.mode=fixed", "data.train_sampler.way=3",
          "data.train_sampler.shot=2", "data.train_sampler.query=2"]


def _run(out: Path, *args: str, ranks: int = 1) -> Path:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "-m", "metabench", "run", *args, *COMMON, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = out.iterdir()
    return run


def _rows(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "episodes.parquet").drop(columns=["seconds", "run_id"])


EVAL = ["--learner", "pre", "eval.modes=[zero_shot,full]", "eval.steps=1", "eval.lr_selection=support",
        "eval.lr_grid=[0,1e-3]"]


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process, no-worker evaluation every other way of running must reproduce."""
    return _run(tmp_path_factory.mktemp("one"), *EVAL)


def test_two_ranks_shard_evaluation_into_the_single_process_table(one: Path, tmp_path: Path) -> None:
    two = _run(tmp_path / "two", *EVAL, ranks=2)
    assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    pd.testing.assert_frame_equal(_rows(two), _rows(one))  # same rows, same order
    assert len(_rows(one)) == 2 * 3 * 2


def test_two_ranks_meta_train_like_one_process_with_the_same_meta_batch(tmp_path: Path) -> None:
    args = ["--learner", "pmf", "train.episodes=4", "train.log_every=1"]
    # each rank takes tasks_per_update tasks: 2 ranks x 1 task is the meta-batch of 1 process x 2 tasks
    single = _run(tmp_path / "one", *args, "train.tasks_per_update=2")
    two = _run(tmp_path / "two", *args, ranks=2)
    manifest = json.loads((two / "manifest.json").read_text())
    assert (manifest["world_size"], manifest["tasks_per_update"], manifest["meta_batch"]) == (2, 1, 2)
    a, b = load_file(str(single / "checkpoints/learner.safetensors")), load_file(str(two / "checkpoints/learner.safetensors"))
    assert a.keys() == b.keys()
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), moved
    log_one = pd.read_json(single / "train_log.jsonl", lines=True)
    log_two = pd.read_json(two / "train_log.jsonl", lines=True)
    assert log_two["tasks"].tolist() == log_one["tasks"].tolist() == [2, 4]
    assert log_two["loss"].tolist() == pytest.approx(log_one["loss"].tolist(), abs=1e-5)


def test_per_episode_results_do_not_depend_on_loader_workers(one: Path, tmp_path: Path) -> None:
    workers = _run(tmp_path / "w2", *EVAL, "data.num_workers=2")
    pd.testing.assert_frame_equal(_rows(workers), _rows(one))
