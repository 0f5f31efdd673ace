"""Merging SMAT's experts without holding what the plain merge holds: M x |theta| gates, their gradient, copies.

``EvaluationMerge``: what every evaluation task's merge shares, cached (a task's weights are then one fused pass);
``MergedView``: the backbone under a task's merged weights, without a copy of it.
``GateCache``: the training gates computed once per update and shared by its tasks (``learner.gate_memory=cache``).
``recomputed_updates``: the training merge of learned masks as an autograd function that recomputes each target's
gates in backward, one target at a time, and sends their gradient straight to the mask logits, so an update never
holds the M x |theta| gates and their gradient (``learner.gate_memory=recompute``).

``FusedMerge``: the training merge in fused kernels (``experts.use_fused_kernels(True)``,
``metabench.nn.hard_concrete.MaskKernels``): no gates and no gate gradients held, one loop per job and weight
instead of a chain of eager passes; the numbers agree with the other two to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metabench.nn.expert_targets import ExpertTarget
from metabench.nn.hard_concrete import L0_SHIFT, hard_concrete, hard_concrete_backward
from metabench.nn.sparse_experts import SparseInterpolatedExperts

__all__ = ["EvaluationMerge", "FusedMerge", "GateCache", "MergedView", "expected_density_backward",
           "recomputed_updates", "training_statistics"]


class MergedView(nn.Module):
    """The backbone run with a task's merged tensors in place of its own (``functional_call``), for tasks that only
    embed with it: a deep copy of a ViT-S per zero-shot task cost about 50 ms, 8% of a 75-image episode. The
    backbone is held, not registered, so the view owns no parameters and moving it moves nothing."""

    def __init__(self, backbone: nn.Module, params: Mapping[str, Tensor]) -> None:
        super().__init__()
        self._held, self.params = (backbone,), dict(params)

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self._held[0], self.params, (x,))


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
    return fused and len(shape) == 3 and min(shape[1:]) > 1 and shape[1:] == experts.delta[t.key].shape


def _fused_inputs(experts: SparseInterpolatedExperts, t: ExpertTarget, seed: int) -> tuple[Tensor, Tensor | None]:
    """Target ``t``'s mask logits (detached) and training noise, for the fused kernels."""
    return experts.mask_logits[t.key].detach(), experts._noise(t, seed) if experts.noise else None


def _per_entry(experts: SparseInterpolatedExperts, t: ExpertTarget, grad: Tensor) -> Tensor:
    """dL/d(expected density) ``[M]`` as the gradient of each of target ``t``'s entries' P(open)."""
    return (grad / experts.total * t.repeat).to(experts.mask_logits[t.key].dtype)


def _add_grad(p: Tensor, g: Tensor) -> None:
    p.grad = g if p.grad is None else p.grad.add_(g)


class GateCache:
    """Gates computed once per meta-update and shared by all of its tasks.

    Tasks back-propagate into detached gate leaves, where dL/dz accumulates; ``flush`` then pushes the
    accumulated gradient through the gate function to the mask logits, one target at a time. The
    [M, *shape] gate graph is thus built once per update, not once per task, and never for all
    targets at once, which keeps the memory of elementwise masks on a ViT-S near 4 x M x |theta|.
    """

    def __init__(self, experts: SparseInterpolatedExperts, noise_seed: int = 0) -> None:
        self.experts, self.noise_seed = experts, noise_seed
        with torch.no_grad():
            gates = experts.gates(training=True, noise_seed=noise_seed) or {}
        self.z = {k: v.detach().requires_grad_(experts.kind == "learned") for k, v in gates.items()}

    def flush(self, density_grad: Tensor | None = None) -> None:
        """Add ``density_grad`` (dL/d ``experts.expected_density()``, ``[M]``) through the expected density, and the
        accumulated gate gradients, to the mask logits' ``.grad``."""
        if density_grad is not None:
            expected_density_backward(self.experts, density_grad)
        for t in self.experts.targets:
            leaf = self.z.get(t.key)
            if leaf is not None and leaf.grad is not None:
                self.experts.accumulate_gate_grad(t, leaf.grad, noise_seed=self.noise_seed)
                leaf.grad = None


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


