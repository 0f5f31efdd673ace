"""Evaluation protocols: zero-shot, and test-time fine-tuning of a task model on its support set.

``full`` and ``lora`` follow PMF's deploy-time fine-tuning (Hu et al., CVPR 2022), as SMAT (ICML
2024) uses it for its "+full" and "+LoRA" columns: a copy of the task model is trained for N steps
on cross-entropy of augmented support images (pseudo-queries) against prototypes recomputed from the
clean support images with the current weights. ``lora`` trains only peft LoRA adapters, at a larger
learning rate. The learner and the model passed in are never changed.

Learning rates are chosen without test query labels (PMF and SMAT choose them on labelled test
queries): see ``metabench.lr_selection``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodes.episode import Support
from metabench.config import EVAL_MODES, OPTIMIZERS, EvalConfig, FineTuneSettings
from metabench.nn.batchnorm import freeze_batchnorm_stats
from metabench.nn.diff_augment import diff_augment
from metabench.nn.heads import class_prototypes, embed

if TYPE_CHECKING:
    from metabench.learners.base import Learner

__all__ = [
    "FINE_TUNING_MODES",
    "FineTuneOptions",
    "EvalProtocol",
    "fine_tune",
    "merge_adapters",
    "plan_protocols",
    "prepare",
    "support_loss",
]

log = logging.getLogger(__name__)

FINE_TUNING_MODES: tuple[str, ...] = tuple(m for m in EVAL_MODES if m != "zero_shot")


@dataclass
class FineTuneOptions(FineTuneSettings):
    """How ``fine_tune`` trains: the run's ``FineTuneSettings`` (``eval.*``, see ``from_eval``), a learning rate and
    what a run does not set. The number of steps is the caller's (it is part of the protocol). Treat it as
    immutable (``with_lr``, ``dataclasses.replace``): one options object serves many tasks.
    """

    lr: float = 1e-4  # PMF's README example (ada_lr 1e-4); evaluation runs choose it, see lr_selection
    momentum: float = 0.9  # sgd only
    translation: float = 0.125  # largest shift, as a fraction of the image size
    seed: int = 0  # seeds the augmentation generator, so a task always gets the same pseudo-queries

    @classmethod
    def from_eval(cls, ev: EvalConfig, **overrides: Any) -> FineTuneOptions:
        """Options from the ``FineTuneSettings`` of ``ev`` (and ``ev.lr`` when it is set), then ``overrides``."""
        shared = {f.name: getattr(ev, f.name) for f in fields(FineTuneSettings)}
        lr = {} if ev.lr is None else {"lr": ev.lr}
        return cls(**{**shared, **lr, **overrides})

    def with_lr(self, lr: float) -> FineTuneOptions:
        return dataclasses.replace(self, lr=float(lr))


@dataclass(frozen=True)
class EvalProtocol:
    """One evaluation protocol: a mode and its number of fine-tuning steps (0 for zero_shot)."""

    mode: str
    steps: int

    @property
    def fine_tunes(self) -> bool:
        return self.mode != "zero_shot"

    @property
    def label(self) -> str:
        return f"{self.mode}@{self.steps}" if self.fine_tunes else self.mode


def plan_protocols(modes: Sequence[str], steps: Sequence[int]) -> list[EvalProtocol]:
    """Every (mode, steps) pair to evaluate: zero_shot once, with 0 steps; each fine-tuning mode with
    each positive step count (0 steps of fine-tuning would repeat zero_shot)."""
    for mode in modes:
        if mode not in EVAL_MODES:
            raise ValueError(f'Unknown evaluation mode "{mode}"; known: {", ".join(EVAL_MODES)}.')
    if any(s < 0 for s in steps):
        raise ValueError(f"Fine-tuning step counts must not be negative, got {list(steps)}.")
    positive = [int(s) for s in dict.fromkeys(steps) if s > 0]
    plan: list[EvalProtocol] = []
    for mode in dict.fromkeys(modes):
        if mode == "zero_shot":
            plan.append(EvalProtocol("zero_shot", 0))
        elif not positive:
            raise ValueError(f'Mode "{mode}" fine-tunes but no positive step count was given ({list(steps)}); '
                             "pass one, e.g. --steps 0 50.")
        else:
            plan.extend(EvalProtocol(mode, s) for s in positive)
    return plan


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every peft adapter layer of ``model`` into its base layer, in place (e.g. a LoRA learner's
    meta-trained adapters), so test-time fine-tuning starts from one plain set of weights."""
    if "peft" not in sys.modules:  # no peft layer can exist before peft is imported
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in [(n, m) for n, m in model.named_modules() if n and isinstance(m, BaseTunerLayer)]:
        layer.merge()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer.get_base_layer())
    for module in model.modules():  # inject_adapter_in_model leaves its config on the model it was given
        module.__dict__.pop("peft_config", None)
    return model


def _inject_lora(model: nn.Module, options: FineTuneOptions) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=options.lora_target)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ValueError(f'The LoRA target regex "{options.lora_target}" (eval.lora_target) matches no layer of the '
                         f"{type(model).__name__} task model; set it to a regex over its module names.") from err
    if options.lora_qkv != "qkv":
        _restrict_qkv(model, options.lora_qkv)


