"""Shared pieces of the hostile-input tests (test_hostile_data, test_hostile_runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers_md import MDSource, write_md_source

from metabench.cli import main

FAST = ["--backbone", "vit_test", "--quiet", "data.image_size=32", "eval.episodes=2", "train.episodes=0"]
TRAIN = ["train.episodes=2", "train.log_every=1", "data.train_sources=[md_tfrecords]", "data.train_sampler.mode=fixed",
         "data.train_sampler.shot=1", "data.train_sampler.query=2"]
CHECKPOINT = "checkpoints/learner.safetensors"


def _toy(folder: Path) -> MDSource:
    """5/5/5 classes of 6..12 PNGs: every test episode (5 ways at least) holds all five test classes."""
    return write_md_source(folder, name="toy", classes_per_split=(5, 5, 5))


def _md(src: MDSource) -> list[str]:
    return ["data.eval_sources=[md_tfrecords]", f"data.root={src.folder}"]


def _fails(args: list[str], out: Path, capsys: pytest.CaptureFixture[str], message: str) -> str:
    """Run the CLI in-process; assert exit 2, one stderr line matching ``message``, and no run folder."""
    code = main([*args, "--out", str(out)] if args[0] in ("run", "sweep") else args)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.startswith("metabench: error: ") and captured.err.count("\n") == 1, captured.err
    assert re.search(message, captured.err), captured.err
    assert "Traceback" not in captured.err
    assert not out.exists(), sorted(out.rglob("*"))  # nothing half-written, not even the --out folder
    return captured.err
