"""Validation accuracy during meta-training, for learning curves and model selection.

Every ``train.val_every`` meta-updates the learner is evaluated zero-shot on fixed episodes from the
validation classes of the training sources (in-domain), and the mean accuracy with its 95% CI is
appended to ``train_log.jsonl`` as ``val_id`` / ``val_id_ci95`` (fractions), which the analysis
package draws as learning curves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from episodes.episode import Episode, Split
from episodes.loader import EpisodeSet
from episodes.readers.base import Source
from metabench.config import RunConfig
from metabench.engine import EvalContext, evaluate
from metabench.learners.base import Learner
from metabench.protocols import Protocol
from metabench.results import RunWriter, ci95

__all__ = ["Validator"]

log = logging.getLogger(__name__)


class Validator:
    """Callable as a ``meta_train`` ``on_update`` hook; a no-op when ``train.val_every`` is 0."""

    def __init__(self, cfg: RunConfig, learner: Learner, sources: Sequence[Source], writer: RunWriter,
                 device: torch.device, precision: str) -> None:
        self.every, self.learner, self.writer = cfg.train.val_every, learner, writer
        self.device, self.precision = device, precision
        usable = [s for s in sources if len(s.spec.class_ids(Split.VALID)) >= cfg.data.sampler.needed_ways]
        self.episodes: list[Episode] = []
        if self.every > 0 and usable:
            # A seed apart from the run's, so validation never replays an evaluation stream.
            episode_set = EpisodeSet(usable, Split.VALID, cfg.data.sampler, cfg.train.val_episodes,
                                     seed=cfg.seed + 7919, image_size=cfg.data.image_size, per_source=True)
            self.episodes = [episode_set[i] for i in range(len(episode_set))]
        elif self.every > 0:
            log.warning("train.val_every is set but no training source has a validation split; no validation.")
        self.ctx = EvalContext("validation", cfg.learner.name, cfg.backbone.name, {s.name: "id" for s in usable})

    def __call__(self, batch: Sequence[Episode], update: int, tasks_seen: int) -> None:
        if not self.episodes or update % self.every:
            return
        rows = list(evaluate(self.learner, self.episodes, self.ctx, protocols=[Protocol("zero_shot", 0)],
                             device=self.device, precision=self.precision, progress=False))
        self.learner.train()  # evaluate() switched to eval mode; meta-training goes on
        mean, half, n = ci95(r.accuracy for r in rows)
        self.writer.log_train({"update": update, "tasks": tasks_seen, "val_id": mean, "val_id_ci95": half,
                               "val_episodes": n})
