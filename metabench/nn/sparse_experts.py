"""Sparse interpolated experts: theta_i = theta_pre + (sum_m alpha_m z_m) * delta (SMAT, arXiv:2403.08477).

SMAT (Chen et al., ICML 2024) meta-tunes one shared dense delta and M learned masks over the frozen
pretrained weights; a task model interpolates the pretrained model with the soft merge of the experts.
This module knows parameters, masks and merging only: no episodes, losses or optimisers.

Masks are hard-concrete gates (``metabench.nn.hard_concrete``: Louizos et al., 2018, beta 2/3, gamma -0.1,
zeta 1.1) with log-alpha kept in [-4.61, 4.61]. As upstream the gate is deterministic by default (no logistic
noise), and then training and evaluation use the *same* gate (upstream evaluated with beta 1, a train/test mismatch).
With ``noise=True`` training samples the gate and evaluation uses Louizos' test-time estimator.

Storage: one tensor ``[M, *mask_shape]`` of mask logits per target, so M only multiplies masks.
Which tensors are targets, and the shapes of their masks, is ``metabench.nn.expert_targets``.

Mask kinds: ``learned`` (SMAT), ``random`` and ``magnitude`` (fixed hand-designed masks keeping
exactly round((1 - tau) n) entries per expert and tensor, or a trained run's per-expert, per-tensor
densities: a uniformly random subset, or magnitude pruning, the largest |theta_pre|), and ``dense``
(SoftMerge: M dense deltas, no masks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from metabench.nn.expert_targets import LAYER_TYPES, ExpertTarget, classify, fixed_masks, select_targets
from metabench.nn.hard_concrete import L0_SHIFT, LOG_ALPHA_BOUND, MaskKernels, hard_concrete, hard_concrete_backward

__all__ = [
    "LAYER_TYPES",
    "MASK_KINDS",
    "L0_SHIFT",
    "ExpertTarget",
    "SparseInterpolatedExperts",
    "classify",
    "fixed_masks",
    "hard_concrete",
    "hard_concrete_backward",
    "select_targets",
]

MASK_KINDS: tuple[str, ...] = ("learned", "random", "magnitude", "dense")


class SparseInterpolatedExperts(nn.Module):
    """M experts over chosen backbone parameters: a shared delta and one mask per expert.

    Args:
        named_params: the backbone's (frozen) parameters by name; read for shapes and, for
            ``magnitude`` masks, values. They are not stored here.
        n_experts: M.
        pattern: regex that must fully match a parameter name for it to get experts.
        layer_types: restrict to these layer types (``LAYER_TYPES``); None: all.
        structured: one gate per Linear input column / conv output channel instead of per entry.
        kind: ``MASK_KINDS``.
        density: share of entries the fixed masks keep (1 - tau); unused by learned and dense kinds.
        densities: per backbone parameter name, one share per expert overriding ``density`` (fixed kinds).
        init_mean, init_std: normal init of the mask logits.
        noise: sample hard-concrete noise during training.
        generator: random source for the mask init and the fixed masks.
    """

    def __init__(self, named_params: Mapping[str, Tensor], *, n_experts: int = 8, pattern: str = ".*",
                 layer_types: Sequence[str] | None = None, structured: bool = False, kind: str = "learned",
                 density: float = 0.1, densities: Mapping[str, Sequence[float]] | None = None,
                 init_mean: float = 0.0, init_std: float = 0.5, noise: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if kind not in MASK_KINDS:
            raise ValueError(f'Unknown mask kind "{kind}"; use one of {", ".join(MASK_KINDS)}.')
        self.n_experts, self.kind, self.noise = n_experts, kind, noise
        self.targets = select_targets(named_params, pattern=pattern, layer_types=layer_types, structured=structured)
        self.total = sum(t.numel for t in self.targets)
        lead = (n_experts,) if kind == "dense" else ()
        self.delta = nn.ParameterDict({t.key: nn.Parameter(torch.zeros(*lead, *t.shape)) for t in self.targets})
        g = generator or torch.Generator().manual_seed(int(torch.randint(2**31, ())))
        if kind == "learned":
            self.mask_logits = nn.ParameterDict({
                t.key: nn.Parameter((torch.randn(n_experts, *t.mask_shape, generator=g) * init_std + init_mean)
                                    .clamp(-LOG_ALPHA_BOUND, LOG_ALPHA_BOUND))
                for t in self.targets})
        elif kind in ("random", "magnitude"):
            densities = densities or {}
            unknown = sorted(set(densities) - {t.param for t in self.targets})
            if unknown:
                raise ValueError(f'The mask allocation names "{unknown[0]}", which is not a target of this backbone; '
                                 "take the allocation from a run on the same backbone and targets.")
            for t in self.targets:  # persistent buffers: a checkpoint restores exactly these masks
                weight, share = self._slice(named_params, t), densities.get(t.param, density)
                self.register_buffer(f"mask__{t.key}", fixed_masks(weight, t.mask_shape, n_experts, share, kind, g))
        self._by_param: dict[str, list[ExpertTarget]] = {}
        for t in self.targets:
            self._by_param.setdefault(t.param, []).append(t)
        self.kernels: MaskKernels | None = None  # fused training jobs of learned masks (``use_fused_kernels``)

    def use_fused_kernels(self, enabled: bool) -> None:
        """Run the training gates, their gradient and the density jobs as fused kernels (learned masks only)."""
        self.kernels = MaskKernels(self.noise, self.n_experts) if enabled and self.kind == "learned" else None

    def fused(self) -> bool:
        """Whether the fused kernels run here (set, and compiled on this device)."""
        if self.kernels is None:
            return False
        return self.kernels.ready(next(iter(self.mask_logits.values())).device)

    @staticmethod
    def _slice(named: Mapping[str, Tensor], t: ExpertTarget) -> Tensor:
        return named[t.param] if t.rows is None else named[t.param][t.rows[0]:t.rows[1]]

    # -- gates ---------------------------------------------------------------------------------------

    def gate(self, t: ExpertTarget, *, training: bool = False, noise_seed: int | None = None) -> Tensor:
        """Gates ``[M, *mask_shape]`` of one target (with the autograd graph to its mask logits)."""
        if self.kind != "learned":
            return getattr(self, f"mask__{t.key}")
        log_alpha = self.mask_logits[t.key]
        if not self.noise:
            return hard_concrete(log_alpha)  # the same gate in training and evaluation
        if not training:
            return hard_concrete(log_alpha, beta=1.0)  # Louizos et al.'s test-time estimator
        return hard_concrete(log_alpha, self._noise(t, noise_seed))

    def _noise(self, t: ExpertTarget, noise_seed: int | None) -> Tensor:
        """Logistic noise of target ``t``'s training gate, fixed by the seed (GateCache draws it twice)."""
        log_alpha = self.mask_logits[t.key]
        g = torch.Generator(device=log_alpha.device).manual_seed(int(noise_seed or 0) + self.targets.index(t))
        u = torch.rand(log_alpha.shape, generator=g, device=log_alpha.device).clamp(1e-6, 1 - 1e-6)
        return torch.log(u) - torch.log1p(-u)

    def accumulate_gate_grad(self, t: ExpertTarget, grad: Tensor, *, noise_seed: int | None = None) -> None:
        """Add ``grad`` (dL/dz of target ``t``'s training gate) through the gate to its mask logits' ``.grad``,
        as ``gate(t, training=True).backward(grad)`` would; ``grad`` is overwritten."""
        log_alpha = self.mask_logits[t.key]
        with torch.no_grad():
            noise = self._noise(t, noise_seed) if self.noise else None
            g = hard_concrete_backward(grad, log_alpha.detach(), noise)
            log_alpha.grad = g if log_alpha.grad is None else log_alpha.grad.add_(g)

    def gates(self, *, training: bool = False, noise_seed: int | None = None) -> dict[str, Tensor] | None:
        """Gates of every target (None for dense experts, which have no masks)."""
        if self.kind == "dense":
            return None
        return {t.key: self.gate(t, training=training, noise_seed=noise_seed) for t in self.targets}

    # -- merging -------------------------------------------------------------------------------------

    def merged_masks(self, alpha: Tensor, gates: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """sum_m alpha_m z_m per target (``mask_shape``)."""
        return {k: torch.tensordot(alpha.to(z.dtype), z, dims=1) for k, z in gates.items()}

    def updates(self, alpha: Tensor, gates: Mapping[str, Tensor] | None,
                masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The task's update of every target: (sum_m alpha_m z_m) * delta, or sum_m alpha_m delta_m (dense).

        ``masks``: ``merged_masks(alpha, gates)`` when the caller already has them (an M x |theta| pass saved).
        """
        if self.kind == "dense":
            return {k: torch.tensordot(alpha.to(d.dtype), d, dims=1) for k, d in self.delta.items()}
        if gates is None:
            raise ValueError("Masked experts need gates to merge.")
        masks = masks if masks is not None else self.merged_masks(alpha, gates)
        return {k: m * self.delta[k] for k, m in masks.items()}

    def merge(self, base: Mapping[str, Tensor], updates: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """theta_pre + update for every targeted parameter (untargeted rows keep theta_pre)."""
        merged = {}
        for name, targets in self._by_param.items():
            b = base[name]
            if targets[0].rows is None:
                merged[name] = b + updates[targets[0].key].to(b.dtype)
                continue
            pieces, row = [], 0
            for t in targets:
                start, end = t.rows  # type: ignore[misc]
                pieces += [b[row:start], b[start:end] + updates[t.key].to(b.dtype)]
                row = end
            merged[name] = torch.cat([*pieces, b[row:]])
        return merged

    def merged_params(self, base: Mapping[str, Tensor], alpha: Tensor,
                      gates: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """theta_i for merge weights ``alpha`` ``[M]`` (evaluation gates unless ``gates`` is given)."""
        return self.merge(base, self.updates(alpha, gates if gates is not None else self.gates()))

    # -- sparsity ------------------------------------------------------------------------------------

    def expected_density(self) -> Tensor:
        """Differentiable expected share of non-zero entries per expert ``[M]`` (hard-concrete L0)."""
        total = 0.0
        for t in self.targets:
            p_open = torch.sigmoid(self.mask_logits[t.key] + L0_SHIFT)
            total = total + p_open.flatten(1).sum(1) * t.repeat
        return total / self.total

    def density(self, gates: Mapping[str, Tensor] | None = None) -> Tensor:
        """Measured share of non-zero entries per expert ``[M]`` (a hard count; 1 for dense experts)."""
        gates = gates if gates is not None else self.gates()
        if gates is None:
            return torch.ones(self.n_experts)
        with torch.no_grad():  # int32 sums: a bool sum would first copy the M x |theta| mask to int64
            count = sum((gates[t.key] > 0).flatten(1).sum(1, dtype=torch.int32).double() * t.repeat
                        for t in self.targets)
        return (count / self.total).float()

    def zero_fraction(self, masks: Mapping[str, Tensor] | None) -> float:
        """Share of targeted entries where a merged mask is exactly zero (0 for dense experts)."""
        if masks is None:
            return 0.0
        zeros = sum(int((masks[t.key] == 0).sum()) * t.repeat for t in self.targets)
        return zeros / self.total

    def orthogonality(self, gates: Mapping[str, Tensor]) -> Tensor:
        """SIMoE's ||Z Z^T - I||_F over L2-normalised flattened masks (entry-weighted), differentiable."""
        gram = sum(torch.mm(gates[t.key].flatten(1) * t.repeat, gates[t.key].flatten(1).T) for t in self.targets)
        norms = gram.diagonal().clamp_min(1e-12).sqrt()
        eye = torch.eye(self.n_experts, device=gram.device, dtype=gram.dtype)
        return torch.linalg.matrix_norm(gram / (norms[:, None] * norms[None, :]) - eye)

    # -- statistics ----------------------------------------------------------------------------------

    def mask_stats(self) -> list[dict]:
        """Rows (expert, layer_name, layer_type, depth, numel, nonzero) per expert and target part."""
        gates = self.gates()
        rows = []
        for t in self.targets:
            nz = None if gates is None else (gates[t.key] > 0).reshape(self.n_experts, (t.mask_shape or (1,))[0], -1)
            n_rows = t.shape[0] if t.shape else 1
            row_len = t.numel // n_rows
            shared = nz is not None and nz.shape[1] == 1 and n_rows > 1  # one gate row serves every row
            for layer_type, start, end in t.parts:
                numel = (end - start) * row_len
                for m in range(self.n_experts):
                    if nz is None:
                        nonzero = numel
                    elif shared:
                        nonzero = int(nz[m].sum()) * (end - start) * row_len // nz[m].numel()
                    else:
                        nonzero = int(nz[m, start:end].sum()) * t.repeat
                    rows.append({"expert": m, "layer_name": t.param, "layer_type": layer_type, "depth": t.depth,
                                 "numel": numel, "nonzero": nonzero})
        return rows

    def overlap(self) -> tuple[Tensor, Tensor]:
        """Entry counts ``[M, M]`` of the intersection and the union of the experts' non-zero sets."""
        gates = self.gates()
        if gates is None:
            full = torch.full((self.n_experts, self.n_experts), float(self.total), dtype=torch.float64)
            return full, full.clone()
        inter = torch.zeros(self.n_experts, self.n_experts, dtype=torch.float64)
        with torch.no_grad():
            for t in self.targets:
                nz = (gates[t.key] > 0).flatten(1).double().cpu()
                inter += nz @ nz.T * t.repeat
        size = inter.diagonal()
        return inter, size[:, None] + size[None, :] - inter

