"""Merging SMAT's experts without holding what the plain merge holds: M x |theta| gates, their gradient, copies.

``EvaluationMerge``: what every evaluation task's merge shares, cached (a task's weights are then one fused pass).
``GateCache``: the training gates computed once per update and shared by its tasks (``learner.gate_memory=cache``).
``recomputed_updates``: the training merge of learned masks as an autograd function that recomputes each target's
gates in backward, one target at a time, and sends their gradient straight to the mask logits, so an update never
holds the M x |theta| gates and their gradient (``learner.gate_memory=recompute``).

With ``experts.use_fused_kernels(True)`` each of these jobs runs as one fused kernel per target
(``metabench.nn.hard_concrete.MaskKernels``) instead of a chain of eager passes; the numbers agree to rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from metabench.nn.expert_targets import ExpertTarget
from metabench.nn.hard_concrete import L0_SHIFT, hard_concrete, hard_concrete_backward
from metabench.nn.sparse_experts import SparseInterpolatedExperts

__all__ = ["EvaluationMerge", "GateCache", "expected_density_backward", "recomputed_updates", "training_statistics"]


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


def _fuses(experts: SparseInterpolatedExperts, t: ExpertTarget, fused: bool) -> bool:
    """Whether target ``t`` runs fused: elementwise masks of a Linear weight, ``[M, out, in]`` (one compiled graph
    serves them all; biases, norms and tokens, a fraction of a percent of the entries, stay eager)."""
    shape = experts.mask_logits[t.key].shape
    return fused and len(shape) == 3 and min(shape[1:]) > 1


def _fused_inputs(experts: SparseInterpolatedExperts, t: ExpertTarget, seed: int) -> tuple[Tensor, Tensor | None]:
    """Target ``t``'s mask logits (detached) and training noise, for the fused kernels."""
    return experts.mask_logits[t.key].detach(), experts._noise(t, seed) if experts.noise else None


def _per_entry(experts: SparseInterpolatedExperts, t: ExpertTarget, grad: Tensor) -> Tensor:
    """dL/d(expected density) ``[M]`` as the gradient of each of target ``t``'s entries' P(open)."""
    return (grad / experts.total * t.repeat).to(experts.mask_logits[t.key].dtype)


def _add_grad(p: Tensor, g: Tensor) -> None:
    p.grad = g if p.grad is None else p.grad.add_(g)


def _open_counts(experts: SparseInterpolatedExperts, t: ExpertTarget, gate: Tensor) -> tuple[Tensor, Tensor]:
    """Eagerly, a target's (open gates per expert, sum of P(open) per expert), as the fused kernels count them."""
    p_sum = torch.sigmoid(experts.mask_logits[t.key].detach() + L0_SHIFT).flatten(1).sum(1)
    return (gate > 0).flatten(1).sum(1, dtype=torch.int32), p_sum


class GateCache:
    """Gates computed once per meta-update and shared by all of its tasks.

    Tasks back-propagate into detached gate leaves, where dL/dz accumulates; ``flush`` then pushes the
    accumulated gradient through the gate function to the mask logits, one target at a time. The
    [M, *shape] gate graph is thus built once per update, not once per task, and never for all
    targets at once, which keeps the memory of elementwise masks on a ViT-S near 4 x M x |theta|.
    With fused kernels the gates' pass also counts their open entries and the expected density
    (``density``, ``expected``: no further pass over the logits this update).
    """

    def __init__(self, experts: SparseInterpolatedExperts, noise_seed: int = 0) -> None:
        self.experts, self.noise_seed = experts, noise_seed
        self.density: Tensor | None = None
        self.expected: Tensor | None = None
        with torch.no_grad():
            gates = self._fused_gates() if experts.fused() else experts.gates(training=True, noise_seed=noise_seed)
        self.z = {k: v.detach().requires_grad_(experts.kind == "learned") for k, v in (gates or {}).items()}

    def _fused_gates(self) -> dict[str, Tensor]:
        ex, gates, count, expected = self.experts, {}, 0.0, 0.0
        for t in ex.targets:
            if _fuses(ex, t, True):
                gates[t.key], open_count, p_sum = ex.kernels("gates", *_fused_inputs(ex, t, self.noise_seed))  # type: ignore[misc]
            else:
                gates[t.key] = ex.gate(t, training=True, noise_seed=self.noise_seed)
                open_count, p_sum = _open_counts(ex, t, gates[t.key])
            count = count + open_count.double() * t.repeat
            expected = expected + p_sum * t.repeat
        self.density = (count / ex.total).float()  # type: ignore[operator]
        self.expected = expected / ex.total  # type: ignore[operator]
        return gates

    def flush(self, density_grad: Tensor | None = None) -> None:
        """Add ``density_grad`` (dL/d ``experts.expected_density()``, ``[M]``) through the expected density, and the
        accumulated gate gradients, to the mask logits' ``.grad``."""
        ex = self.experts
        fused = ex.fused()
        for t in ex.targets:
            leaf = self.z.get(t.key)
            grad_z = None if leaf is None else leaf.grad
            if _fuses(ex, t, fused) and density_grad is not None and grad_z is not None:
                la, noise = _fused_inputs(ex, t, self.noise_seed)
                _add_grad(ex.mask_logits[t.key], ex.kernels("flush", la, noise, grad_z,  # type: ignore[misc]
                                                            _per_entry(ex, t, density_grad)))
            else:
                if density_grad is not None:
                    _density_backward(ex, t, density_grad, fused)
                if grad_z is not None:
                    ex.accumulate_gate_grad(t, grad_z, noise_seed=self.noise_seed)
            if leaf is not None:
                leaf.grad = None


