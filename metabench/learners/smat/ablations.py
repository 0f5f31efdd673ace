"""SMAT's ablations (Chen et al., ICML 2024, section 4): the same router, objective and delta as ``smat``,
with dense experts (``softmerge``) or fixed hand-designed masks (``smat_random``, ``smat_magnitude``).

They are comparison learners: they change only the kind of mask (``metabench.nn.sparse_experts.MASK_KINDS``).
"""

from __future__ import annotations

from metabench.learners import LEARNERS
from metabench.learners.smat.model import SMAT

__all__ = ["SMATMagnitude", "SMATRandom", "SoftMerge"]


@LEARNERS.register("softmerge")
class SoftMerge(SMAT):
    """SMAT's SoftMerge ablation: M dense experts (one full delta each, no masks, no sparsity) merged by
    the same router and trained with the same objective."""

    mask_kind = "dense"


@LEARNERS.register("smat_random")
class SMATRandom(SMAT):
    """Hand-designed sparsity: each expert a fixed random mask keeping 1 - tau of every tensor (or, with
    ``learner.mask_allocation``, a trained run's densities); only delta and the router meta-train."""

    mask_kind = "random"


@LEARNERS.register("smat_magnitude")
class SMATMagnitude(SMAT):
    """Hand-designed sparsity: magnitude pruning, each expert keeping the 1 - tau entries of largest |theta_pre|
    in every tensor (deterministic: equal densities give every expert one mask); only delta and the router
    meta-train."""

    mask_kind = "magnitude"
