"""A run killed at any point resumes with ``run --resume`` and ends with the same results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocesses (CLI, torchrun, kills): `pytest -m "not slow"` skips them

PLUGIN = str(Path(__file__).with_name("crashing_learners.py"))
ARGS = ["--plugin", PLUGIN, "--backbone", "vit_test", "--quiet", "data.image_size=32", "train.episodes=6",
        "train.checkpoint_every=2", "train.log_every=1", "train.probe_every=2", "learner.n_experts=2",
        "data.eval_sources=[noto,digits]", "eval.episodes=2", "data.train_sampler.mode=fixed",
        "data.train_sampler.way=3", "data.train_sampler.shot=2", "data.train_sampler.query=2"]


def _cli(*args: str, crash: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "METABENCH_TEST_CRASH": crash}
    return subprocess.run([sys.executable, "-m", "metabench", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _results(run: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run / "episodes.parquet")
    return frame.drop(columns=["seconds", "run_id"]).sort_values(["source", "episode_id", "mode"], ignore_index=True)


def _train_log(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_killed_in_training_then_in_evaluation_resumes_to_identical_results(tmp_path: Path) -> None:
    reference = _cli("run", "--learner", "smat_crash", *ARGS, "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    (ref,) = (tmp_path / "ref").iterdir()

    killed = _cli("run", "--learner", "smat_crash", *ARGS, "--out", str(tmp_path / "b"), crash="train:3")
    assert killed.returncode == -signal.SIGKILL
    (run,) = (tmp_path / "b").iterdir()
    assert json.loads((run / "checkpoints/train/latest.json").read_text())["update"] == 2
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"

    again = _cli("run", "--resume", str(run), "--plugin", PLUGIN, "--quiet", crash="eval:3")
    assert again.returncode == -signal.SIGKILL
    assert len((run / "episodes.partial.jsonl").read_text().splitlines()) == 2  # the 3rd row died with it

    done = _cli("run", "--resume", str(run), "--plugin", PLUGIN, "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
    assert not (run / "episodes.partial.jsonl").exists()
    pd.testing.assert_frame_equal(_results(run), _results(ref))
    assert _train_log(run) == _train_log(ref)
    a, b = load_file(str(ref / "checkpoints/learner.safetensors")), load_file(str(run / "checkpoints/learner.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    alignment = pd.read_parquet(run / "probes/grad_alignment.parquet")
    pd.testing.assert_frame_equal(alignment, pd.read_parquet(ref / "probes/grad_alignment.parquet"))

    finished = _cli("run", "--resume", str(run), "--plugin", PLUGIN)
    assert finished.returncode == 2 and "has finished already" in finished.stderr


@pytest.mark.parametrize("extra", [["learner.n_experts=3"], ["--seed", "1"]])
def test_resume_refuses_new_settings(tmp_path: Path, extra: list[str]) -> None:
    proc = _cli("run", "--resume", str(tmp_path), *extra)
    assert proc.returncode == 2 and "drop the other flags" in proc.stderr and len(proc.stderr.splitlines()) == 1
