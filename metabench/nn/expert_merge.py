"""Merging SMAT's experts without holding what the plain merge holds: M x |theta| gates, their gradient, copies.

``EvaluationMerge``: what every evaluation task's merge shares, cached (a task's weights are then one fused pass).
``recomputed_updates``: the training merge of learned masks as an autograd function that recomputes each target's
gates in backward, one target at a time, and sends their gradient straight to the mask logits, so an update never
holds the M x |theta| gates and their gradient (``GateCache`` keeps both, and computes the gates once per update).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from metabench.nn.expert_targets import ExpertTarget
from metabench.nn.sparse_experts import L0_SHIFT, SparseInterpolatedExperts, hard_concrete, hard_concrete_backward

__all__ = ["EvaluationMerge", "expected_density_backward", "recomputed_updates", "training_density"]


class EvaluationMerge:
    """What the merges of all evaluation tasks share, computed once until the experts change.

    Per target it holds either the experts' own updates ``z_m * delta`` stacked ``[M, *shape]`` (elementwise masks
    and dense experts), so that a task's weights are one fused matrix-vector product ``theta_pre + E^T alpha``
    (one pass over M x |theta| instead of four), or the gates of structured masks, which are small and merge as
    before. It also holds the share of entries every expert closes: with every alpha_m > 0 (a normalised sigmoid)
    those are exactly the entries a task's merged mask zeroes, so that count needs no pass per task.
    """

    def __init__(self, experts: SparseInterpolatedExperts) -> None:
        self.experts = experts
        with torch.no_grad():
            gates = experts.gates()
            self.stacked: dict[str, Tensor] = {}
            self.gates: dict[str, Tensor] = {}
            closed = 0
            for t in experts.targets:
                delta = experts.delta[t.key].detach()
                if gates is None:
                    self.stacked[t.key] = delta
                    continue
                z = gates[t.key]
                if z.shape[1:] == delta.shape:
                    self.stacked[t.key] = z * delta
                else:
                    self.gates[t.key] = z
                closed += int((z == 0).all(0).sum()) * t.repeat
            self.closed = closed / experts.total

    def _theta(self, b: Tensor, t: ExpertTarget, alpha: Tensor) -> Tensor:
        """theta_pre + update of one target's rows ``b``."""
        if t.key in self.gates:
            mask = torch.tensordot(alpha.to(self.gates[t.key].dtype), self.gates[t.key], dims=1)
            return b + (mask * self.experts.delta[t.key]).to(b.dtype)
        stacked = self.stacked[t.key]
        if stacked.dtype != b.dtype:
            return b + torch.tensordot(alpha.to(stacked.dtype), stacked, dims=1).to(b.dtype)
        flat = stacked.reshape(stacked.shape[0], -1)
        return torch.addmv(b.reshape(-1), flat.t(), alpha.to(flat.dtype)).view(b.shape)

    def merged(self, base: Mapping[str, Tensor], alpha: Tensor) -> dict[str, Tensor]:
        """theta_i for merge weights ``alpha`` ``[M]`` (equal to ``experts.merged_params`` up to rounding)."""
        with torch.no_grad():
            merged = {}
            for name, targets in self.experts._by_param.items():
                b = base[name]
                if targets[0].rows is None:
                    merged[name] = self._theta(b, targets[0], alpha)
                    continue
                out = b.clone()
                for t in targets:
                    start, end = t.rows  # type: ignore[misc]
                    out[start:end] = self._theta(b[start:end], t, alpha)
                merged[name] = out
            return merged

    def zero_fraction(self, alpha: Tensor) -> float:
        """Share of targeted entries the task's merged mask zeroes (0 for dense experts)."""
        if self.experts.kind == "dense":
            return 0.0
        if bool((alpha > 0).all()):
            return self.closed
        gates = self.experts.gates()  # an expert with no weight: count on the merged masks themselves
        return self.experts.zero_fraction(self.experts.merged_masks(alpha, gates))  # type: ignore[arg-type]


