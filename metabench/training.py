"""The meta-training phase of a run: episodes, validation, probes and resumable checkpoints.

Checkpoints (``metabench.checkpoint``) are taken every ``train.checkpoint_every`` updates and
whenever ``train.checkpoint_minutes`` have passed, after the update's validation and probes, so a
resumed run repeats nothing and skips nothing: it reloads the learner, optimisers, schedulers and RNG
states, drops log lines written after the checkpoint, and continues with the next episode index
(episodes are generated from their index, so the stream is the same).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from episodes.episode import Episode, Split
from episodes.loader import EpisodeSet, make_loader
from episodes.readers.base import Source
from episodes.train_augment import TrainAugment
from metabench.checkpoint import (
    TrainPosition,
    atomic_save,
    load_training_checkpoint,
    mark_training_done,
    read_position,
    save_training_checkpoint,
)
from metabench.config import RunConfig
from metabench.distributed import attach_grad_averaging, broadcast_module, is_main, rank, world_size
from metabench.engine import meta_train
from metabench.learners.base import Learner
from metabench.learning_curves import Validator
from metabench.probes import ProbeRecorder
from metabench.results import TRAIN_LOG, RunWriter

__all__ = ["CHECKPOINT", "CHECKPOINT_DIR", "Checkpointer", "load_learner_state", "rank_tasks", "run_training",
           "save_learner"]

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoints/learner.safetensors"  # the final learner, read by `metabench eval --run`
CHECKPOINT_DIR = "checkpoints/train"  # resumable state during meta-training


def save_learner(learner: Learner, path: Path) -> None:
    """Save the learner's full state as safetensors (no pickled code), atomically."""
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(lambda tmp: save_model(learner, str(tmp)), path)


def load_learner_state(learner: Learner, path: Path) -> None:
    """Load a learner saved by ``save_learner``; a checkpoint of another learner or backbone, or a file
    that is not safetensors, is one clear error (never unpickled)."""
    from metabench.weights import load_checkpoint_into

    load_checkpoint_into(learner, path, f'learner "{learner.cfg.name}" on backbone {learner.backbone.spec.alias}')


def identity(cfg: RunConfig) -> dict[str, str]:
    """What a training checkpoint must match to be loaded."""
    return {"learner": cfg.learner.name, "backbone": cfg.backbone.name}


class Checkpointer:
    """An ``on_update`` hook that saves a resumable checkpoint by update count or elapsed time."""

    def __init__(self, cfg: RunConfig, learner: Learner, directory: Path) -> None:
        self.learner, self.directory, self.identity = learner, directory, identity(cfg)
        self.every, self.seconds = cfg.train.checkpoint_every, 60.0 * cfg.train.checkpoint_minutes
        self.last = time.monotonic()

    def __call__(self, batch: Sequence[Episode], update: int, tasks_seen: int) -> None:
        due_by_count = self.every > 0 and update % self.every == 0
        due_by_time = self.seconds > 0 and time.monotonic() - self.last >= self.seconds
        if due_by_count or due_by_time:
            save_training_checkpoint(self.directory, self.learner, update=update, tasks=tasks_seen,
                                     identity=self.identity)
            self.last = time.monotonic()


def _hooks(*hooks: Callable[..., None]) -> Callable[..., None]:
    """One ``on_update`` hook calling several, in order."""
    def call(*args: Any) -> None:
        for hook in hooks:
            hook(*args)
    return call


def _drop_later_log_lines(path: Path, update: int) -> None:
    """Keep the training-log records of updates up to ``update`` (later ones are redone on resume)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("update", 0)) <= update:
                kept.append(line + "\n")
        except ValueError:
            continue
    path.write_text("".join(kept))


def run_training(cfg: RunConfig, learner: Learner, sources: dict[str, Source], writer: RunWriter,
                 device: torch.device, precision: str, progress: bool, recorder: ProbeRecorder,
                 resume: bool = False) -> None:
    """Meta-train ``learner`` as the config says (from its last checkpoint when ``resume``); save it."""
    if cfg.train.episodes == 0:
        return
    if not learner.meta_trainable:
        log.info('Learner "%s" has no meta-training phase; skipping %d training episodes.', cfg.learner.name,
                 cfg.train.episodes)
        return
    ckpt_dir = writer.run_dir / CHECKPOINT_DIR
    position: TrainPosition | None = read_position(ckpt_dir) if resume else None
    if position is not None and position.done:
        load_learner_state(learner, writer.run_dir / CHECKPOINT)
        log.info("Meta-training had finished (%d updates); loaded the trained learner.", position.update)
        return
    start = position.update if position is not None else 0
    _drop_later_log_lines(writer.run_dir / TRAIN_LOG, start)
    batch = meta_batch(cfg)
    recorder.alignment = [r for r in recorder.alignment if r["tasks_seen"] <= start * batch]
    train_sources = [sources[n] for n in cfg.data.train_sources]
    augment = TrainAugment() if cfg.data.augment else None
    episode_set = EpisodeSet(train_sources, Split.TRAIN, cfg.data.train_sampler, cfg.train.episodes, seed=cfg.seed,
                             image_size=cfg.data.image_size, per_source=False, augment=augment)
    first_task = start * batch
    loader = make_loader(Subset(episode_set, rank_tasks(cfg, first_task)),  # type: ignore[arg-type]
                         num_workers=cfg.data.num_workers)
    broadcast_module(learner)
    attach_grad_averaging(learner)
    hooks: list[Callable[..., None]] = []
    if is_main():  # probes, validation and checkpoints: rank 0 only
        hooks = [recorder.on_train_update, Validator(cfg, learner, train_sources, writer, device, precision,
                                                     ood_sources=[sources[n] for n in cfg.train.val_ood_sources]),
                 Checkpointer(cfg, learner, ckpt_dir)]

    def restore() -> None:
        assert position is not None
        load_training_checkpoint(ckpt_dir, position, learner, identity(cfg))
        log.info("Resumed meta-training after update %d (%d tasks).", position.update, first_task)

    meta_train(learner, loader, n_tasks=cfg.train.episodes, tasks_per_update=batch,
               device=device, precision=precision, log_every=cfg.train.log_every, on_log=writer.log_train,
               on_update=_hooks(*hooks), progress=progress,
               start_update=start, restore=restore if position is not None else None)
    if is_main():
        save_learner(learner, writer.run_dir / CHECKPOINT)
        total = -(-cfg.train.episodes // batch)
        mark_training_done(ckpt_dir, update=total, tasks=cfg.train.episodes, identity=identity(cfg))


def meta_batch(cfg: RunConfig) -> int:
    """Tasks per meta-update over all processes: ``train.tasks_per_update`` on each of them, as data-parallel
    training counts a batch per device (one process: the setting itself)."""
    return cfg.train.tasks_per_update * world_size()


def rank_tasks(cfg: RunConfig, first_task: int) -> list[int] | range:
    """Training-episode indices of this rank: its contiguous share of every meta-batch of one seeded stream."""
    if world_size() == 1:
        return range(first_task, cfg.train.episodes)
    per_update, share = meta_batch(cfg), cfg.train.tasks_per_update
    return [i for i in range(first_task, cfg.train.episodes) if (i % per_update) // share == rank()]
