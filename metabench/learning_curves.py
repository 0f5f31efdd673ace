"""Validation accuracy during meta-training, for learning curves (SMAT Fig. 1) and the speed-up analysis.

Every ``train.val_every`` meta-updates the learner is evaluated zero-shot on fixed episodes and the
mean accuracy with its 95% CI is appended to ``train_log.jsonl`` (fractions):

- ``val_id``: the validation classes of the training sources (in-domain);
- ``val_ood``: the sources listed in ``train.val_ood_sources``, from their validation split when it has
  enough classes, else from their test split (out-of-domain sets such as MNIST have nothing else).
  Those episodes come from a seed stream of their own, and the curves only monitor training: no
  checkpoint or hyper-parameter is chosen on them, so the reported test accuracies stay clean.
  ``val_ood_splits`` records which split each source used (``mnist:test,...``).
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
from metabench.finetuning import EvalProtocol
from metabench.learners.base import Learner
from metabench.results import RunWriter
from metabench.stats import ci95

__all__ = ["Validator"]

log = logging.getLogger(__name__)
_VAL_SEED_OFFSET = 7919  # apart from the run's seed, so validation never replays an evaluation stream


class Validator:
    """Callable as a ``meta_train`` ``on_update`` hook; a no-op when ``train.val_every`` is 0."""

    def __init__(self, cfg: RunConfig, learner: Learner, sources: Sequence[Source], writer: RunWriter,
                 device: torch.device, precision: str, ood_sources: Sequence[Source] = ()) -> None:
        self.every, self.learner, self.writer = cfg.train.val_every, learner, writer
        self.device, self.precision = device, precision
        self.sets: dict[str, list[Episode]] = {}
        self.ood_splits: dict[str, str] = {}
        if self.every <= 0:
            return
        ways = cfg.data.sampler.needed_ways
        usable = [s for s in sources if len(s.spec.class_ids(Split.VALID)) >= ways]
        if usable:
            self.sets["val_id"] = self._episodes(cfg, [(s, Split.VALID) for s in usable], offset=0)
        else:
            log.warning("train.val_every is set but no training source has a validation split; no ID validation.")
        picked = []
        for s in ood_sources:
            split = next((sp for sp in (Split.VALID, Split.TEST) if len(s.spec.class_ids(sp)) >= ways), None)
            if split is None:
                raise ValueError(f'train.val_ood_sources: source "{s.name}" has fewer than {ways} classes in its '
                                 "validation and test splits; drop it or lower data.sampler ways.")
            picked.append((s, split))
            self.ood_splits[s.name] = split.value
        if picked:
            self.sets["val_ood"] = self._episodes(cfg, picked, offset=1)
        self.ctx = EvalContext("validation", cfg.learner.name, cfg.backbone.name,
                               {s.name: "id" for s in usable} | {s.name: "ood" for s, _ in picked})

    @staticmethod
    def _episodes(cfg: RunConfig, picked: Sequence[tuple[Source, Split]], offset: int) -> list[Episode]:
        episodes: list[Episode] = []
        for source, split in picked:
            episode_set = EpisodeSet([source], split, cfg.data.sampler, cfg.train.val_episodes,
                                     seed=cfg.seed + _VAL_SEED_OFFSET + offset, image_size=cfg.data.image_size,
                                     per_source=True)
            episodes += [episode_set[i] for i in range(len(episode_set))]
        return episodes

    def __call__(self, batch: Sequence[Episode], update: int, tasks_seen: int) -> None:
        if not self.sets or update % self.every:
            return
        record: dict = {"update": update, "tasks": tasks_seen}
        for key, episodes in self.sets.items():
            rows = list(evaluate(self.learner, episodes, self.ctx, protocols=[EvalProtocol("zero_shot", 0)],
                                 device=self.device, precision=self.precision, progress=False))
            mean, half, n = ci95(r.accuracy for r in rows)
            record.update({key: mean, f"{key}_ci95": half, f"{key}_episodes": n})
        if self.ood_splits:
            record["val_ood_splits"] = ",".join(f"{k}:{v}" for k, v in self.ood_splits.items())
        self.learner.train()  # evaluate() switched to eval mode; meta-training goes on
        self.writer.log_train(record)
