"""``finetune``: no meta-tuning; the pretrained backbone fine-tuned on each task's support set.

The SMAT paper's "Pre+full" column. The learner is ``pre`` (frozen backbone, cosine prototypes)
with a different default protocol: when ``eval.modes`` is unset it evaluates with ``full``
fine-tuning (``metabench.finetuning``) for ``eval.steps`` steps, so a run of ``--learner finetune``
means what its name says. ``mode="zero_shot"`` still works and equals ``pre``.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.pre import Pre, PreConfig
from metabench.learners import LEARNERS

__all__ = ["FineTune", "FineTuneConfig"]


@dataclass
class FineTuneConfig(PreConfig):
    """``pre``'s options: the learners differ only in their default protocol."""


@LEARNERS.register("finetune")
class FineTune(Pre):
    """Pretrained backbone, fully fine-tuned per task at test time."""

    Config = FineTuneConfig
    default_modes = ("full",)
