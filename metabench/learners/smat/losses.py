"""Loss pieces of SMAT meta-training (arXiv:2403.08477): distillation, the sparsity Lagrangian, schedules.

Kept apart from the learner so each piece can be read (and tested) on its own.

Sparsity constraint, per expert m (``scope="expert"``) or on the mean over experts (``"global"``,
SIMoE's single target): measured density rho_m = #(z_m != 0) / |theta| <= 1 - tau.

* Masks minimise ``mean_m sg(lambda_m) * (E||z_m||_0 / |theta| - (1 - tau))``, where the expected L0 of
  a hard-concrete gate is sigmoid(log_alpha + 1.599) (a smooth surrogate of the hard count).
* Multipliers take gradient ascent on the *measured* violation, ``lambda_m += lr * (rho_m - (1 - tau))``,
  and drop to 0 as soon as the expert is sparse enough (``reset``, as upstream) or, optionally, decay by
  projected ascent (``lambda_m >= 0``). Reset is the default for a reason: with noise-free gates a
  closed gate gets no task gradient (the hard-concrete clamp is flat below log_alpha = -1.6), so
  every gate the penalty closes past the target stays closed; a multiplier that lingers after the
  constraint holds keeps closing gates (on a toy problem projected ascent overshot tau = 0.9 to 0.99).

Expert weights (``weights`` of ``penalty`` and ``ascend``): ``None`` weighs every expert alike (the
penalty is the mean over experts, the ascent unweighted: the constraint holds for every expert whether
a task uses it or not). Upstream's code weighs both terms of expert m by the task's merge weight
alpha_m, detached, per task, then averages over the meta-batch; passing the batch mean of alpha gives
the same gradients (penalty sum_m alpha_m sg(lambda_m) slack_m, ascent lambda_m += lr alpha_m violation),
so with alpha near 1/M the multipliers rise about M times slower than unweighted.

Schedules: ``warmup_cosine`` (linear warm-up, cosine to 0: ours) and ``upstream_epochs`` (upstream's
``get_cosine_schedule_with_warmup(5, 50)`` stepped once per epoch, with the first epoch at lr 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metabench.schedules import warmup_cosine

__all__ = ["KD_DIRECTIONS", "KdDirection", "LagrangianSparsity", "UpstreamEpochs", "distillation", "make_schedulers"]

#: ``teacher_student``: KL(teacher || student), the usual distillation direction (default);
#: ``student_teacher``: KL(student || teacher), what upstream's ``F.kl_div`` call computes.
KdDirection = Literal["teacher_student", "student_teacher"]
KD_DIRECTIONS: tuple[str, ...] = get_args(KdDirection)


def distillation(student: Tensor, teacher: Tensor, temperature: float, direction: str = "teacher_student") -> Tensor:
    """``T^2 * KL`` between tempered softmaxes of logits ``[n, way]``, mean over the n queries."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    if direction == "teacher_student":
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")  # sum p_t (log p_t - log p_s)
    elif direction == "student_teacher":
        kl = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")  # sum p_s (log p_s - log p_t)
    else:
        raise ValueError(f'Unknown distillation direction "{direction}"; use one of {", ".join(KD_DIRECTIONS)}.')
    return temperature**2 * kl


class LagrangianSparsity(nn.Module):
    """Lagrange multipliers (one per expert, or one in all) for "each expert keeps at most 1 - tau".

    The multipliers are parameters so that checkpoints keep them and the contract counts them as
    trainable; they never receive autograd gradients (the penalty uses them detached).
    """

    def __init__(self, n_experts: int, tau: float, scope: str = "expert") -> None:
        super().__init__()
        if scope not in ("expert", "global"):
            raise ValueError(f'Sparsity scope must be "expert" or "global", not "{scope}".')
        self.tau, self.scope = float(tau), scope
        self.target = float(tau)  # the sparsity asked for now; ramps up to tau under set_progress
        self.multipliers = nn.Parameter(torch.zeros(n_experts if scope == "expert" else 1))

    def set_progress(self, progress: float) -> None:
        """Ramp the target as tau * (1 - (1 - p)^3) (Zhu & Gupta's gradual pruning) for p in [0, 1].

        Asking for all of tau at once lets the multipliers grow while the masks lag behind, until
        every gate closes in one step (with noise-free gates, a closed gate never reopens).
        """
        p = min(max(progress, 0.0), 1.0)
        self.target = self.tau * (1.0 - (1.0 - p) ** 3)

    def _pooled(self, density: Tensor) -> Tensor:
        return density if self.scope == "expert" else density.mean(0, keepdim=True)

    def penalty(self, expected_density: Tensor, weights: Tensor | None = None) -> Tensor:
        """Mask penalty from the differentiable expected density ``[M]``: the mean over experts, or with
        ``weights`` ``[M]`` (upstream: the batch mean of alpha, detached) their weighted sum."""
        slack = self._pooled(expected_density) - (1.0 - self.target)
        terms = self.multipliers.detach().to(slack.dtype) * slack
        return terms.mean() if weights is None else (self._weights(weights).to(terms) * terms).sum()

    def _weights(self, weights: Tensor) -> Tensor:
        if self.scope != "expert":
            raise ValueError('Alpha-weighted sparsity terms need learner.sparsity_scope=expert (one multiplier '
                             'per expert); set learner.constraint_weighting=uniform for the global scope.')
        return weights.detach().to(self.multipliers.device, self.multipliers.dtype)

    @torch.no_grad()
    def ascend(self, measured_density: Tensor, lr: float, reset: bool = True, weights: Tensor | None = None) -> None:
        """One ascent step on the measured violation (rho - (1 - tau)), times ``weights`` ``[M]`` when given;
        a satisfied multiplier drops to 0 (``reset``) or decays by projected ascent."""
        density = self._pooled(measured_density.to(self.multipliers.device, self.multipliers.dtype))
        violation = density - (1.0 - self.target)
        step = violation if weights is None else self._weights(weights) * violation
        self.multipliers.add_(lr * step).clamp_(min=0.0)
        if reset:
            self.multipliers.masked_fill_(violation <= 0, 0.0)


