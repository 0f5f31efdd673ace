"""SMAT's optimisers and their step: one optimiser per parameter group (delta, router, masks), gradient clipping,
and the fp16 loss scaler, kept out of ``model.py`` (a mixin of ``SMAT``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from metabench.learners.smat.model import SMAT

__all__ = ["SMATOptimisation"]


class SMATOptimisation:
    """Mixin for ``SMAT``: builds its optimisers and steps them (clipped, loss-scaled under fp16 CUDA autocast)."""

    def _make_optimizers(self: SMAT) -> dict[str, torch.optim.Optimizer]:
        cfg = self.cfg
        opts: dict[str, torch.optim.Optimizer] = {
            "delta": (torch.optim.SGD(self.experts.delta.parameters(), lr=cfg.delta_lr, momentum=cfg.delta_momentum,
                                      weight_decay=cfg.delta_weight_decay) if cfg.delta_optimizer == "sgd" else
                      torch.optim.AdamW(self.experts.delta.parameters(), lr=cfg.delta_lr,
                                        weight_decay=cfg.delta_weight_decay)),
            "router": torch.optim.AdamW(self.router.parameters(), lr=cfg.router_lr,
                                        weight_decay=cfg.router_weight_decay),
        }
        if self.learns_masks:  # a structured gate sums the gradients of the entries it covers: average them
            groups = [{"params": [self.experts.mask_logits[t.key]], "lr": cfg.mask_lr / t.repeat}
                      for t in self.experts.targets]
            opts["masks"] = torch.optim.SGD(groups, lr=cfg.mask_lr)
        return opts

    def _backward(self: SMAT, loss: Tensor) -> None:
        (self._scaler.scale(loss) if self._scaler is not None else loss).backward()

    def _step(self: SMAT) -> None:
        clips = {"masks": self.cfg.mask_clip, "router": self.cfg.router_clip}
        for name, opt in self.optimizers.items():
            if self._scaler is not None:
                self._scaler.unscale_(opt)
            if name in clips:
                nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clips[name])
            self._scaler.step(opt) if self._scaler is not None else opt.step()
        if self._scaler is not None:
            self._scaler.update()
        for scheduler in self.schedulers:
            scheduler.step()

    @staticmethod
    def _new_scaler() -> Any:
        return torch.amp.GradScaler("cuda")

    def _maybe_scaler(self: SMAT) -> None:
        """fp16 autocast on CUDA (set by the engine) needs loss scaling; bf16 and fp32 do not."""
        fp16 = torch.cuda.is_available() and torch.is_autocast_enabled("cuda") \
            and torch.get_autocast_dtype("cuda") == torch.float16
        if fp16 and self._scaler is None:
            self._scaler = self._new_scaler()
        elif not fp16:
            self._scaler = None
