"""``pre``: the frozen pretrained backbone with a cosine prototype head (the SMAT paper's "Pre").

No meta-training: it is the reference every meta-tuned learner must beat, and it makes a run
meaningful with nothing but a backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from episodes.episode import Support
from metabench.learners import LEARNERS
from metabench.learners.base import Learner, LearnerConfig, ProtoState
from metabench.nn.heads import class_prototypes, cosine_logits, embed

__all__ = ["Pre", "PreConfig"]


@dataclass
class PreConfig(LearnerConfig):
    name: str = "pre"
    scale: float = 10.0  # cosine-logit temperature (10 as in PMF and SMAT)
    batch_size: int = 128  # images per backbone forward


@LEARNERS.register("pre")
class Pre(Learner):
    """Prototypes of frozen features; predictions are ``scale * cos(query, prototype)``."""

    Config = PreConfig

    def __init__(self, backbone, cfg: PreConfig) -> None:
        super().__init__(backbone, cfg)
        self.backbone.requires_grad_(False)

    @torch.no_grad()
    def adapt(self, support: Support, *, mode: str = "zero_shot", steps: int = 0) -> ProtoState:
        if mode != "zero_shot" or steps != 0:
            raise ValueError(f'Learner "pre" adapts zero-shot only (mode=zero_shot, steps=0), not mode={mode}, steps={steps}.')
        feats = embed(self.backbone, support.x, self.cfg.batch_size)
        return ProtoState(way=support.way, prototypes=class_prototypes(feats.float(), support.y, support.way))

    @torch.no_grad()
    def predict(self, state: ProtoState, query_x: Tensor) -> Tensor:
        feats = embed(self.backbone, query_x, self.cfg.batch_size)
        return cosine_logits(feats.float(), state.prototypes, self.cfg.scale)
