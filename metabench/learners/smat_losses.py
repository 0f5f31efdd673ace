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

Differences from the upstream code: the penalty is not weighted by the task's alpha (the constraint
holds for every expert whether a task uses it or not, and alpha gets no gradient from it), and it is
computed once per meta-update rather than per task.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KD_DIRECTIONS", "LagrangianSparsity", "distillation", "warmup_cosine"]

#: ``teacher_student``: KL(teacher || student), the usual distillation direction (default);
#: ``student_teacher``: KL(student || teacher), what upstream's ``F.kl_div`` call computes.
KD_DIRECTIONS: tuple[str, ...] = ("teacher_student", "student_teacher")


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

    def penalty(self, expected_density: Tensor) -> Tensor:
        """Mask penalty from the differentiable expected density ``[M]``."""
        slack = self._pooled(expected_density) - (1.0 - self.target)
        return (self.multipliers.detach().to(slack.dtype) * slack).mean()

    @torch.no_grad()
    def ascend(self, measured_density: Tensor, lr: float, reset: bool = True) -> None:
        """One ascent step on the measured violation (rho - (1 - tau)); a satisfied multiplier drops to 0
        (``reset``) or decays by projected ascent."""
        density = self._pooled(measured_density.to(self.multipliers.device, self.multipliers.dtype))
        violation = density - (1.0 - self.target)
        self.multipliers.add_(lr * violation).clamp_(min=0.0)
        if reset:
            self.multipliers.masked_fill_(violation <= 0, 0.0)


def warmup_cosine(update: int, *, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` updates, then cosine decay to 0 at ``total``."""
    if update < warmup:
        return (update + 1) / warmup
    progress = (update - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
