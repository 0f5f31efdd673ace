"""Train-time augmentation of episode images, as PMF and SMAT meta-train (random resized crop,
colour jitter, horizontal flip), seeded per episode so results do not depend on loader workers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms import v2

__all__ = ["TrainAugment"]


@dataclass(frozen=True)
class TrainAugment:
    """Augment uint8 ``[n, 3, H, W]`` images; output keeps the shape and dtype.

    Args:
        scale: area range of the random resized crop (torchvision's default lower bound, 0.08,
            destroys small glyphs; 0.5 keeps a recognisable part of the object).
        jitter: brightness, contrast and saturation strength (0.4 as in PMF).
        flip: probability of a horizontal flip.
    """

    scale: tuple[float, float] = (0.5, 1.0)
    jitter: float = 0.4
    flip: float = 0.5

    def _pipeline(self, size: tuple[int, int]) -> v2.Compose:
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=self.scale, antialias=True),
            v2.ColorJitter(brightness=self.jitter, contrast=self.jitter, saturation=self.jitter),
            v2.RandomHorizontalFlip(self.flip),
        ])

    def __call__(self, images: Tensor, seed: int) -> Tensor:
        """Each image gets its own random parameters, all drawn from ``seed``."""
        pipeline = self._pipeline(tuple(images.shape[-2:]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([pipeline(img) for img in images])
