"""Hand-built run folders for the analysis tests (imported by the other test_analysis_* modules)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metabench.results import EPISODE_COLUMNS, EpisodeRow, RunWriter, load_run

SOURCES = {"noto": "id", "omni": "id", "digits": "ood", "mnist": "ood"}


def episode_rows(run_id: str, learner: str, accuracy: dict[str, list[float]], mode: str = "zero_shot",
                 steps: int = 0, sparsity: float = math.nan, way: int = 5, shots: int = 25) -> list[EpisodeRow]:
    """One row per accuracy; episode ids e0, e1, ... per source, so two runs share episodes by position."""
    rows = []
    for source, values in accuracy.items():
        for i, acc in enumerate(values):
            rows.append(EpisodeRow(run_id, learner, "vit_test", source, "test", SOURCES.get(source, "id"), f"e{i}",
                                   mode, steps, way + i % 3, shots + i, 10 * (way + i % 3), float(acc), 1.0,
                                   sparsity, 0.1))
    return rows


def write_run(root: Path, run_id: str, learner: str, accuracy: dict[str, list[float]], *, pretrained: bool = True,
              learner_cfg: dict[str, Any] | None = None, sparsity: float = math.nan,
              train_log: list[dict[str, Any]] | None = None, probes: dict[str, pd.DataFrame] | None = None,
              masks: dict[str, np.ndarray] | None = None, modes: tuple[tuple[str, int], ...] = (("zero_shot", 0),)
              ) -> Path:
    """A run folder in the results schema, like ``metabench run`` writes it."""
    run_dir = root / run_id
    writer = RunWriter(run_dir)
    config = {"learner": {"name": learner, **(learner_cfg or {})}, "backbone": {"name": "vit_test"}, "seed": 0,
              "preset": "cpu", "out_dir": str(root)}
    writer.write_manifest({
        "run_id": run_id, "status": "finished", "config": config, "seed": 0, "git": {"sha": "abc123", "dirty": False},
        "versions": {"metabench": "0.1.0", "python": "3.11"}, "device": "cpu", "precision": "fp32",
        "backbone": {"alias": "vit_test", "timm_name": "vit_tiny_patch16_224", "tag": "t", "pretrained": pretrained,
                     "weights_source": "local" if pretrained else "random", "weights_location": None,
                     "weights_sha256": None, "weights_note": None},
    })
    writer.write_config(f"learner:\n  name: {learner}\nseed: 0\n")
    for mode, steps in modes:
        writer.add_rows(episode_rows(run_id, learner, accuracy, mode, steps, sparsity))
    writer.flush()
    for record in train_log or []:
        writer.log_train(record)
    for name, frame in (probes or {}).items():
        (run_dir / "probes").mkdir(exist_ok=True)
        frame.to_parquet(run_dir / "probes" / f"{name}.parquet", index=False)
    if masks:
        (run_dir / "probes").mkdir(exist_ok=True)
        np.savez(run_dir / "probes" / "masks.npz", **masks)
    return run_dir


def test_fixture_run_is_in_the_results_schema(tmp_path: Path) -> None:
    run = write_run(tmp_path, "r1", "pre", {"noto": [0.5, 0.7], "digits": [0.9]})
    manifest, frame = load_run(run)
    assert list(frame.columns) == EPISODE_COLUMNS
    assert manifest["backbone"]["pretrained"] is True
    assert frame.groupby("source")["episode_id"].apply(list).to_dict() == {"digits": ["e0"], "noto": ["e0", "e1"]}