def _training_gate(experts: SparseInterpolatedExperts, t: ExpertTarget, seed: int) -> tuple[Tensor, Tensor | None]:
    """Target ``t``'s training gate (no graph) and the noise it used (None: deterministic gates)."""
    log_alpha = experts.mask_logits[t.key].detach()
    noise = experts._noise(t, seed) if experts.noise else None
    return hard_concrete(log_alpha, noise), noise


class _RecomputedUpdate(torch.autograd.Function):
    """u = (sum_m alpha_m z_m) * delta of one target, z = hard_concrete(log_alpha [+ noise]) recomputed in backward."""

    @staticmethod
    def forward(ctx: Any, alpha: Tensor, delta: Tensor, log_alpha: Tensor, experts: SparseInterpolatedExperts,
                t: ExpertTarget, seed: int) -> Tensor:
        ctx.experts, ctx.t, ctx.seed = experts, t, seed
        ctx.save_for_backward(alpha, delta, log_alpha)
        z, _ = _training_gate(experts, t, seed)
        return torch.tensordot(alpha.to(z.dtype), z, dims=1) * delta

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        alpha, delta, _ = ctx.saved_tensors
        z, noise = _training_gate(ctx.experts, ctx.t, ctx.seed)
        a = alpha.to(z.dtype)
        d_delta = grad * torch.tensordot(a, z, dims=1) if ctx.needs_input_grad[1] else None
        gd = (grad * delta).sum_to_size(z.shape[1:])  # dL/d(merged mask)
        d_alpha = (z.flatten(1) @ gd.flatten()).to(alpha.dtype)
        del z
        d_gate = a.view(-1, *([1] * gd.dim())) * gd  # dL/dz_m = alpha_m dL/d(merged mask)
        d_logits = hard_concrete_backward(d_gate, ctx.experts.mask_logits[ctx.t.key].detach(), noise)
        return d_alpha, d_delta, d_logits, None, None, None


def recomputed_updates(experts: SparseInterpolatedExperts, alpha: Tensor, seed: int) -> dict[str, Tensor]:
    """The training update of every target, as ``experts.updates(alpha, GateCache(experts, seed).z)`` gives it,
    with the same gradients (to rounding) for alpha, delta and the mask logits, but no gates kept between the
    forward and the backward pass (learned masks only)."""
    if experts.kind != "learned":
        raise ValueError("Recomputed gates need learned masks; fixed and dense experts keep no gates to spare.")
    return {t.key: _RecomputedUpdate.apply(alpha, experts.delta[t.key], experts.mask_logits[t.key], experts, t, seed)
            for t in experts.targets}


def training_density(experts: SparseInterpolatedExperts, seed: int) -> Tensor:
    """``experts.density`` of the training gates of seed ``seed``, computed one target at a time."""
    with torch.no_grad():
        count = sum((_training_gate(experts, t, seed)[0] > 0).flatten(1).sum(1, dtype=torch.int32).double() * t.repeat
                    for t in experts.targets)
    return (count / experts.total).float()


def expected_density_backward(experts: SparseInterpolatedExperts, grad: Tensor) -> None:
    """Add ``grad`` ``[M]`` (dL/d ``experts.expected_density()``) through the expected density to the mask logits'
    ``.grad``, one target at a time: the operations autograd runs (bit-identical), without keeping every target's
    sigmoid (M x |theta| floats) from the forward to the backward pass."""
    with torch.no_grad():
        per_entry = grad / experts.total
        for t in experts.targets:
            log_alpha = experts.mask_logits[t.key]
            p_open = torch.sigmoid(log_alpha.detach() + L0_SHIFT)
            scale = (per_entry * t.repeat).to(p_open.dtype).view(-1, *([1] * (p_open.dim() - 1)))
            g = torch.ops.aten.sigmoid_backward(scale.expand_as(p_open), p_open)
            del p_open
            log_alpha.grad = g if log_alpha.grad is None else log_alpha.grad.add_(g)
