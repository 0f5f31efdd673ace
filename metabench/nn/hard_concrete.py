"""The hard-concrete gate of SMAT's learned masks, eager and as fused kernels.

``hard_concrete`` and ``hard_concrete_backward`` are the eager gate and its gradient (Louizos et al., 2018: beta 2/3,
gamma -0.1, zeta 1.1). Elementwise masks on a ViT-S are 8 x 21.2M logits, and eager torch runs each step of the
gate, its gradient and the expected density as its own pass over them: about 30 passes per update, most of them
computing a sigmoid, which made the masks' bookkeeping as costly as the backbone's forward and backward.

``MaskKernels`` runs each of an update's jobs on one target's flattened ``[M, N]`` tensors as one fused loop
(``torch.compile``, dynamic in N): the training gates with their open count and expected density, the gate
gradient with the expected density's, and, for recomputed gates, the merge and its backward without any M x N
gate tensor. The jobs are plain tensor expressions of the same operations as the eager path; compiled, they agree
with it to float rounding (tested to 1e-6). Where no compiler works, the first use says so once and the eager
path runs instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["BETA", "GAMMA", "L0_SHIFT", "LOG_ALPHA_BOUND", "ZETA", "MaskKernels", "hard_concrete",
           "hard_concrete_backward"]

log = logging.getLogger(__name__)

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
LOG_ALPHA_BOUND = 4.61
L0_SHIFT = -BETA * math.log(-GAMMA / ZETA)  # P(gate > 0) = sigmoid(log_alpha + L0_SHIFT); about 1.599


def hard_concrete(log_alpha: Tensor, noise: Tensor | None = None, beta: float = BETA) -> Tensor:
    """Hard-concrete gate in [0, 1]; ``noise`` is logistic noise log(u) - log(1 - u) (None: deterministic)."""
    x = log_alpha if noise is None else log_alpha + noise
    if torch.is_grad_enabled() and x.requires_grad:
        return (torch.sigmoid(x / beta) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
    # No graph to record: the same operations in place on one buffer (M x |theta| floats on a ViT-S).
    return (x / beta).sigmoid_().mul_(ZETA - GAMMA).add_(GAMMA).clamp_(0.0, 1.0)


def hard_concrete_backward(grad: Tensor, log_alpha: Tensor, noise: Tensor | None = None,
                           beta: float = BETA) -> Tensor:
    """``grad`` times the Jacobian of ``hard_concrete`` at ``log_alpha``: the operations autograd would
    run, without recording the forward graph (three buffers instead of about ten). Overwrites ``grad``."""
    x = log_alpha if noise is None else log_alpha + noise
    s = (x / beta).sigmoid_()
    pre = s * (ZETA - GAMMA) + GAMMA  # the clamp passes gradient where 0 <= pre <= 1
    grad.masked_fill_((pre >= 0.0).logical_and_(pre <= 1.0).logical_not_(), 0.0)
    del pre
    return torch.ops.aten.sigmoid_backward(grad.mul_(ZETA - GAMMA), s).div_(beta)


# -- the jobs: one target's mask logits [M, *mask_shape] (noise and gate gradients alike), and for elementwise masks
# its delta and update gradient [*mask_shape]; alpha and per-expert scales [M]. Inputs are taken whole and flattened
# inside (a flattened view as input would make torch.compile guard on its base's layout, one graph per target shape).

def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _sigmoid_and_pre(log_alpha: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    x = _rows(log_alpha) if noise is None else _rows(log_alpha) + _rows(noise)
    s = torch.sigmoid(x / BETA)
    return s, s * (ZETA - GAMMA) + GAMMA


def _gate_gradient(grad_gate: Tensor, s: Tensor, pre: Tensor) -> Tensor:
    """dL/dlog_alpha from dL/dz (rows): zero where the clamp is active, else through the stretched sigmoid."""
    inside = (pre >= 0.0) & (pre <= 1.0)
    return torch.where(inside, grad_gate * (ZETA - GAMMA) * (1.0 - s) * s / BETA, 0.0)


def _density_gradient(log_alpha: Tensor, scale: Tensor) -> Tensor:
    """dL/dlog_alpha (rows) of the expected density's sum, ``scale`` [M] its gradient per expert and entry."""
    p_open = torch.sigmoid(_rows(log_alpha) + L0_SHIFT)
    return scale[:, None] * (1.0 - p_open) * p_open


