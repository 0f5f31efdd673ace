"""The ``Learner`` interface, and ``PrototypeLearner``, the prototype-based default most methods build on.

The learner owns its parameters and its update rule (it may run several optimisers, as SMAT
does); the engine owns loops, devices, seeds and I/O and never calls ``backward`` itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from episodes.episode import Episode, Support
from metabench.config import LearnerConfig
from metabench.nn.batchnorm import freeze_batchnorm_stats
from metabench.nn.heads import class_prototypes, cosine_logits, embed

if TYPE_CHECKING:
    from metabench.backbones import Backbone
    from metabench.finetuning import FineTuneOptions

__all__ = ["Learner", "LearnerConfig", "NotMetaTrainable", "ProtoState", "PrototypeLearner", "TaskState"]


class NotMetaTrainable(RuntimeError):
    """Raised by ``meta_train_step`` of a learner that has no meta-training phase (e.g. ``pre``)."""


@dataclass
class TaskState:
    """What ``adapt`` learned about one task; each learner may subclass it."""

    way: int


@dataclass
class ProtoState(TaskState):
    """Class prototypes in the feature space of a task model: the state of prototype-based learners."""

    prototypes: Tensor  # [way, d]
    model: nn.Module | None = None  # feature extractor for this task (None: the learner's backbone)
    sparsity: float = math.nan  # fraction of zero entries in the task update, when the learner has one


class Learner(nn.Module, ABC):
    """A few-shot learner on a backbone: the interface the engine calls.

    ``adapt`` fits one task from its support set (never changing the learner) and ``predict`` scores queries
    with the state it returns; both are required. A learner with a meta-training phase implements
    ``meta_train_step``; ``describe`` feeds the manifest. Subclasses set ``Config`` (a dataclass subclass of
    ``LearnerConfig``, configurable as ``learner.<key>=value``) and may declare capabilities: ``default_modes``
    and ``presets``. Most methods subclass ``PrototypeLearner`` instead, which implements adapt and predict.
    """

    Config: ClassVar[type[LearnerConfig]] = LearnerConfig
    #: Evaluation protocols run when the user leaves ``eval.modes`` unset (e.g. ``finetune``: "full").
    default_modes: ClassVar[tuple[str, ...]] = ("zero_shot",)
    #: ``learner.*`` settings per run preset (merged under the user's own), e.g. SMAT's CPU budget.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, backbone: Backbone, cfg: LearnerConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    @property
    def meta_trainable(self) -> bool:
        """True when the subclass implements ``meta_train_step``."""
        return type(self).meta_train_step is not Learner.meta_train_step

    def train(self, mode: bool = True) -> Learner:
        """Train mode, except BatchNorm layers when ``cfg.freeze_batchnorm`` (their statistics stay pretrained)."""
        super().train(mode)
        if mode and getattr(self.cfg, "freeze_batchnorm", False):
            freeze_batchnorm_stats(self)
        return self

    def setup_training(self, total_updates: int) -> None:
        """Called once before meta-training with the number of outer updates (for schedules)."""

    def _training_objects(self) -> dict[str, Any]:
        """Optimisers, LR schedulers and grad scalers held in attributes (also inside dicts and lists)."""
        kinds = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler)
        found: dict[str, Any] = {}
        for name, value in sorted(vars(self).items()):
            items = (value.items() if isinstance(value, dict) else enumerate(value)
                     if isinstance(value, (list, tuple)) else [(None, value)])
            for key, item in items:
                if isinstance(item, kinds):
                    found[name if key is None else f"{name}.{key}"] = item
        return found

    def training_state(self) -> dict[str, Any]:
        """What resuming meta-training needs beyond ``state_dict()``: the state of every optimiser, scheduler
        and grad scaler found among the attributes. Override (and call super) to add counters."""
        return {"objects": {name: obj.state_dict() for name, obj in self._training_objects().items()}}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Inverse of ``training_state``, after ``setup_training`` has built the schedulers."""
        objects = self._training_objects()
        saved = state.get("objects", {})
        if set(saved) != set(objects):
            raise ValueError(f'Saved training state has {sorted(saved)}, learner "{self.cfg.name}" has '
                             f"{sorted(objects)}; resume with the learner and options it was trained with.")
        for name, obj in objects.items():
            obj.load_state_dict(saved[name])

    def meta_train_step(self, episodes: Sequence[Episode]) -> dict[str, float]:
        """One outer update from a batch of training episodes, including backward and optimiser steps.

        Returns scalar metrics for the training log (e.g. ``{"loss": ..., "accuracy": ...}``).
        """
        raise NotMetaTrainable(f'Learner "{self.cfg.name}" has no meta-training phase; set train.episodes=0.')

    @abstractmethod
    def adapt(self, support: Support, *, mode: str = "zero_shot", steps: int = 0,
              options: FineTuneOptions | None = None) -> TaskState:
        """Fit one task from its support set without mutating the learner; ``steps=0`` is zero-shot.

        ``mode`` names an evaluation protocol ("zero_shot", or a fine-tuning protocol of
        ``metabench.finetuning``), which receives ``options``.
        """

    @abstractmethod
    def predict(self, state: TaskState, query_x: Tensor) -> Tensor:
        """Logits ``[n_query, way]`` for the query images under an adapted state."""

    def describe(self) -> dict[str, int | float | str]:
        """Scalars recorded in the run manifest (parameter counts, sparsity, number of experts, ...)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"learner": self.cfg.name, "parameters": total, "trainable_parameters": trainable}


class PrototypeLearner(Learner):
    """A learner that classifies by class prototypes in the feature space of a per-task model.

    ``task_model`` gives the feature extractor for a task (the backbone unless overridden), ``adapt`` builds
    class prototypes with it (after fine-tuning it on the support set when ``mode`` asks for it, under the
    ``full`` or ``lora`` protocol), and ``predict`` scores queries with ``logits``.
    """

    def task_model(self, support: Support) -> nn.Module:
        """The feature extractor specialised to this task, before any fine-tuning (must not modify self)."""
        return self.backbone

    def logits(self, features: Tensor, prototypes: Tensor) -> Tensor:
        """Classifier head on features: ``10 * cos(feature, prototype)`` unless overridden."""
        return cosine_logits(features.float(), prototypes, 10.0)

    def adapt(self, support: Support, *, mode: str = "zero_shot", steps: int = 0,
              options: FineTuneOptions | None = None) -> TaskState:
        """Prototypes of the (fine-tuned, when ``mode`` asks for it) task model's support features."""
        return self.prototype_state(self.task_model(support), support, mode=mode, steps=steps, options=options)

    def prototype_state(self, model: nn.Module, support: Support, *, mode: str = "zero_shot", steps: int = 0,
                        options: FineTuneOptions | None = None) -> ProtoState:
        """Fine-tune ``model`` on the support set when ``mode`` asks for it, then build class prototypes with it
        (for subclasses whose ``adapt`` builds the task model itself and returns more state)."""
        if mode != "zero_shot" and steps > 0:
            from metabench.finetuning import fine_tune

            model = fine_tune(self, model, support, mode=mode, steps=steps, options=options)
        with torch.no_grad():
            feats = embed(model, support.x).float()
        return ProtoState(way=support.way, prototypes=class_prototypes(feats, support.y, support.way), model=model)

    def predict(self, state: TaskState, query_x: Tensor) -> Tensor:
        """``logits`` of the query features against the state's prototypes."""
        if not isinstance(state, ProtoState):
            raise TypeError(f"{type(self).__name__}.predict got a {type(state).__name__}; override predict for it.")
        model = state.model if state.model is not None else self.backbone
        with torch.no_grad():
            return self.logits(embed(model, query_x), state.prototypes)
