"""Prototype heads shared by the prototype-based learners (Pre, PMF, SMAT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CosineHead", "class_prototypes", "cosine_logits", "embed"]


def class_prototypes(features: Tensor, labels: Tensor, way: int) -> Tensor:
    """Mean feature per class: [n, d] features, [n] labels in [0, way) -> [way, d]."""
    sums = features.new_zeros(way, features.shape[1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=way).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def cosine_logits(features: Tensor, prototypes: Tensor, scale: float | Tensor = 10.0,
                  bias: float | Tensor = 0.0) -> Tensor:
    """``scale * (cos(f, p) + bias)``: [n, d] x [way, d] -> [n, way] (the ProtoNet head of PMF and SMAT)."""
    cos = F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T
    return scale * (cos + bias)


class CosineHead(nn.Module):
    """Cosine prototype classifier with an optional learnable scale (init 10) and bias (init 0), as in PMF."""

    def __init__(self, scale: float = 10.0, learnable: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learnable)
        self.bias = nn.Parameter(torch.tensor(0.0), requires_grad=learnable)

    def forward(self, features: Tensor, prototypes: Tensor) -> Tensor:
        return cosine_logits(features, prototypes, self.scale, self.bias)


def embed(model: nn.Module, x: Tensor, batch_size: int = 128) -> Tensor:
    """Run ``model`` over ``x`` in chunks so a 1,000-image episode never needs one giant batch."""
    if x.shape[0] <= batch_size:
        return model(x)
    return torch.cat([model(chunk) for chunk in x.split(batch_size)])