def _restrict_qkv(model: nn.Module, parts: str) -> None:
    """Keep the adapters of fused ``qkv`` layers off the q, k or v outputs not in ``parts`` (e.g. "qv", as
    SMAT's LoRA on separate query and value layers): their rows of lora_B start at zero and get no gradient,
    so they stay zero under Adam and AdamW (decoupled weight decay keeps a zero at zero)."""
    if not parts or set(parts) - set("qkv"):
        raise ValueError(f'eval.lora_qkv must be a subset of "qkv" (e.g. "qv"), not "{parts}".')
    for name, module in model.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if not name.endswith("qkv") or lora_b is None:
            continue
        for linear in lora_b.values():
            third = linear.weight.shape[0] // 3
            keep = torch.zeros(linear.weight.shape[0], 1, dtype=linear.weight.dtype, device=linear.weight.device)
            for i, part in enumerate("qkv"):
                if part in parts:
                    keep[i * third:(i + 1) * third] = 1.0
            with torch.no_grad():
                linear.weight.mul_(keep)
            linear.weight.register_hook(lambda grad, keep=keep: grad * keep)


def prepare(model: nn.Module, mode: str, options: FineTuneOptions) -> tuple[nn.Module, list[nn.Parameter]]:
    """A trainable copy of ``model`` for ``mode`` and the parameters fine-tuning updates.

    ``full``: every parameter; ``lora``: only fresh LoRA adapters (``options.lora_*``).
    """
    tuned = merge_adapters(copy.deepcopy(model))
    if mode == "full":
        tuned.requires_grad_(True)
    elif mode == "lora":
        tuned.requires_grad_(False)
        _inject_lora(tuned, options)
    else:
        raise ValueError(f'fine_tune mode must be one of {", ".join(FINE_TUNING_MODES)}, not "{mode}".')
    return tuned, [p for p in tuned.parameters() if p.requires_grad]


def _optimizer(params: list[nn.Parameter], options: FineTuneOptions, lr: float) -> torch.optim.Optimizer:
    if options.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=options.weight_decay)
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=options.weight_decay)
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=options.momentum, weight_decay=options.weight_decay)
    raise ValueError(f'Fine-tuning optimizer must be one of {", ".join(OPTIMIZERS)}, not "{options.optimizer}".')


def _train_mode(model: nn.Module) -> None:
    """Train mode (LoRA dropout on) but frozen batch-norm statistics: a support set is too small a batch."""
    model.train()
    freeze_batchnorm_stats(model)


def as_float_images(x: Tensor) -> Tensor:
    """uint8 images to float in [0, 1]; float images are assumed to be in [0, 1] already."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def support_loss(learner: Learner, model: nn.Module, x: Tensor, y: Tensor, way: int,
                 generator: torch.Generator, options: FineTuneOptions) -> Tensor:
    """Cross-entropy of pseudo-queries (augmented support images) against prototypes of the clean
    support images, both embedded by ``model`` with gradients (PMF's fine-tuning objective)."""
    prototypes = class_prototypes(embed(model, x, options.batch_size).float(), y, way)
    if x.shape[0] > options.batch_size:
        pick = torch.randperm(x.shape[0], generator=generator)[: options.batch_size].to(x.device)
        x, y = x[pick], y[pick]
    if options.augment:
        x = diff_augment(x, generator, prob=options.augment_prob, flip_prob=options.flip_prob,
                         translation=options.translation)
    return F.cross_entropy(learner.logits(embed(model, x, options.batch_size), prototypes).float(), y)


def fine_tune(learner: Learner, model: nn.Module, support: Support, *, mode: str, steps: int,
              options: FineTuneOptions | None = None) -> nn.Module:
    """Fine-tune a copy of ``model`` on ``support`` for ``steps`` steps; returns it in eval mode.

    Neither ``learner`` nor ``model`` is modified (gradients are taken with ``torch.autograd.grad``,
    so not even the ``.grad`` of the learner's head parameters changes). ``lr = 0`` or ``steps = 0``
    returns ``model`` itself: the protocol reduces to zero-shot.
    """
    options = options or FineTuneOptions()
    if mode not in FINE_TUNING_MODES:
        raise ValueError(f'fine_tune mode must be one of {", ".join(FINE_TUNING_MODES)}, not "{mode}".')
    if steps <= 0 or options.lr == 0:
        return model
    x, y = as_float_images(support.x), support.y
    cuda = [x.device] if x.device.type == "cuda" else []
    # Adapter init and LoRA dropout draw from the global RNG: fork it, so a task always gets the same
    # model and the caller's random stream is left as it was.
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        torch.manual_seed(options.seed)
        tuned, params = prepare(model, mode, options)
        lr = options.lr * (options.lora_lr_scale if mode == "lora" else 1.0)
        optimizer = _optimizer(params, options, lr)
        generator = torch.Generator().manual_seed(options.seed)
        _train_mode(tuned)
        for _ in range(steps):
            loss = support_loss(learner, tuned, x, y, support.way, generator, options)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
    log.debug("fine_tune %s: %d steps at lr %g, last loss %.4f", mode, steps, lr, loss.item())
    return tuned.eval().requires_grad_(False)