class UpstreamEpochs:
    """Upstream's learning-rate factor per update: epochs of ``updates_per_epoch`` updates, the first at an
    absolute ``first_lr`` (``None``: factor 0, as the router's optimiser gets), then linear warm-up over
    ``warmup`` epochs and cosine over ``total`` epochs, held constant within an epoch.

    Upstream trains ViT-S for 25 of the 50 epochs its schedule spans, so the factor ends near 0.62.
    ``__call__(update, base_lr)`` returns the factor for a group whose configured rate is ``base_lr``.
    """

    def __init__(self, updates_per_epoch: float, *, warmup: int = 5, total: int = 50,
                 first_lr: float | None = 1e-6) -> None:
        self.updates_per_epoch = max(updates_per_epoch, 1e-9)
        self.warmup, self.total, self.first_lr = warmup, total, first_lr

    def epoch(self, update: int) -> int:
        return int(update // self.updates_per_epoch)

    def factor(self, update: int) -> float:
        """The schedule's factor, before the first-epoch override."""
        e = self.epoch(update)
        if e < self.warmup:
            return e / max(1, self.warmup)
        progress = (e - self.warmup) / max(1, self.total - self.warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    def __call__(self, update: int, base_lr: float) -> float:
        if self.epoch(update) == 0 and self.first_lr is not None:
            return self.first_lr / base_lr if base_lr > 0 else 0.0
        return self.factor(update)


def _upstream_factor(update: int, *, schedule: UpstreamEpochs, base_lr: float) -> float:
    return schedule(update, base_lr)


def make_schedulers(optimizers: Mapping[str, torch.optim.Optimizer], cfg: Any,
                    total_updates: int) -> tuple[list[torch.optim.lr_scheduler.LambdaLR], Callable[[int], float]]:
    """SMAT's learning-rate schedulers (one per optimiser) and the multipliers' rate factor per update.

    ``warmup_cosine``: linear warm-up over ``cfg.warmup_fraction``, cosine to 0, multipliers at a constant
    rate. ``upstream_epochs``: every group, multipliers included, on ``UpstreamEpochs`` with the run split
    into ``cfg.schedule_epochs`` epochs (the router's first epoch at factor 0).
    """
    LambdaLR = torch.optim.lr_scheduler.LambdaLR
    if cfg.schedule == "warmup_cosine":
        warmup = max(1, round(cfg.warmup_fraction * total_updates)) if cfg.warmup_fraction > 0 else 0
        schedule = partial(warmup_cosine, warmup=warmup, total=max(1, total_updates))
        return [LambdaLR(opt, schedule) for opt in optimizers.values()], lambda update: 1.0
    per_epoch = total_updates / cfg.schedule_epochs
    main = UpstreamEpochs(per_epoch, warmup=cfg.schedule_warmup_epochs, total=cfg.schedule_total_epochs,
                          first_lr=cfg.schedule_first_lr)
    router = UpstreamEpochs(per_epoch, warmup=cfg.schedule_warmup_epochs, total=cfg.schedule_total_epochs,
                            first_lr=None)
    schedulers = [LambdaLR(opt, [partial(_upstream_factor, schedule=router if name == "router" else main,
                                         base_lr=group["lr"]) for group in opt.param_groups])
                  for name, opt in optimizers.items()]
    return schedulers, partial(_upstream_factor, schedule=main, base_lr=cfg.lambda_lr)
