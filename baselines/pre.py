"""``pre``: the frozen pretrained backbone with a cosine prototype head (the SMAT paper's "Pre").

No meta-training: it is the reference every meta-tuned learner must beat, and it makes a run
meaningful with nothing but a backbone. All of its behaviour is the ``PrototypeLearner`` default.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from metabench.learners import LEARNERS
from metabench.learners.base import LearnerConfig, PrototypeLearner
from metabench.nn.heads import cosine_logits

__all__ = ["Pre", "PreConfig"]


@dataclass
class PreConfig(LearnerConfig):
    scale: float = 10.0  # cosine-logit temperature (10 as in PMF and SMAT)


@LEARNERS.register("pre")
class Pre(PrototypeLearner):
    """Frozen pretrained backbone; prototypes of its features, logits ``scale * cos(query, prototype)``."""

    Config = PreConfig

    def __init__(self, backbone, cfg: PreConfig) -> None:
        super().__init__(backbone, cfg)
        self.backbone.requires_grad_(False)

    def logits(self, features: Tensor, prototypes: Tensor) -> Tensor:
        return cosine_logits(features.float(), prototypes, self.cfg.scale)
