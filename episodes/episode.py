"""The episode: one few-shot task, the unit every learner and table works with."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from episodes.split import Split  # its home; importable from here as before

__all__ = ["Episode", "Split", "Support", "episode_id"]


@dataclass(frozen=True)
class Support:
    """The labelled part of an episode, all a learner may see when it adapts."""

    x: Tensor  # [n_support, 3, H, W], uint8 0..255 or float in [0, 1]
    y: Tensor  # [n_support], int64 in [0, way)

    @property
    def way(self) -> int:
        return int(self.y.max().item()) + 1


@dataclass(frozen=True)
class Episode:
    """Support and query images of one task.

    Images are uint8 ``[n, 3, H, W]`` (cheap to move between processes); the backbone wrapper
    normalises them. Labels are 0..way-1, the same in support and query.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    source: str
    split: Split
    episode_id: str
    class_ids: tuple[int, ...] = ()

    @property
    def way(self) -> int:
        return int(self.support_y.max().item()) + 1

    @property
    def shots(self) -> list[int]:
        """Support images per class, indexed by episode label."""
        return torch.bincount(self.support_y, minlength=self.way).tolist()

    @property
    def support(self) -> Support:
        return Support(self.support_x, self.support_y)

    def to(self, device: torch.device | str) -> Episode:
        """A copy with the four tensors on ``device``."""
        return Episode(
            self.support_x.to(device, non_blocking=True),
            self.support_y.to(device, non_blocking=True),
            self.query_x.to(device, non_blocking=True),
            self.query_y.to(device, non_blocking=True),
            self.source,
            self.split,
            self.episode_id,
            self.class_ids,
        )


def episode_id(
    source: str,
    split: Split | str,
    support_keys: list[tuple[int, int]],
    query_keys: list[tuple[int, int]],
) -> str:
    """Stable id of an episode: a hash of source, split and its (class id, image index) pairs.

    The same images in the same roles always get the same id, so runs can be joined per episode.
    """
    split_name = split.value if isinstance(split, Split) else str(split)
    h = hashlib.sha1(f"{source}|{split_name}|".encode())
    h.update(",".join(f"{c}:{i}" for c, i in support_keys).encode())
    h.update(b"|")
    h.update(",".join(f"{c}:{i}" for c, i in query_keys).encode())
    return h.hexdigest()[:16]
