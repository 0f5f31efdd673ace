"""Long phases log their progress when stderr is not a terminal (cluster jobs, `| tee log`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from metabench.progress import LogProgress, progress


def test_log_progress_reports_count_rate_eta_and_metrics(caplog) -> None:
    caplog.set_level(logging.INFO, logger="metabench.progress")
    bar = LogProgress(total=10, desc="meta-train", unit="task", every=0)
    for _ in range(4):
        bar.update(1)
        bar.set_postfix({"loss": "0.43"})
    assert "meta-train: 4/10 task (40%)" in caplog.text and "task/s" in caplog.text and "left" in caplog.text
    assert "loss=0.43" in caplog.text
    quiet = LogProgress(range(5), total=5, desc="evaluate", unit="ep", every=3600)
    caplog.clear()
    assert list(quiet) == list(range(5))
    assert caplog.text.count("evaluate: 5/5") == 1  # the last item always reports


def test_progress_is_a_log_when_stderr_is_not_a_terminal() -> None:
    assert isinstance(progress(total=3, desc="x"), LogProgress)  # pytest captures stderr: not a TTY
    assert not isinstance(progress(total=3, enabled=False), LogProgress)


@pytest.mark.slow
def test_a_piped_run_logs_training_and_evaluation_progress(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "METABENCH_LOG_SECONDS": "0"}
    args = [sys.executable, "-m", "metabench", "run", "--learner", "pmf", "--backbone", "vit_test", f"out_dir={tmp_path}",
            "data.image_size=32", "train.episodes=3", "data.train_sampler.way=3", "data.train_sampler.shot=1",
            "data.train_sampler.query=1", "data.eval_sources=[digits]", "eval.episodes=2"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "meta-train: 3/3 task (100%)" in out.stderr and "evaluate: 2/2 ep (100%)" in out.stderr
