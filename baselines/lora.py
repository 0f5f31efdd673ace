"""``lora``: ProtoNet meta-tuning through LoRA adapters (Hu et al., ICLR 2022) on the backbone.

The same episodic objective, head and schedule as ``pmf``, but the backbone stays frozen and only
peft LoRA adapters on the linear layers of every ViT block (and the head's scale and bias) train:
a parameter-efficient meta-tuning baseline for SMAT's comparisons. Adapters are injected into the
``Backbone`` wrapper in place (``peft.inject_adapter_in_model``), so the wrapper keeps working and
the names stay readable (``backbone.model.blocks.0.attn.qkv.lora_A.default.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, inject_adapter_in_model

from baselines.pmf import PMF, PMFConfig
from metabench.config import LORA_TARGET
from metabench.learners import LEARNERS

__all__ = ["LoRA", "LoRALearnerConfig"]


@dataclass
class LoRALearnerConfig(PMFConfig):
    lr: float = 1e-3  # adapters start at zero and need a larger step than whole-backbone tuning
    weight_decay: float = 0.01
    rank: int = 8  # SMAT's LoRA setting: r 8, alpha 32, dropout 0.1
    alpha: float = 32.0
    dropout: float = 0.1
    target: str = LORA_TARGET  # regex over module names; a bare "proj" would also catch patch_embed.proj


@LEARNERS.register("lora")
class LoRA(PMF):
    """Frozen backbone + meta-trained LoRA adapters and cosine head."""

    Config = LoRALearnerConfig

    def configure_trainable(self) -> None:
        cfg = self.cfg
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target)
        try:
            inject_adapter_in_model(config, self.backbone)  # freezes every non-adapter weight of the backbone
        except ValueError as err:
            raise ValueError(f'learner.target "{cfg.target}" matches no layer of backbone '
                             f'"{self.backbone.spec.alias}"; set it to a regex over its module names.') from err
