"""The ``Learner`` interface: subclass it to plug a few-shot method into metabench.

The learner owns its parameters and its update rule (it may run several optimisers, as SMAT
does); the engine owns loops, devices, seeds and I/O and never calls ``backward`` itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from episodes.episode import Episode, Support
from metabench.config import LearnerConfig

if TYPE_CHECKING:
    from metabench.backbones import Backbone

__all__ = ["Learner", "LearnerConfig", "NotMetaTrainable", "TaskState", "ProtoState"]


class NotMetaTrainable(RuntimeError):
    """Raised by ``meta_train_step`` of a learner that has no meta-training phase (e.g. ``pre``)."""


@dataclass
class TaskState:
    """What ``adapt`` learned about one task; each learner may subclass it."""

    way: int


@dataclass
class ProtoState(TaskState):
    """Class prototypes in feature space, the state of every prototype-based learner."""

    prototypes: Tensor  # [way, d]


class Learner(nn.Module, ABC):
    """A few-shot learner on a backbone.

    Subclasses set ``Config`` (a dataclass subclass of ``LearnerConfig`` holding their options,
    configurable as ``learner.<key>=value``) and implement ``adapt`` and ``predict``; a learner
    with a meta-training phase also implements ``meta_train_step``.
    """

    Config: ClassVar[type[LearnerConfig]] = LearnerConfig

    def __init__(self, backbone: Backbone, cfg: LearnerConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    @property
    def meta_trainable(self) -> bool:
        """True when the subclass implements ``meta_train_step``."""
        return type(self).meta_train_step is not Learner.meta_train_step

    def meta_train_step(self, episodes: Sequence[Episode]) -> dict[str, float]:
        """One outer update from a batch of training episodes, including backward and optimiser steps.

        Returns scalar metrics for the training log (e.g. ``{"loss": ..., "accuracy": ...}``).
        """
        raise NotMetaTrainable(f'Learner "{self.cfg.name}" has no meta-training phase; set train.episodes=0.')

    @abstractmethod
    def adapt(self, support: Support, *, mode: str = "zero_shot", steps: int = 0) -> TaskState:
        """Fit one task from its support set without mutating the learner; ``steps=0`` is zero-shot."""

    @abstractmethod
    def predict(self, state: TaskState, query_x: Tensor) -> Tensor:
        """Logits ``[n_query, way]`` for the query images under an adapted state."""

    def describe(self) -> dict[str, int | float | str]:
        """Scalars recorded in the run manifest (parameter counts, sparsity, number of experts, ...)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"learner": self.cfg.name, "parameters": total, "trainable_parameters": trainable}
