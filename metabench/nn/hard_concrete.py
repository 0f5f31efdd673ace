"""The hard-concrete gate of SMAT's learned masks, eager and as fused kernels.

``hard_concrete`` and ``hard_concrete_backward`` are the eager gate and its gradient (Louizos et al., 2018: beta 2/3,
gamma -0.1, zeta 1.1). Elementwise masks on a ViT-S are 8 x 21.2M logits, and eager torch runs each step of the
gate, its gradient and the expected density as its own pass over them: about 30 passes per update, most of them
computing a sigmoid, which made the masks' bookkeeping as costly as the backbone's forward and backward.

``MaskKernels`` runs each of an update's jobs on one target's ``[M, *mask_shape]`` tensors as fused loops
(``torch.compile``, dynamic in the mask shape, one pass per expert): the training gates' open count and expected
density, the merge and its backward with the gates made on the fly (no M x |theta| gate tensor), the gate gradient
with the expected density's, and the masks' clipped SGD step with its clamp. The jobs are plain tensor
expressions of the eager path's functions, arranged for a CPU's arithmetic (one exponential serves a noise-free
gate and its density, multiplications replace divisions: 0.40 -> 0.29 s per ViT-S update for the three gate jobs);
compiled, they agree with it to float rounding (tested to 1e-6 elementwise). Where no compiler works, the first
use says so once and the eager path runs instead.
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
# The fused jobs multiply by these instead of dividing by beta: on a CPU a vector division costs several
# multiplications, and these jobs are bound by their arithmetic per mask entry
_INV_BETA = 1.0 / BETA
_GATE_SLOPE = (ZETA - GAMMA) / BETA  # d gate / d x inside the clamp, over s (1 - s)
_EXP_NEG_SHIFT = math.exp(-L0_SHIFT)


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
# its delta and update gradient [*mask_shape]; alpha and per-expert scales [M]; a flush's tasks' alphas [T, M] and
# update gradients [T, *mask_shape]. Each job loops over the experts (and a flush over its tasks) in Python, so
# torch.compile unrolls the loop with M (and T) fixed and each expert's work is one contiguous pass in one kernel:
# a reduction over the leading M axis with M dynamic compiled to strided loops 2-7x slower. Inputs are taken whole
# (a reshaped view as input would make torch.compile guard on its base's layout, one graph per target shape).

def _gate(log_alpha: Tensor, noise: Tensor | None, m: int) -> tuple[Tensor, Tensor]:
    """(the stretched sigmoid's sigmoid, the gate before its clamp) of expert ``m``."""
    x = log_alpha[m] if noise is None else log_alpha[m] + noise[m]
    s = torch.sigmoid(x * _INV_BETA)
    return s, s * (ZETA - GAMMA) + GAMMA


def _p_open(log_alpha: Tensor, m: int) -> Tensor:
    """P(z_m > 0) per entry: the expected density's summand."""
    return torch.sigmoid(log_alpha[m] + L0_SHIFT)


def _gate_and_p_open(log_alpha: Tensor, noise: Tensor | None, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """``_gate`` and ``_p_open`` of expert ``m`` from one exponential where the gate has no noise: both sigmoids are
    of log_alpha x, and with h = exp(-x / 2), sigmoid(x / beta) = 1 / (1 + h^3) (this needs 1 / beta = 3/2, BETA's
    value) and sigmoid(x + L0_SHIFT) = 1 / (1 + exp(-L0_SHIFT) h^2); on a CPU these jobs are bound by their
    exponentials."""
    if noise is not None:
        return (*_gate(log_alpha, noise, m), _p_open(log_alpha, m))
    h = torch.exp(-0.5 * log_alpha[m])
    e = h * h
    s = 1.0 / (1.0 + e * h)
    return s, s * (ZETA - GAMMA) + GAMMA, 1.0 / (1.0 + _EXP_NEG_SHIFT * e)


def _counts_job(log_alpha: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """(open training gates per expert, sum of P(z > 0) per expert): the measured and the expected density."""
    opened, expected = [], []
    for m in range(log_alpha.shape[0]):
        _, pre, p_open = _gate_and_p_open(log_alpha, noise, m)
        opened.append((pre > 0).sum(dtype=torch.int32))
        expected.append(p_open.sum())
    return torch.stack(opened), torch.stack(expected)


def _mixed_gate(log_alpha: Tensor, noise: Tensor | None, alpha: Tensor) -> Tensor:
    """sum_m alpha_m z_m: the task's merged mask."""
    mixed = None
    for m in range(log_alpha.shape[0]):
        z = _gate(log_alpha, noise, m)[1].clamp(0.0, 1.0) * alpha[m]
        mixed = z if mixed is None else mixed + z
    return mixed


def _merge_job(log_alpha: Tensor, noise: Tensor | None, alpha: Tensor, delta: Tensor) -> Tensor:
    """The task's update (sum_m alpha_m z_m) * delta, the gates made on the fly."""
    return _mixed_gate(log_alpha, noise, alpha) * delta


def _merge_counts_job(log_alpha: Tensor, noise: Tensor | None, alpha: Tensor,
                      delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``_merge_job`` with ``_counts_job`` from the same pass: an update's first task counts its gates as it merges."""
    mixed, opened, expected = None, [], []
    for m in range(log_alpha.shape[0]):
        _, pre, p_open = _gate_and_p_open(log_alpha, noise, m)
        opened.append((pre > 0).sum(dtype=torch.int32))
        expected.append(p_open.sum())
        z = pre.clamp(0.0, 1.0) * alpha[m]
        mixed = z if mixed is None else mixed + z
    return mixed * delta, torch.stack(opened), torch.stack(expected)


def _merge_grads_job(log_alpha: Tensor, noise: Tensor | None, alpha: Tensor, delta: Tensor,
                     grad: Tensor) -> tuple[Tensor, Tensor]:
    """(dL/ddelta, dL/dalpha) of ``_merge_job`` given dL/du, the gates made again on the fly."""
    mixed, grad_mask, d_alpha = None, grad * delta, []
    for m in range(log_alpha.shape[0]):
        z = _gate(log_alpha, noise, m)[1].clamp(0.0, 1.0)
        mixed = z * alpha[m] if mixed is None else mixed + z * alpha[m]
        d_alpha.append((z * grad_mask).sum())
    return grad * mixed, torch.stack(d_alpha)


def _flush_job(log_alpha: Tensor, noise: Tensor | None, alphas: Tensor, grad_masks: Tensor, scale: Tensor) -> Tensor:
    """The mask logits' gradient of an update: its tasks' dL/dz_m = sum_t alpha_tm dL/d(merged mask_t) through the
    gate (zero where the clamp is active), plus the expected density's (``scale`` [M] its gradient per entry)."""
    out = []
    for m in range(log_alpha.shape[0]):
        grad_gate = None
        for t in range(grad_masks.shape[0]):
            g = alphas[t, m] * grad_masks[t]
            grad_gate = g if grad_gate is None else grad_gate + g
        s, pre, p_open = _gate_and_p_open(log_alpha, noise, m)
        inside = (pre >= 0.0) & (pre <= 1.0)
        out.append(torch.where(inside, grad_gate * _GATE_SLOPE * (1.0 - s) * s, 0.0)
                   + scale[m] * (1.0 - p_open) * p_open)
    return torch.stack(out)


def _mask_step_job(log_alpha: Tensor, grad: Tensor, step: Tensor) -> None:
    """The masks' plain-SGD step and clamp in one pass: ``log_alpha <- clamp(log_alpha - step * grad)``, ``step``
    (0-d) the learning rate times the clipping coefficient."""
    log_alpha.copy_((log_alpha - step * grad).clamp(-LOG_ALPHA_BOUND, LOG_ALPHA_BOUND))


_JOBS: dict[str, Callable[..., Any]] = {"counts": _counts_job, "merge": _merge_job, "merge_counts": _merge_counts_job,
                                        "merge_grads": _merge_grads_job, "flush": _flush_job,
                                        "mask_step": _mask_step_job}
# One graph per expert count, noise or none, and a flush's task count met in a process (a sweep may meet several)
GRAPHS_PER_JOB = 64
_COMPILED: dict[str, Callable[..., Any]] = {}  # one compiled function per job, shared by every MaskKernels


def _compiled(name: str) -> Callable[..., Any]:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_JOBS[name], dynamic=True, fullgraph=True)
    return _COMPILED[name]


def _probe_inputs(job: str, device: torch.device, noise: bool, m: int) -> tuple[Any, ...]:
    """Small inputs of every job's signature for ``m`` experts and a flush of one task (the mask sizes above 1, so
    the compiled graph stays dynamic in them; another task count compiles once more at its first flush)."""
    shape = (5, 7)  # a Linear weight's elementwise masks
    la, vec = torch.randn(m, *shape, device=device), torch.randn(shape, device=device)
    per_expert, eps = torch.rand(m, device=device), torch.randn(m, *shape, device=device) if noise else None
    tasks = 1
    return {"counts": (la, eps), "merge": (la, eps, per_expert, vec), "merge_counts": (la, eps, per_expert, vec),
            "merge_grads": (la, eps, per_expert, vec, vec),
            "flush": (la, eps, torch.rand(tasks, m, device=device), torch.randn(tasks, *shape, device=device),
                      per_expert),
            "mask_step": (la.clone(), torch.randn_like(la), torch.tensor(0.5, device=device))}[job]


class MaskKernels:
    """The fused mask jobs, compiled on first use per device; ``ready(device)`` is False where compiling failed
    (the caller then runs the eager path), and says why once."""

    def __init__(self, noise: bool = False, n_experts: int = 8) -> None:
        self.noise, self.n_experts = noise, n_experts
        self._ready: dict[str, bool] = {}

    def ready(self, device: torch.device) -> bool:
        """Whether the compiled jobs run on ``device``: the first call compiles them on small inputs."""
        key = str(device)
        if key not in self._ready:
            try:
                for job in _JOBS:
                    self(job, *_probe_inputs(job, device, self.noise, self.n_experts))
                self._ready[key] = True
            except Exception as error:  # no C++ compiler or Triton: the eager path gives the same numbers, slower
                log.warning("Fused mask kernels could not be compiled on %s (%s: %s); the masks run eagerly "
                            "(learner.mask_kernels=eager silences this).", key, type(error).__name__,
                            str(error).splitlines()[0] if str(error) else "")
                self._ready[key] = False
        return self._ready[key]

    def __call__(self, job: str, *args: Any) -> Any:
        """Run ``job`` (a key of the module's job table) compiled; call ``ready`` first. The jobs compute no graph:
        their inputs go in detached, so one graph serves tensors with and without ``requires_grad``."""
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=GRAPHS_PER_JOB):
            return _compiled(job)(*args)