def _counts_job(log_alpha: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """(open training gates per expert, sum of P(z > 0) per expert): the measured and the expected density."""
    _, pre = _sigmoid_and_pre(log_alpha, noise)
    return (pre > 0).sum(1, dtype=torch.int32), torch.sigmoid(_rows(log_alpha) + L0_SHIFT).sum(1)


def _merge_job(log_alpha: Tensor, noise: Tensor | None, alpha: Tensor, delta: Tensor) -> Tensor:
    """The task's update (sum_m alpha_m z_m) * delta, the gates made on the fly."""
    _, pre = _sigmoid_and_pre(log_alpha, noise)
    return ((alpha[:, None] * pre.clamp(0.0, 1.0)).sum(0) * delta.reshape(-1)).view(delta.shape)


def _merge_grads_job(log_alpha: Tensor, noise: Tensor | None, alpha: Tensor, delta: Tensor,
                     grad: Tensor) -> tuple[Tensor, Tensor]:
    """(dL/ddelta, dL/dalpha) of ``_merge_job`` given dL/du, the gates made again on the fly."""
    _, pre = _sigmoid_and_pre(log_alpha, noise)
    z = pre.clamp(0.0, 1.0)
    grad_mask = (grad * delta).reshape(-1)
    return (grad.reshape(-1) * (alpha[:, None] * z).sum(0)).view(delta.shape), (z * grad_mask).sum(1)


def _flush_job(log_alpha: Tensor, noise: Tensor | None, alphas: Tensor, grad_masks: Tensor, scale: Tensor) -> Tensor:
    """The mask logits' gradient of an update: its tasks' dL/dz_m = sum_t alpha_tm dL/d(merged mask_t) (``alphas``
    [T, M], ``grad_masks`` [T, *mask_shape]) through the gate, plus the expected density's (``scale`` [M])."""
    s, pre = _sigmoid_and_pre(log_alpha, noise)
    grad_gate = (alphas[:, :, None] * grad_masks.reshape(grad_masks.shape[0], 1, -1)).sum(0)
    return (_gate_gradient(grad_gate, s, pre) + _density_gradient(log_alpha, scale)).view(log_alpha.shape)


_JOBS: dict[str, Callable[..., Any]] = {"counts": _counts_job, "merge": _merge_job, "merge_grads": _merge_grads_job,
                                        "flush": _flush_job}
_COMPILED: dict[str, Callable[..., Any]] = {}  # one compiled function per job, shared by every MaskKernels


def _compiled(name: str) -> Callable[..., Any]:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_JOBS[name], dynamic=True, fullgraph=True)
    return _COMPILED[name]


def _probe_inputs(job: str, device: torch.device, noise: bool) -> tuple[Any, ...]:
    """Small inputs of every job's signature (sizes above 1, so the compiled graph stays dynamic in them)."""
    m, shape = 3, (5, 7)  # a Linear weight's elementwise masks
    la, vec = torch.randn(m, *shape, device=device), torch.randn(shape, device=device)
    per_expert, eps = torch.rand(m, device=device), torch.randn(m, *shape, device=device) if noise else None
    tasks = 2
    return {"counts": (la, eps), "merge": (la, eps, per_expert, vec), "merge_grads": (la, eps, per_expert, vec, vec),
            "flush": (la, eps, torch.rand(tasks, m, device=device), torch.randn(tasks, *shape, device=device),
                      per_expert)}[job]


class MaskKernels:
    """The fused mask jobs, compiled on first use per device; ``ready(device)`` is False where compiling failed
    (the caller then runs the eager path), and says why once."""

    def __init__(self, noise: bool = False) -> None:
        self.noise = noise
        self._ready: dict[str, bool] = {}

    def ready(self, device: torch.device) -> bool:
        """Whether the compiled jobs run on ``device``: the first call compiles them on small inputs."""
        key = str(device)
        if key not in self._ready:
            try:
                with torch.no_grad():
                    for job in _JOBS:
                        _compiled(job)(*_probe_inputs(job, device, self.noise))
                self._ready[key] = True
            except Exception as error:  # no C++ compiler or Triton: the eager path gives the same numbers, slower
                log.warning("Fused mask kernels could not be compiled on %s (%s: %s); the masks run eagerly "
                            "(learner.mask_kernels=eager silences this).", key, type(error).__name__,
                            str(error).splitlines()[0] if str(error) else "")
                self._ready[key] = False
        return self._ready[key]

    def __call__(self, job: str, *args: Any) -> Any:
        """Run ``job`` (a key of the module's job table) compiled; call ``ready`` first."""
        return _compiled(job)(*args)
