"""A complete third-party learner in one file: copy it to start your own.

``protolinear``: a frozen backbone, a learned linear map of its features meta-trained episodically
(Euclidean prototypical loss), and prototypes in the mapped space at test time.

Use it from the command line with ``--plugin``:

    python -m metabench run --plugin examples/linear_probe_learner.py --learner protolinear \
        --backbone vit_test train.episodes=20

or from a package of your own through the ``metabench.learners`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodes.episode import Episode, Support
from metabench.learners import LEARNERS
from metabench.learners.base import LearnerConfig, PrototypeLearner
from metabench.nn.heads import class_prototypes, embed


@dataclass
class ProtoLinearConfig(LearnerConfig):  # its name comes from the registration below
    dim: int = 64  # size of the learned embedding
    lr: float = 1e-3


class _Projected(nn.Module):
    """Frozen backbone features through the learned linear map."""

    def __init__(self, backbone: nn.Module, proj: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.proj = backbone, proj

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            frozen = self.backbone(x)
        return self.proj(frozen.float())


@LEARNERS.register("protolinear")
class ProtoLinear(PrototypeLearner):
    """Frozen backbone + meta-trained linear map; Euclidean prototypes (an example plug-in)."""

    Config = ProtoLinearConfig

    def __init__(self, backbone, cfg: ProtoLinearConfig) -> None:
        super().__init__(backbone, cfg)
        self.backbone.requires_grad_(False)
        self.proj = nn.Linear(backbone.feature_dim, cfg.dim)
        self.optimizer = torch.optim.Adam(self.proj.parameters(), lr=cfg.lr)

    def task_model(self, support: Support) -> nn.Module:
        # The same model for every task; adapt() and predict() of the base class use it.
        return _Projected(self.backbone, self.proj)

    def logits(self, features: Tensor, prototypes: Tensor) -> Tensor:
        return -torch.cdist(features.float(), prototypes).pow(2)

    def meta_train_step(self, episodes: Sequence[Episode]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        losses, accs = [], []
        for ep in episodes:
            model = self.task_model(ep.support)
            protos = class_prototypes(embed(model, ep.support_x), ep.support_y, ep.way)
            logits = self.logits(embed(model, ep.query_x), protos)
            loss = F.cross_entropy(logits, ep.query_y)
            (loss / len(episodes)).backward()
            losses.append(loss.item())
            accs.append((logits.argmax(-1) == ep.query_y).float().mean().item())
        self.optimizer.step()
        return {"loss": sum(losses) / len(losses), "accuracy": sum(accs) / len(accs)}
