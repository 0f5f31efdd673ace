"""Differentiable-style augmentation of support images for test-time fine-tuning.

PMF (Hu et al., CVPR 2022) and SMAT (ICML 2024) fine-tune on pseudo-queries made from the support
set with DiffAugment's colour and translation transforms (Zhao et al., NeurIPS 2020), plus a
horizontal flip. This is our own implementation on float ``[n, 3, H, W]`` batches in [0, 1]; every
random draw comes from the ``torch.Generator`` passed in (on the CPU, then moved to the batch's
device), so the same seed gives the same pseudo-queries on every device.

Colour transforms do not clip, as in DiffAugment: the backbone normalises whatever it gets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["brightness", "contrast", "diff_augment", "flip", "saturation", "translate"]


def _uniform(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``n`` draws from U[0, 1) shaped ``[n, 1, 1, 1]`` on ``like``'s device and dtype."""
    return torch.rand(n, 1, 1, 1, generator=generator).to(device=like.device, dtype=like.dtype)


def brightness(x: Tensor, generator: torch.Generator) -> Tensor:
    """Add a per-image offset in [-0.5, 0.5)."""
    return x + (_uniform(x.shape[0], generator, x) - 0.5)


def saturation(x: Tensor, generator: torch.Generator) -> Tensor:
    """Scale each pixel's distance from its grey value by a per-image factor in [0, 2)."""
    grey = x.mean(dim=1, keepdim=True)
    return (x - grey) * (_uniform(x.shape[0], generator, x) * 2) + grey


def contrast(x: Tensor, generator: torch.Generator) -> Tensor:
    """Scale each image's distance from its mean by a factor in [0.5, 1.5)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x.shape[0], generator, x) + 0.5) + mean


def translate(x: Tensor, generator: torch.Generator, ratio: float = 0.125) -> Tensor:
    """Shift each image by up to ``ratio`` of its size in both directions, filling with zeros."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if sh == 0 and sw == 0:
        return x
    dy = torch.randint(-sh, sh + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(-sw, sw + 1, (n,), generator=generator).to(x.device)
    padded = F.pad(x, [sw, sw, sh, sh])
    rows = torch.arange(h, device=x.device)[None, :] + sh - dy[:, None]  # [n, h]
    cols = torch.arange(w, device=x.device)[None, :] + sw - dx[:, None]  # [n, w]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 moves the channel dim last: [n, h, w, c].
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def flip(x: Tensor, generator: torch.Generator, prob: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability ``prob``."""
    chosen = torch.rand(x.shape[0], generator=generator).to(x.device) < prob
    return torch.where(chosen[:, None, None, None], x.flip(3), x)


def diff_augment(
    x: Tensor,
    generator: torch.Generator,
    *,
    prob: float = 0.9,
    flip_prob: float = 0.5,
    translation: float = 0.125,
) -> Tensor:
    """Colour (brightness, saturation, contrast) then translation, each image with probability ``prob``;
    then a horizontal flip with probability ``flip_prob``.

    Args:
        x: float images ``[n, 3, H, W]`` in [0, 1].
        generator: the source of every random draw (CPU generator).
        prob: chance that an image gets the colour and translation transforms (0.9 in PMF/SMAT).
        flip_prob: chance of a horizontal flip (0.5 in SMAT).
        translation: largest shift as a fraction of the image size (DiffAugment's 1/8).
    """
    if not x.is_floating_point():
        raise TypeError(f"diff_augment expects float images in [0, 1], got {x.dtype}; divide uint8 images by 255.")
    augmented = translate(contrast(saturation(brightness(x, generator), generator), generator), generator, translation)
    chosen = torch.rand(x.shape[0], generator=generator).to(x.device) < prob
    out = torch.where(chosen[:, None, None, None], augmented, x)
    return flip(out, generator, flip_prob) if flip_prob > 0 else out
