"""The learner registry. Comparison learners live in ``baselines/`` and register lazily here."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from episodes.registry import Registry

if TYPE_CHECKING:
    from metabench.backbones import Backbone
    from metabench.config import LearnerConfig
    from metabench.learners.base import Learner

__all__ = ["LEARNERS", "create_learner", "learner_config_class", "list_learners"]

def _is_learner(obj: object) -> str | None:
    from metabench.learners.base import Learner  # here: importing the registry stays torch-free

    if isinstance(obj, type) and issubclass(obj, Learner):
        return None
    return f"{obj!r} is not a subclass of metabench.learners.base.Learner; subclass it (or PrototypeLearner)."


#: name -> Learner subclass. Outside packages add theirs through the ``metabench.learners`` entry-point group.
LEARNERS: Registry[type[Learner]] = Registry("learner", entry_point_group="metabench.learners", check=_is_learner)
LEARNERS.register("pre", "baselines.pre:Pre")
LEARNERS.register("pmf", "baselines.pmf:PMF")
LEARNERS.register("lora", "baselines.lora:LoRA")
LEARNERS.register("finetune", "baselines.finetune:FineTune")
LEARNERS.register("smat", "metabench.learners.smat.model:SMAT")
LEARNERS.register("softmerge", "metabench.learners.smat.ablations:SoftMerge")
LEARNERS.register("smat_random", "metabench.learners.smat.ablations:SMATRandom")
LEARNERS.register("smat_magnitude", "metabench.learners.smat.ablations:SMATMagnitude")


def list_learners() -> list[str]:
    return LEARNERS.names()


def learner_config_class(name: str) -> type[LearnerConfig]:
    """The config dataclass of learner ``name`` (raises a did-you-mean error for unknown names)."""
    return LEARNERS.get(name).Config


def create_learner(name: str, backbone: Backbone, cfg: LearnerConfig | None = None) -> Learner:
    """Learner ``name`` on ``backbone``; ``cfg`` (default: its ``Config()``) gets ``name`` when it has none, as the
    registry name is the only place a learner is named."""
    cls = LEARNERS.get(name)
    cfg = cfg if cfg is not None else cls.Config()
    return cls(backbone, cfg if cfg.name else dataclasses.replace(cfg, name=name))
