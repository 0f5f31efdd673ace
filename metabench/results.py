"""The results schema: one folder per run, the contract between runs and the analysis package.

``runs/<run_id>/`` holds ``manifest.json`` (config, versions, provenance), ``config.yaml``,
``episodes.parquet`` (one row per evaluated episode and protocol) and ``train_log.jsonl``.
Torch-free on purpose: ``analysis`` imports this module for the column names.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from episodes.atomic import atomic_path, atomic_write

__all__ = [
    "EPISODE_COLUMNS",
    "EpisodeRow",
    "FollowerRunWriter",
    "OutputError",
    "RunFolders",
    "RunWriter",
    "ResultsError",
    "load_run",
    "watch_run_folders",
    "write_error",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
EPISODES = "episodes.parquet"
TRAIN_LOG = "train_log.jsonl"
PARTIAL = "episodes.partial.jsonl"  # rows appended as they are produced; folded into EPISODES at the end


class ResultsError(RuntimeError):
    """A run folder that is missing or not in the results schema."""


class OutputError(ResultsError, OSError):
    """A run folder that cannot be written (disk full, read-only, no permission); one sentence naming the file."""


_WRITE_PROBLEMS = {
    errno.ENOSPC: ("the disk is full", "free some space or choose an output folder (--out) on another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or choose an output folder (--out) on another disk"),
    errno.EROFS: ("the file system is read-only", "choose an output folder (--out) you can write to"),
    errno.EACCES: ("permission denied", "choose an output folder (--out) you can write to"),
    errno.EPERM: ("permission denied", "choose an output folder (--out) you can write to"),
}


def write_error(err: OSError, path: str | Path | None = None) -> OutputError:
    """``err`` from writing ``path`` as one sentence: which file, why, and what to do."""
    where = err.filename or path
    why, advice = _WRITE_PROBLEMS.get(err.errno or 0, (err.strerror or str(err), "check the output folder (--out)"))
    return OutputError(f"Cannot write {where}: {why}; {advice}.")


def _writes(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an ``OSError`` of a ``RunWriter`` method into an ``OutputError`` naming the file."""

    @functools.wraps(method)
    def wrapper(self: RunWriter, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except OutputError:
            raise
        except OSError as err:
            raise write_error(err, self.run_dir) from None

    return wrapper


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
    # max - min of the per-class shares of the support set (0: balanced), Meta-Dataset analyze.py's imbalance;
    # NaN in rows written before the column existed
    imbalance: float = math.nan

    @property
    def key(self) -> tuple[str, str, str, int]:
        """What identifies a result: (source, episode_id, mode, steps)."""
        return str(self.source), str(self.episode_id), str(self.mode), int(self.steps)


EPISODE_COLUMNS: list[str] = [f.name for f in fields(EpisodeRow)]


class RunWriter:
    """Writes one run folder; every file is replaced atomically. A failed write is an ``OutputError``."""

    @_writes
    def __init__(self, run_dir: str | Path, append: bool = False) -> None:
        """Args:
        run_dir: the run folder (created if needed).
        append: keep the rows already in ``episodes.parquet`` (``metabench eval`` on a saved run).
        """
        self.run_dir = Path(run_dir)
        created = _first_missing(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for watcher in _WATCHERS:
            watcher.opened.append((self.run_dir, created))
        self.rows: list[EpisodeRow] = []
        existing = self.run_dir / EPISODES
        self._previous = pd.read_parquet(existing) if append and existing.exists() else None

    @_writes
    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.run_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n",
                     fsync=True)

    @_writes
    def write_config(self, yaml_text: str) -> None:
        atomic_write(self.run_dir / CONFIG, yaml_text)

    @_writes
    def log_train(self, record: dict[str, Any]) -> None:
        """Append one meta-training log record (a JSON line: lost lines cost little, so no rename)."""
        with open(self.run_dir / TRAIN_LOG, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def add_rows(self, rows: Iterable[EpisodeRow], *, persist: bool = False) -> None:
        """Keep ``rows`` for ``flush``; with ``persist``, also append them to ``episodes.partial.jsonl`` at
        once, so a crash loses no finished episode."""
        rows = list(rows)
        self.rows.extend(rows)
        if persist and rows:
            with open(self.run_dir / PARTIAL, "a") as f:
                f.write("".join(json.dumps(asdict(r)) + "\n" for r in rows))
                f.flush()

    def recover_rows(self) -> list[EpisodeRow]:
        """Rows an interrupted run already produced (its ``episodes.parquet``, then the partial file; a torn
        last line is dropped); they are kept for ``flush``."""
        found: dict[tuple, EpisodeRow] = {}
        if (self.run_dir / EPISODES).exists():
            for record in pd.read_parquet(self.run_dir / EPISODES).to_dict("records"):
                row = EpisodeRow(**record)
                found[row.key] = row
        if (self.run_dir / PARTIAL).exists():
            for line in (self.run_dir / PARTIAL).read_text().splitlines():
                try:
                    row = EpisodeRow(**json.loads(line))
                except (ValueError, TypeError):
                    continue
                found[row.key] = row
        self.rows = list(found.values())
        return self.rows

    @_writes
    def flush(self, final: bool = False) -> Path:
        """Write all rows so far (after the kept earlier rows, when appending) to ``episodes.parquet``;
        ``final`` also removes the partial file the rows were appended to."""
        path = self.run_dir / EPISODES
        frame = pd.DataFrame([asdict(r) for r in self.rows], columns=EPISODE_COLUMNS)
        if self._previous is not None:
            # Re-evaluating an episode under the same protocol replaces its earlier row.
            frame = pd.concat([self._previous, frame], ignore_index=True)
            frame = frame.drop_duplicates(["source", "split", "episode_id", "mode", "steps"], keep="last")
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
        if final:
            (self.run_dir / PARTIAL).unlink(missing_ok=True)
        return path


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """Read a run folder: its manifest and its per-episode rows."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise ResultsError(f"{run_dir} is not a metabench run folder (no {MANIFEST}); "
                           "pass a folder made by `metabench run`.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise ResultsError(f"{manifest_path} is not valid JSON ({err}); restore it from a copy or run again.") from None
    if not isinstance(manifest, dict):
        raise ResultsError(f"{manifest_path} is not a metabench manifest (not a JSON object); run again.")
    episodes_path = run_dir / EPISODES
    if not episodes_path.exists():
        return manifest, pd.DataFrame(columns=EPISODE_COLUMNS)
    try:
        frame = pd.read_parquet(episodes_path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ResultsError(f"{episodes_path} cannot be read ({err}); it is damaged, evaluate the run again.") from None
    return manifest, frame


# --------------------------------------------------------------------------- tidying after a failure


@dataclass
class RunFolders:
    """The run folders ``RunWriter`` opened while a ``watch_run_folders()`` block ran.

    Each entry is (run folder, the topmost folder that opening it created, or None when it existed).
    """

    opened: list[tuple[Path, Path | None]] = field(default_factory=list)

    def abandon(self, status: str, reason: str) -> list[Path]:
        """Tidy the folders after a command stopped early (an error, Ctrl-C); return the unfinished ones kept.

        Temporary files are removed. A folder this command created that holds nothing but its config
        and manifest is removed with the folders created for it, so bad input leaves nothing behind.
        An unfinished folder with results (training log, checkpoints, episode rows) is kept for
        ``metabench run --resume`` and its manifest says ``status`` and ``reason``.
        """
        kept: list[Path] = []
        for run_dir, created in self.opened:
            if not run_dir.is_dir():
                continue
            for tmp in run_dir.rglob("*.tmp"):  # leftovers of writes cut short (files are written, then renamed)
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
            if created is not None and not _holds_results(run_dir):
                _remove_created(run_dir, created)
            elif _mark_stopped(run_dir, status, reason):
                kept.append(run_dir)
        return kept


_WATCHERS: list[RunFolders] = []


@contextmanager
def watch_run_folders() -> Iterator[RunFolders]:
    """Record the run folders opened inside the block (the CLI tidies them when a command fails)."""
    watcher = RunFolders()
    _WATCHERS.append(watcher)
    try:
        yield watcher
    finally:
        _WATCHERS.remove(watcher)


def _first_missing(path: Path) -> Path | None:
    """The topmost folder on the way to ``path`` that does not exist yet (None: ``path`` exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _holds_results(run_dir: Path) -> bool:
    """True when anything beyond the config and manifest written at the start is in ``run_dir``."""
    return any(p.is_file() and p.name not in (MANIFEST, CONFIG) for p in run_dir.rglob("*"))


def _remove_created(run_dir: Path, created: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in [run_dir, *run_dir.parents]:
        if folder == created.parent:
            break
        try:
            folder.rmdir()  # only when empty: another run may have appeared meanwhile
        except OSError:
            if folder.exists():
                break
    log.debug("Removed the unfinished run folder %s (it held no results)", run_dir)


def _mark_stopped(run_dir: Path, status: str, reason: str) -> bool:
    """Set a running run's manifest to ``status``; False for a finished run (left as it is)."""
    path = run_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("status") == "finished":
        return False
    if manifest.get("status") == "running":
        manifest.update(status=status, stop_reason=reason)
        try:
            atomic_write(path, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        except OSError as err:  # a full disk may refuse this too; the folder is still reported
            log.debug("Could not mark %s as %s: %s", run_dir, status, err)
    return True


class FollowerRunWriter(RunWriter):
    """The writer of ranks other than 0 in a multi-process run: it knows the run folder (to read
    checkpoints and finished rows when resuming) and keeps rows in memory, but writes nothing."""

    def __init__(self, run_dir: str | Path) -> None:  # no folder is created
        self.run_dir = Path(run_dir)
        self.rows = []
        self._previous = None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        pass

    def write_config(self, yaml_text: str) -> None:
        pass

    def log_train(self, record: dict[str, Any]) -> None:
        pass

    def add_rows(self, rows: Iterable[EpisodeRow], *, persist: bool = False) -> None:
        self.rows.extend(rows)

    def flush(self, final: bool = False) -> Path:
        return self.run_dir / EPISODES
