"""SMAT's evaluation: a task's model from the router's alpha and the cached merge of the experts, a view of the
backbone for zero-shot tasks and a dense copy for fine-tuning, kept out of ``model.py`` (a mixin of ``SMAT``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from episodes.episode import Support
from metabench.learners.base import ProtoState, TaskState
from metabench.nn.expert_merge import EvaluationMerge, MergedView

if TYPE_CHECKING:
    from metabench.learners.smat.model import SMAT

__all__ = ["SMATEvaluation", "SMATState"]


@dataclass
class SMATState(ProtoState):
    """A SMAT task: the merged (and possibly fine-tuned) model, its prototypes and the router's alpha."""

    expert_scores: Tensor | None = None  # alpha [M]


class SMATEvaluation:
    """Mixin for ``SMAT``: adapt to a task's support set (router, merge, prototypes) and the evaluation merge's
    cache, forgotten whenever the experts' tensors change."""

    def expert_scores(self: SMAT, support: Support) -> Tensor:
        """Evaluation merge weights alpha ``[M]`` for a task (sigmoid of the router logits, normalised)."""
        with torch.no_grad():
            prototypes = self._pretrained_prototypes(support.x, support.y, support.way)
            return self.router.alpha(prototypes, self.temperature(), sample=False)[0].float()

    def _evaluation_merge(self: SMAT) -> EvaluationMerge:
        """What every evaluation task's merge shares, computed once until the experts change (for elementwise
        masks on a ViT-S, recomputing the gates alone cost half a forward pass of a 75-image episode)."""
        if self._eval_merge is None:
            self._eval_merge = EvaluationMerge(self.experts)
        return self._eval_merge

    def invalidate_caches(self: SMAT) -> None:
        """Forget the evaluation merge: called by every update, state load and device move; call it after
        editing the delta or the mask logits by hand."""
        self._eval_merge = None

    def load_state_dict(self: SMAT, *args: Any, **kwargs: Any) -> Any:
        self.invalidate_caches()
        return super().load_state_dict(*args, **kwargs)

    def _apply(self: SMAT, fn: Any, *args: Any, **kwargs: Any) -> SMAT:  # .to(), .cuda(), .half(): new tensors
        self.invalidate_caches()
        return super()._apply(fn, *args, **kwargs)

    def _merged(self: SMAT, alpha: Tensor) -> tuple[dict[str, Tensor], float]:
        """Merged targeted weights and the share of targeted entries the task's merged mask zeroes."""
        merge = self._evaluation_merge()
        return merge.merged(self._base(), alpha), merge.zero_fraction(alpha)

    def _task(self: SMAT, support: Support, *, copy_model: bool = True) -> tuple[nn.Module, Tensor, float]:
        """(the backbone holding theta_i: a dense copy, or a ``MergedView`` when ``copy_model`` is False; the task's
        expert weights; its merged-mask sparsity)."""
        alpha = self.expert_scores(support)
        theta, sparsity = self._merged(alpha)
        if not copy_model:
            return MergedView(self.backbone, theta), alpha, sparsity
        # The copy takes the merged tensors as its parameters instead of copying the frozen ones and overwriting them.
        memo: dict[int, Any] = {id(p): nn.Parameter(theta[n], requires_grad=False)
                                for n, p in self.backbone.named_parameters() if n in theta}
        model = copy.deepcopy(self.backbone, memo)
        return model.requires_grad_(False), alpha, sparsity

    def task_model(self: SMAT, support: Support) -> nn.Module:
        """A dense copy of the backbone holding theta_i, so fine-tuning protocols can deep-copy and train it."""
        return self._task(support)[0]

    def adapt(self: SMAT, support: Support, *, mode: str = "zero_shot", steps: int = 0,
              options: Any = None) -> TaskState:
        fine_tunes = mode != "zero_shot" and steps > 0  # as prototype_state decides: only then train a copy
        model, alpha, sparsity = self._task(support, copy_model=fine_tunes)
        state = self.prototype_state(model, support, mode=mode, steps=steps, options=options)
        return SMATState(state.way, state.prototypes, state.model, sparsity, alpha)
