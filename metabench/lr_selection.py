"""Choosing the test-time fine-tuning learning rate without reading test query labels.

PMF and SMAT pick the learning rate of each dataset on the first few *test* episodes, scored with
their query labels; that leaks test labels into the reported accuracy. metabench offers:

- ``support``: per episode, hold out part of the support set (the last half of the images of every
  class with two or more), fine-tune on the rest with each learning rate of the grid, keep the one
  with the best held-out accuracy (ties: lower held-out loss, then the smaller rate), and fine-tune
  on the whole support set with it. PMF's ``finetune_autolr`` does the same with one image per class.
- ``valid``: per source and protocol, score each rate on a few validation-split episodes (their
  query labels belong to validation classes, never to test classes), before the test episodes;
  sources without a validation split (e.g. out-of-domain test-only sets) fall back to ``support``.
- ``fixed``: one rate for everything (``eval.lr``).

The default grid {0, 1e-5, 1e-4, 1e-3} brackets PMF's README rate (1e-4) by a decade each way and
keeps lr 0 (plain zero-shot) as a candidate, so selection can always decline to fine-tune. PMF's
1e-2 and SMAT's 1e-2/0.1 destroy a pretrained ViT under Adam within a few steps, and 1e-6 barely
moves it in 10-50 steps; LoRA runs at lr x lora_lr_scale, which shifts its grid to 1e-4..1e-2.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from episodes.episode import Episode, Support
from metabench.config import LR_SELECTIONS, EvalConfig
from metabench.finetuning import EvalProtocol, FineTuneOptions

if TYPE_CHECKING:
    from metabench.learners.base import Learner, TaskState

__all__ = ["LrSelector", "score_lrs", "select_lr_on_support", "split_support"]

log = logging.getLogger(__name__)

# A scoring task: fit on a support set, score on labelled images that are not test queries.
Task = tuple[Support, Tensor, Tensor]


def split_support(support: Support) -> Task | None:
    """Hold out the last ``n // 2`` images of each class with ``n >= 2`` support images.

    Returns (the remaining support set, held-out images, their labels), or None when every class has
    a single image (nothing can be held out). Deterministic: episodes are already random samples.
    """
    keep, held = [], []
    for label in range(support.way):
        idx = (support.y == label).nonzero().flatten()
        n_held = idx.numel() // 2
        keep.append(idx[: idx.numel() - n_held])
        held.append(idx[idx.numel() - n_held:])
    held_idx = torch.cat(held)
    if held_idx.numel() == 0:
        return None
    keep_idx = torch.cat(keep)
    return Support(support.x[keep_idx], support.y[keep_idx]), support.x[held_idx], support.y[held_idx]


def score_lrs(learner: Learner, tasks: Sequence[Task], *, protocol: EvalProtocol, options: FineTuneOptions,
              grid: Sequence[float]) -> dict[float, tuple[float, float]]:
    """Mean (accuracy, loss) over ``tasks`` of fine-tuning with each learning rate of ``grid``."""
    scores: dict[float, tuple[float, float]] = {}
    for lr in dict.fromkeys(float(v) for v in grid):
        accs, losses = [], []
        for support, x, y in tasks:
            state = learner.adapt(support, mode=protocol.mode, steps=steps_at(protocol, lr),
                                  options=options.with_lr(lr))
            with torch.no_grad():
                logits = learner.predict(state, x).float()
            accs.append((logits.argmax(-1) == y).float().mean().item())
            losses.append(F.cross_entropy(logits, y).item())
        scores[lr] = (sum(accs) / len(accs), sum(losses) / len(losses))
    return scores


def steps_at(protocol: EvalProtocol, lr: float) -> int:
    """Fine-tuning steps at ``lr``: none at lr 0, whose steps cannot move a weight (it is the zero-shot candidate)."""
    return protocol.steps if lr > 0 else 0


def best_lr(scores: dict[float, tuple[float, float]]) -> float:
    """Highest accuracy; ties go to the lower loss, then to the smaller (more conservative) rate."""
    def rank(lr: float) -> tuple[float, float, float]:
        accuracy, loss = scores[lr]
        return accuracy, -loss if math.isfinite(loss) else -math.inf, -lr

    return max(scores, key=rank)


def select_lr_on_support(learner: Learner, support: Support, *, protocol: EvalProtocol, options: FineTuneOptions,
                         grid: Sequence[float]) -> float | None:
    """The best rate of ``grid`` for this support set on a held-out part of it (None: nothing to hold out)."""
    task = split_support(support)
    if task is None:
        return None
    return best_lr(score_lrs(learner, [task], protocol=protocol, options=options, grid=grid))


class LrSelector:
    """Picks the learning rate of every fine-tuning adaptation and records the choices for the manifest.

    The engine calls ``adapt(learner, source, support, protocol)``: it sees a support set and the
    name of its source, never a query set.
    """

    def __init__(self, method: str, options: FineTuneOptions, grid: Sequence[float],
                 fixed: float | None = None) -> None:
        if method not in LR_SELECTIONS:  # a config's value is checked on loading; this one may come from code
            raise ValueError(f'lr selection method must be one of {", ".join(LR_SELECTIONS)}, not "{method}".')
        if method == "fixed" and fixed is None:
            raise ValueError("lr selection method fixed needs a learning rate (eval.lr).")
        self.method = "fixed" if fixed is not None else method
        self.options, self.grid, self.fixed = options, [float(v) for v in grid], fixed
        self._valid: dict[tuple[str, EvalProtocol], float] = {}
        self._record: dict[str, dict[str, dict[str, Any]]] = {}  # protocol label -> source -> entry
        self._support_counts: dict[tuple[str, EvalProtocol], Counter] = {}

    @classmethod
    def from_eval(cls, ev: EvalConfig, seed: int = 0) -> LrSelector:
        return cls(ev.lr_selection, FineTuneOptions.from_eval(ev, seed=seed), ev.lr_grid, ev.lr)

    @property
    def wants_validation(self) -> bool:
        return self.method == "valid"

    def fit_on_validation(self, learner: Learner, source: str, protocol: EvalProtocol,
                          episodes: Sequence[Episode]) -> float:
        """Choose the rate of ``source`` under ``protocol`` on its validation episodes (query labels allowed)."""
        if any(ep.split.value != "valid" for ep in episodes):
            raise ValueError("fit_on_validation takes validation-split episodes only; "
                             "test queries must not pick the lr.")
        tasks = [(ep.support, ep.query_x, ep.query_y) for ep in episodes]
        scores = score_lrs(learner, tasks, protocol=protocol, options=self.options, grid=self.grid)
        lr = best_lr(scores)
        self._valid[(source, protocol)] = lr
        self._entry(source, protocol).update(method="valid", lr=lr, episodes=len(episodes),
                                             accuracy={str(k): v[0] for k, v in scores.items()})
        log.info("lr for %s on %s: %g (validation accuracy %s)", protocol.label, source, lr,
                 ", ".join(f"{k:g}: {v[0]:.3f}" for k, v in scores.items()))
        return lr

    def lr_for(self, learner: Learner, source: str, support: Support, protocol: EvalProtocol) -> float:
        """The rate to fine-tune ``support`` with: fixed, chosen on validation episodes, or on the support set."""
        if self.fixed is not None:
            self._entry(source, protocol).update(method="fixed", lr=self.fixed)
            return self.fixed
        if (source, protocol) in self._valid:
            return self._valid[(source, protocol)]
        lr = select_lr_on_support(learner, support, protocol=protocol, options=self.options, grid=self.grid)
        counts = self._support_counts.setdefault((source, protocol), Counter())
        counts["fallback_zero_shot" if lr is None else f"{lr:g}"] += 1
        self._entry(source, protocol).update(method="support", chosen=dict(counts))
        return 0.0 if lr is None else lr

    def adapt(self, learner: Learner, source: str, support: Support, protocol: EvalProtocol) -> TaskState:
        """``learner.adapt`` under ``protocol``, with the learning rate chosen here."""
        if not protocol.fine_tunes:
            return learner.adapt(support, mode="zero_shot", steps=0)
        lr = self.lr_for(learner, source, support, protocol)
        return learner.adapt(support, mode=protocol.mode, steps=steps_at(protocol, lr),
                             options=self.options.with_lr(lr))

    def _entry(self, source: str, protocol: EvalProtocol) -> dict[str, Any]:
        return self._record.setdefault(protocol.label, {}).setdefault(source, {})

    def record(self) -> dict[str, Any]:
        """What was chosen, for ``manifest["lr_selection"]``: method, grid and per protocol and source."""
        return {"method": self.method, "grid": self.grid, "fixed": self.fixed,
                "options": {k: v for k, v in dataclasses.asdict(self.options).items() if k != "lr"},
                "protocols": self._record}