class _FusedUpdate(torch.autograd.Function):
    """``_RecomputedUpdate`` in fused kernels: the backward returns no mask-logit gradient but leaves the task's
    (alpha, dL/d merged mask) with its ``FusedMerge``, which turns every task's into one gradient at ``flush``."""

    @staticmethod
    def forward(ctx: Any, alpha: Tensor, delta: Tensor, merge: FusedMerge, t: ExpertTarget) -> Tensor:
        ctx.merge, ctx.t = merge, t
        ctx.save_for_backward(alpha, delta)
        la, noise = merge.inputs(t)
        kernels, args = merge.experts.kernels, (la, noise, alpha.to(la.dtype), delta.detach())
        if t.key in merge.counts:
            return kernels("merge", *args)  # type: ignore[misc]
        update, opened, expected = kernels("merge_counts", *args)  # type: ignore[misc]
        merge.counts[t.key] = [opened, expected]  # the update's gates: the same for all its tasks
        return update

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        alpha, delta = ctx.saved_tensors
        la, noise = ctx.merge.inputs(ctx.t)
        grad = grad.clone() if grad._is_view() else grad  # a view would make the compiled graph guard on its base
        d_delta, d_alpha = ctx.merge.experts.kernels("merge_grads", la, noise, alpha.to(la.dtype), delta.detach(), grad)
        ctx.merge.pending.setdefault(ctx.t.key, []).append((alpha.detach().to(la.dtype), grad * delta.detach()))
        return d_alpha.to(alpha.dtype), d_delta if ctx.needs_input_grad[1] else None, None, None


class FusedMerge:
    """The training merge of one update with fused kernels (``experts.fused()``): gates are never held, made inside
    each kernel from the mask logits, and a task's backward keeps only (alpha, dL/d merged mask), |theta| floats,
    per Linear weight; ``flush`` sends every task's gradient and the expected density's through the gate to the
    mask logits in one pass per weight. The gradients are the other modes' to rounding. The small targets (biases,
    norms, tokens) merge as ``recomputed_updates`` does."""

    def __init__(self, experts: SparseInterpolatedExperts, noise_seed: int = 0, *, keep_noise: bool = False) -> None:
        if not experts.fused():
            raise ValueError("FusedMerge needs fused kernels (experts.use_fused_kernels(True), compiled here).")
        self.experts, self.noise_seed = experts, noise_seed
        self.pending: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.counts: dict[str, list[Tensor]] = {}  # per target: open gates and sum of P(open), from its first merge
        # With noisy gates every job draws the target's M x |theta| noise again (2T + 1 draws an update, 0.84 s each
        # on a ViT-S) unless it is kept: M x |theta| floats for the update, as a gate cache would hold
        self._noise: dict[str, Tensor | None] | None = {} if keep_noise and experts.noise else None

    def inputs(self, t: ExpertTarget) -> tuple[Tensor, Tensor | None]:
        """Target ``t``'s mask logits (detached) and training noise, as the kernels take them."""
        if self._noise is None:
            return _fused_inputs(self.experts, t, self.noise_seed)
        if t.key not in self._noise:
            self._noise[t.key] = _fused_inputs(self.experts, t, self.noise_seed)[1]
        return self.experts.mask_logits[t.key].detach(), self._noise[t.key]

    def updates(self, alpha: Tensor) -> dict[str, Tensor]:
        """Every target's training update for merge weights ``alpha``."""
        ex = self.experts
        return {t.key: (_FusedUpdate.apply(alpha, ex.delta[t.key], self, t) if _fuses(ex, t, True) else
                        _RecomputedUpdate.apply(alpha, ex.delta[t.key], ex.mask_logits[t.key], ex, t, self.noise_seed))
                for t in ex.targets}

    def statistics(self) -> tuple[Tensor, Tensor]:
        """``training_statistics`` of this update's gates."""
        return training_statistics(self.experts, self.noise_seed, self.inputs, self.counts)

    def flush(self, density_grad: Tensor) -> None:
        """Add the tasks' gate gradients and ``density_grad`` (dL/d expected density ``[M]``) to the logits' grad."""
        ex = self.experts
        with torch.no_grad():
            for t in ex.targets:
                if not _fuses(ex, t, True):
                    _density_backward(ex, t, density_grad)
                    continue
                la, noise = self.inputs(t)
                tasks = self.pending.pop(t.key, [])
                alphas = torch.stack([a for a, _ in tasks]) if tasks else torch.zeros(1, ex.n_experts, dtype=la.dtype)
                grads = torch.stack([g for _, g in tasks]) if tasks else torch.zeros(1, *la.shape[1:], dtype=la.dtype)
                _add_grad(ex.mask_logits[t.key], ex.kernels("flush", la, noise, alphas, grads,  # type: ignore[misc]
                                                            _per_entry(ex, t, density_grad)))


