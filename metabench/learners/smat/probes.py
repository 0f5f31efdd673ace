"""Analysis capabilities of the SMAT learners (``metabench.probes`` protocols), kept out of ``smat.py``.

Mask statistics and overlap feed SMAT's expert-capacity and overlap figures; per-task meta-gradients
feed its meta-gradient alignment analysis (Chen et al., ICML 2024, arXiv:2403.08477, section 5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from episodes.episode import Episode, Support

if TYPE_CHECKING:
    from metabench.learners.smat.model import SMAT

__all__ = ["SMATProbes"]


class SMATProbes:
    """Mixin for ``SMAT``: implements ``MaskInspector`` and ``MetaGradientSource``, its manifest description and
    the dense export of a task's merged weights."""

    def describe(self: SMAT) -> dict[str, int | float | str]:
        density = self.experts.density()
        return {**super().describe(), "n_experts": self.cfg.n_experts, "mask_kind": self.mask_kind,  # type: ignore[misc]
                "sparsity_target": self.cfg.sparsity if self.mask_kind != "dense" else 0.0,
                "expert_sparsity": 1.0 - float(density.mean()), "targeted_parameters": self.experts.total,
                "tasks_seen": int(self.tasks_seen)}

    def export_dense(self: SMAT, support: Support) -> dict[str, Tensor]:
        """The task's backbone state dict with the experts merged in (loadable into the backbone)."""
        theta, _ = self._merged(self.expert_scores(support))
        return {n: theta[n].clone() if n in theta else t.clone() for n, t in self.backbone.state_dict().items()}

    def _dynamics(self: SMAT, alpha: Tensor, density: Tensor) -> dict[str, float]:
        """Training-log diagnostics: router entropy (nats; log M is uniform), the largest mean alpha, the norm of
        the shared delta, and each expert's density (why a claim holds or fails, read from train_log.jsonl)."""
        entropy = -(alpha.clamp_min(1e-12).log() * alpha).sum(-1).mean()
        with torch.no_grad():
            delta = torch.sqrt(sum(d.float().pow(2).sum() for d in self.experts.delta.values()))
        return {"alpha_entropy": float(entropy), "alpha_max": float(alpha.mean(0).max()),
                "delta_norm": float(delta), **{f"density_{m}": float(d) for m, d in enumerate(density.tolist())}}

    def mask_stats(self: SMAT) -> list[dict]:
        """Non-zero counts per expert and layer (``metabench.probes.MaskInspector``)."""
        return self.experts.mask_stats()

    def mask_overlap(self: SMAT) -> list[dict]:
        """Pairwise intersection, union and Jaccard index of the experts' non-zero sets."""
        inter, union = self.experts.overlap()
        m = self.cfg.n_experts
        size = inter.diagonal()
        return [{"expert_a": a, "expert_b": b, "intersection": int(inter[a, b]), "nonzero_a": int(size[a]),
                 "nonzero_b": int(size[b]), "union": int(union[a, b]),
                 "jaccard": float(inter[a, b] / union[a, b]) if union[a, b] > 0 else math.nan}
                for a in range(m) for b in range(m)]

    def task_meta_gradients(self: SMAT, episodes: Sequence[Episode]) -> dict[str, list[Tensor]]:
        """Per-task flattened meta-gradients of the query CE (``metabench.probes.MetaGradientSource``).

        With g = dCE/dtheta_i (first-order, evaluation-mode router and gates): "delta" is the gradient
        with respect to delta, (sum_m alpha_m z_m) * g, and "expert_<m>" is expert m's share of it,
        alpha_m z_m * g (dense experts: z_m = 1). Costs (1 + M) x |theta| floats per task.
        """
        out: dict[str, list[Tensor]] = {"delta": [], **{f"expert_{m}": [] for m in range(self.cfg.n_experts)}}
        gates = self.experts.gates()
        training, _ = self.training, self.eval()  # no spectral-norm power iteration: probing changes nothing
        try:
            for ep in episodes:
                self._task_meta_gradient(ep, gates, out)
        finally:
            self.train(training)
        return out

    def _task_meta_gradient(self: SMAT, ep: Episode, gates: Mapping[str, Tensor] | None,
                            out: dict[str, list[Tensor]]) -> None:
        alpha = self.expert_scores(ep.support)
        theta, _ = self._merged(alpha)
        leaves = {n: t.requires_grad_() for n, t in theta.items()}
        with torch.enable_grad():
            adapted, prototypes = self._inner_adapt(leaves, ep.support_x, ep.support_y, ep.way)
            ce = F.cross_entropy(self.logits(self._features(adapted, ep.query_x), prototypes), ep.query_y)
            grads = dict(zip(leaves, torch.autograd.grad(ce, list(leaves.values()))))
        per_target = []
        for t in self.experts.targets:
            g = grads[t.param] if t.rows is None else grads[t.param][t.rows[0]:t.rows[1]]
            ones = torch.ones((self.cfg.n_experts,) + (1,) * g.ndim, device=g.device)
            z = gates[t.key] if gates is not None else ones
            per_target.append((alpha.view(-1, *(1,) * g.ndim) * z * g).flatten(1))  # [M, numel]
        experts = torch.cat(per_target, dim=1)
        out["delta"].append(experts.sum(0))
        for m in range(self.cfg.n_experts):
            out[f"expert_{m}"].append(experts[m])
