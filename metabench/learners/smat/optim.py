"""SMAT's optimisers and their step: one optimiser per parameter group (delta, router, masks), gradient clipping,
and the fp16 loss scaler, kept out of ``model.py`` (a mixin of ``SMAT``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from metabench.nn.hard_concrete import LOG_ALPHA_BOUND, MaskKernels

if TYPE_CHECKING:
    from metabench.learners.smat.model import SMAT

__all__ = ["MaskSGD", "SMATOptimisation"]


class MaskSGD(torch.optim.Optimizer):
    """The mask logits' optimiser: plain SGD on the gradient clipped to total norm ``clip``, then the clamp to
    +-``LOG_ALPHA_BOUND``. With fused ``kernels`` compiled on the logits' device, each 3-D (Linear weight) tensor
    takes step and clamp in one pass (``clip_grad_norm_``, SGD and the clamp make four over the M x |theta| logits
    and their gradient), the learning rate and clip coefficient multiplied first, and its gradient is left
    unclipped; elsewhere the step is ``clip_grad_norm_``, ``SGD`` and ``clamp_`` exactly."""

    def __init__(self, params: Any, lr: float, clip: float, kernels: MaskKernels | None = None) -> None:
        super().__init__(params, {"lr": lr})
        self.clip, self.kernels = clip, kernels

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D102
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        fused = self.kernels is not None and self.kernels.ready(params[0].device)
        if fused:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
            coef = (self.clip / (norm + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_ computes it
        else:
            nn.utils.clip_grad_norm_(params, self.clip)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if fused and p.dim() == 3:
                    self.kernels("mask_step", p.detach(), p.grad, group["lr"] * coef)  # type: ignore[misc]
                    continue
                p.add_(p.grad * coef if fused else p.grad, alpha=-group["lr"]).clamp_(-LOG_ALPHA_BOUND,
                                                                                        LOG_ALPHA_BOUND)


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
            opts["masks"] = MaskSGD(groups, lr=cfg.mask_lr, clip=cfg.mask_clip, kernels=self.experts.kernels)
        return opts

    def _backward(self: SMAT, loss: Tensor) -> None:
        (self._scaler.scale(loss) if self._scaler is not None else loss).backward()

    def _step(self: SMAT) -> None:
        clips = {"router": self.cfg.router_clip}  # the masks' optimiser clips their gradient itself
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
