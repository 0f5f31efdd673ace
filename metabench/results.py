"""The results schema: one folder per run, the contract between runs and the analysis package.

``runs/<run_id>/`` holds ``manifest.json`` (config, versions, provenance), ``config.yaml``,
``episodes.parquet`` (one row per evaluated episode and protocol) and ``train_log.jsonl``.
Torch-free on purpose: ``analysis`` imports this module for the column names.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "EPISODE_COLUMNS",
    "EpisodeRow",
    "RunWriter",
    "ResultsError",
    "atomic_write",
    "ci95",
    "load_run",
    "summarize",
]

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
EPISODES = "episodes.parquet"
TRAIN_LOG = "train_log.jsonl"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ResultsError(RuntimeError):
    """A run folder that is missing or not in the results schema."""


@dataclass
class EpisodeRow:
    """One evaluated episode under one protocol: the unit of every table."""

    run_id: str
    learner: str
    backbone: str
    source: str
    split: str
    domain: str  # "id" or "ood"
    episode_id: str
    mode: str  # "zero_shot", ...
    steps: int
    way: int
    shots: int  # support images in total
    n_query: int
    accuracy: float
    loss: float
    sparsity: float  # fraction of zero entries in the task update (nan when not applicable)
    seconds: float  # adapt + predict wall time


EPISODE_COLUMNS: list[str] = [f.name for f in fields(EpisodeRow)]


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunWriter:
    """Writes one run folder; every file is replaced atomically."""

    def __init__(self, run_dir: str | Path, append: bool = False) -> None:
        """Args:
        run_dir: the run folder (created if needed).
        append: keep the rows already in ``episodes.parquet`` (``metabench eval`` on a saved run).
        """
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[EpisodeRow] = []
        existing = self.run_dir / EPISODES
        self._previous = pd.read_parquet(existing) if append and existing.exists() else None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.run_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")

    def write_config(self, yaml_text: str) -> None:
        atomic_write(self.run_dir / CONFIG, yaml_text)

    def log_train(self, record: dict[str, Any]) -> None:
        """Append one meta-training log record (a JSON line: lost lines cost little, so no rename)."""
        with open(self.run_dir / TRAIN_LOG, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def add_rows(self, rows: Iterable[EpisodeRow]) -> None:
        self.rows.extend(rows)

    def flush(self) -> Path:
        """Write all rows so far (after the kept earlier rows, when appending) to ``episodes.parquet``."""
        path = self.run_dir / EPISODES
        frame = pd.DataFrame([asdict(r) for r in self.rows], columns=EPISODE_COLUMNS)
        if self._previous is not None:
            # Re-evaluating an episode under the same protocol replaces its earlier row.
            frame = pd.concat([self._previous, frame], ignore_index=True)
            frame = frame.drop_duplicates(["source", "split", "episode_id", "mode", "steps"], keep="last")
        with tempfile.NamedTemporaryFile(dir=self.run_dir, suffix=".parquet.tmp", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            frame.to_parquet(tmp_path, index=False)
            os.chmod(tmp_path, 0o666 & ~_umask())
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)
        return path


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """Read a run folder: its manifest and its per-episode rows."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise ResultsError(f"{run_dir} is not a metabench run folder (no {MANIFEST}); pass a folder made by `metabench run`.")
    manifest = json.loads(manifest_path.read_text())
    episodes_path = run_dir / EPISODES
    frame = pd.read_parquet(episodes_path) if episodes_path.exists() else pd.DataFrame(columns=EPISODE_COLUMNS)
    return manifest, frame


def ci95(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean and Meta-Dataset's 95% half-width ``1.96 * std / sqrt(n)`` (population std) of a sample."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / n)
    return mean, 1.96 * std / math.sqrt(n), n


def summarize(frame: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Mean accuracy ± 95% CI per group (default: domain, source, mode, steps), in percent."""
    by = by or ["domain", "source", "mode", "steps"]
    out = []
    for key, group in frame.groupby(by, sort=False):
        mean, half, n = ci95(group["accuracy"])
        out.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "accuracy": 100 * mean, "ci95": 100 * half, "n": n})
    return pd.DataFrame(out, columns=[*by, "accuracy", "ci95", "n"])