class _RecomputedUpdate(torch.autograd.Function):
    """u = (sum_m alpha_m z_m) * delta of one target, z = hard_concrete(log_alpha [+ noise]) recomputed in backward
    (with fused kernels and elementwise masks: never held as a tensor, made inside the merge's kernels)."""

    @staticmethod
    def forward(ctx: Any, alpha: Tensor, delta: Tensor, log_alpha: Tensor, experts: SparseInterpolatedExperts,
                t: ExpertTarget, seed: int) -> Tensor:
        ctx.experts, ctx.t, ctx.seed = experts, t, seed
        ctx.fused = _fuses(experts, t, experts.fused()) and log_alpha.shape[1:] == delta.shape
        ctx.save_for_backward(alpha, delta, log_alpha)
        if ctx.fused:
            la, noise = _fused_inputs(experts, t, seed)
            return experts.kernels("merge", la, noise, alpha.to(la.dtype), delta.detach())
        z, _ = _training_gate(experts, t, seed)
        return torch.tensordot(alpha.to(z.dtype), z, dims=1) * delta

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        alpha, delta, log_alpha = ctx.saved_tensors
        if ctx.fused:
            la, noise = _fused_inputs(ctx.experts, ctx.t, ctx.seed)
            grad = grad.clone() if grad._is_view() else grad  # a view would make the compiled graph guard on its base
            d_delta, d_alpha, d_logits = ctx.experts.kernels("merge_backward", la, noise, alpha.to(la.dtype),
                                                             delta.detach(), grad)
            return (d_alpha.to(alpha.dtype), d_delta if ctx.needs_input_grad[1] else None, d_logits, None, None, None)
        z, noise = _training_gate(ctx.experts, ctx.t, ctx.seed)
        a = alpha.to(z.dtype)
        d_delta = grad * torch.tensordot(a, z, dims=1) if ctx.needs_input_grad[1] else None
        gd = (grad * delta).sum_to_size(z.shape[1:])  # dL/d(merged mask)
        d_alpha = (z.flatten(1) @ gd.flatten()).to(alpha.dtype)
        del z
        d_gate = a.view(-1, *([1] * gd.dim())) * gd  # dL/dz_m = alpha_m dL/d(merged mask)
        d_logits = hard_concrete_backward(d_gate, log_alpha.detach(), noise)
        return d_alpha, d_delta, d_logits, None, None, None


def recomputed_updates(experts: SparseInterpolatedExperts, alpha: Tensor, seed: int) -> dict[str, Tensor]:
    """The training update of every target, as ``experts.updates(alpha, GateCache(experts, seed).z)`` gives it,
    with the same gradients (to rounding) for alpha, delta and the mask logits, but no gates kept between the
    forward and the backward pass (learned masks only)."""
    if experts.kind != "learned":
        raise ValueError("Recomputed gates need learned masks; fixed and dense experts keep no gates to spare.")
    return {t.key: _RecomputedUpdate.apply(alpha, experts.delta[t.key], experts.mask_logits[t.key], experts, t, seed)
            for t in experts.targets}


def training_statistics(experts: SparseInterpolatedExperts, seed: int) -> tuple[Tensor, Tensor]:
    """(``experts.density`` of the training gates of seed ``seed``, ``experts.expected_density()`` without its
    graph), computed one target at a time (one fused pass per target with fused kernels)."""
    fused = experts.fused()
    count, expected = 0.0, 0.0
    with torch.no_grad():
        for t in experts.targets:
            if _fuses(experts, t, fused):
                open_count, p_sum = experts.kernels("counts", *_fused_inputs(experts, t, seed))  # type: ignore[misc]
            else:
                open_count, p_sum = _open_counts(experts, t, _training_gate(experts, t, seed)[0])
            count = count + open_count.double() * t.repeat
            expected = expected + p_sum * t.repeat
        if not fused:  # the eager expected density, bit for bit
            expected = experts.expected_density() * experts.total
    return (count / experts.total).float(), expected / experts.total  # type: ignore[operator,return-value]


def _density_backward(experts: SparseInterpolatedExperts, t: ExpertTarget, grad: Tensor, fused: bool) -> None:
    """``expected_density_backward`` of one target."""
    log_alpha = experts.mask_logits[t.key]
    scale = _per_entry(experts, t, grad)
    with torch.no_grad():
        if _fuses(experts, t, fused) and log_alpha.grad is not None:  # one pass: logits and gradient in, sum out
            log_alpha.grad = experts.kernels("density", log_alpha.detach(), log_alpha.grad, scale)  # type: ignore[misc]
            return
        p_open = torch.sigmoid(log_alpha.detach() + L0_SHIFT)
        g = torch.ops.aten.sigmoid_backward(scale.view(-1, *([1] * (p_open.dim() - 1))).expand_as(p_open), p_open)
        del p_open
        _add_grad(log_alpha, g)


def expected_density_backward(experts: SparseInterpolatedExperts, grad: Tensor) -> None:
    """Add ``grad`` ``[M]`` (dL/d ``experts.expected_density()``) through the expected density to the mask logits'
    ``.grad``, one target at a time: the operations autograd runs (bit-identical eagerly), without keeping every
    target's sigmoid (M x |theta| floats) from the forward to the backward pass."""
    fused = experts.fused()
    for t in experts.targets:
        _density_backward(experts, t, grad, fused)