def _counts(experts: SparseInterpolatedExperts, t: ExpertTarget, seed: int,
            inputs: Callable[[ExpertTarget], tuple[Tensor, Tensor | None]] | None, fused: bool) -> Sequence[Tensor]:
    """Target ``t``'s open training gates and sum of P(open) per expert ``[M]``."""
    la, noise = inputs(t) if inputs is not None else _fused_inputs(experts, t, seed)
    if _fuses(experts, t, fused):
        return experts.kernels("counts", la, noise)  # type: ignore[misc]
    opened = (hard_concrete(la, noise) > 0).flatten(1).sum(1, dtype=torch.int32)
    return opened, torch.sigmoid(la + L0_SHIFT).flatten(1).sum(1)


def training_statistics(experts: SparseInterpolatedExperts, seed: int,
                        inputs: Callable[[ExpertTarget], tuple[Tensor, Tensor | None]] | None = None,
                        known: Mapping[str, Sequence[Tensor]] | None = None) -> tuple[Tensor, Tensor]:
    """(``experts.density`` of the training gates of seed ``seed``, ``experts.expected_density()`` without its
    graph), computed one target at a time (one fused pass per Linear weight with fused kernels); ``inputs``: a
    target's logits and noise (a ``FusedMerge``'s, which may keep its noise); ``known``: targets' (open count,
    sum of P(open)) already counted (a ``FusedMerge``'s first merge)."""
    fused = experts.fused()
    count, expected = 0.0, 0.0
    with torch.no_grad():
        for t in experts.targets:
            counted = known.get(t.key) if known is not None else None
            open_count, p_sum = counted if counted is not None else _counts(experts, t, seed, inputs, fused)
            count = count + open_count.double() * t.repeat
            expected = expected + p_sum * t.repeat
        if not fused:  # the eager expected density, bit for bit
            expected = experts.expected_density() * experts.total
    return (count / experts.total).float(), expected / experts.total  # type: ignore[operator,return-value]


def _density_backward(experts: SparseInterpolatedExperts, t: ExpertTarget, grad: Tensor) -> None:
    """``expected_density_backward`` of one target."""
    log_alpha = experts.mask_logits[t.key]
    scale = _per_entry(experts, t, grad)
    with torch.no_grad():
        p_open = torch.sigmoid(log_alpha.detach() + L0_SHIFT)
        g = torch.ops.aten.sigmoid_backward(scale.view(-1, *([1] * (p_open.dim() - 1))).expand_as(p_open), p_open)
        del p_open
        _add_grad(log_alpha, g)


def expected_density_backward(experts: SparseInterpolatedExperts, grad: Tensor) -> None:
    """Add ``grad`` ``[M]`` (dL/d ``experts.expected_density()``) through the expected density to the mask logits'
    ``.grad``, one target at a time: the operations autograd runs (bit-identical), without keeping every target's
    sigmoid (M x |theta| floats) from the forward to the backward pass."""
    for t in experts.targets:
        _density_backward(experts, t, grad)
