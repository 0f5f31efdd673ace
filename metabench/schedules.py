"""Learning-rate schedules shared by the learners (one home: PMF, LoRA and SMAT use the same factor)."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(update: int, *, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup`` updates, then cosine decay to 0 at ``total``."""
    if update < warmup:
        return (update + 1) / warmup
    progress = (update - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
