"""BatchNorm statistics stay pretrained while the rest of a model trains."""

from __future__ import annotations

from torch import nn

__all__ = ["freeze_batchnorm_stats"]


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put every BatchNorm layer of ``model`` in eval mode: a few training domains (meta-training) or a support
    set of a few images (test-time fine-tuning) would pull its running statistics away from what tests need."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
