"""``pmf``: ProtoNet meta-tuning of the whole backbone, the "M" of P>M>F (Hu et al., CVPR 2022).

Each training episode's query images are classified against prototypes of its support images with
PMF's cosine head ``scale * (cos + bias)`` (learnable scale, init 10, and bias, init 0); the loss is
query cross-entropy and every backbone weight trains, with AdamW and a cosine schedule after a linear
warm-up. PMF's "F" (test-time fine-tuning) is the generic ``full`` protocol of ``metabench.finetuning``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodes.episode import Episode
from metabench.learners import LEARNERS
from metabench.learners.base import LearnerConfig, PrototypeLearner
from metabench.nn.heads import CosineHead, class_prototypes, embed
from metabench.schedules import warmup_cosine

__all__ = ["PMF", "PMFConfig"]


@dataclass
class PMFConfig(LearnerConfig):
    # PMF used 5e-4 (AdamW, batch 1, 100 epochs x 2,000 episodes); 1e-4 is gentler on the short runs this
    # suite also makes, where a 5% warm-up lasts only a few updates. Set learner.lr=5e-4 for the paper.
    lr: float = 1e-4
    weight_decay: float = 0.05  # PMF's AdamW weight decay (not applied to biases, norms, scale and bias)
    warmup_fraction: float = 0.05  # PMF: 5 warm-up epochs of 100
    clip_grad: float | None = None  # max global gradient norm; None: no clipping (PMF's default)
    scale: float = 10.0  # initial cosine-logit temperature
    batch_size: int = 128  # images per backbone forward


def _param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying biases, norm gains or the head's scale would fight the loss."""
    decay = [p for _, p in params if p.ndim >= 2]
    plain = [p for _, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


@LEARNERS.register("pmf")
class PMF(PrototypeLearner):
    """Whole-backbone ProtoNet meta-tuning with a learnable cosine head."""

    Config = PMFConfig

    def __init__(self, backbone, cfg: PMFConfig) -> None:
        super().__init__(backbone, cfg)
        self.head = CosineHead(cfg.scale, learnable=True)
        self.configure_trainable()
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(_param_groups(trainable, cfg.weight_decay), lr=cfg.lr)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def configure_trainable(self) -> None:
        """Choose what meta-training updates (here: the whole backbone); subclasses narrow it."""
        self.backbone.requires_grad_(True)

    def setup_training(self, total_updates: int) -> None:
        warmup = max(1, round(self.cfg.warmup_fraction * total_updates)) if self.cfg.warmup_fraction > 0 else 0
        schedule = partial(warmup_cosine, warmup=warmup, total=total_updates)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def logits(self, features: Tensor, prototypes: Tensor) -> Tensor:
        return self.head(features.float(), prototypes)

    def episode_loss(self, episode: Episode) -> tuple[Tensor, float]:
        """Query cross-entropy against the support prototypes, and query accuracy."""
        model = self.task_model(episode.support)
        support = embed(model, episode.support_x, self.cfg.batch_size).float()
        prototypes = class_prototypes(support, episode.support_y, episode.way)
        logits = self.logits(embed(model, episode.query_x, self.cfg.batch_size), prototypes)
        accuracy = (logits.argmax(-1) == episode.query_y).float().mean().item()
        return F.cross_entropy(logits, episode.query_y), accuracy

    def meta_train_step(self, episodes: Sequence[Episode]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        losses, accuracies = [], []
        for episode in episodes:
            loss, accuracy = self.episode_loss(episode)
            (loss / len(episodes)).backward()
            losses.append(loss.item())
            accuracies.append(accuracy)
        metrics = {"loss": sum(losses) / len(losses), "accuracy": sum(accuracies) / len(accuracies),
                   "lr": self.optimizer.param_groups[0]["lr"], "scale": self.head.scale.item()}
        if self.cfg.clip_grad is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad).item()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return metrics
