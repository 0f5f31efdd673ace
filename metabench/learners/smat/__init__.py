"""SMAT, Sparse MetA-Tuning (Chen et al., ICML 2024), in one package: ``config`` (its options and the paper
recipe's switches), ``model`` (the learner, with its ``optim`` and ``evaluation`` mixins), ``losses`` (sparsity
constraint, distillation, schedules), ``probes`` (analysis capabilities) and ``ablations`` (SoftMerge and the
fixed-mask comparisons). Its layers (sparse interpolated experts, router) are in ``metabench.nn``. Names resolve
on first use, so listing the learners (which reads this package's sources) imports no torch."""

from __future__ import annotations

from typing import Any

__all__ = ["SMAT", "SMATConfig", "SMATState"]


def __getattr__(name: str) -> Any:
    if name == "SMATConfig":
        from metabench.learners.smat.config import SMATConfig

        return SMATConfig
    if name in ("SMAT", "SMATState"):
        from metabench.learners.smat import model

        return getattr(model, name)
    raise AttributeError(f"module 'metabench.learners.smat' has no attribute {name!r}")
