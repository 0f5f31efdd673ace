"""Backbones: short aliases for timm models with pretrained tags, and where their weights come from.

A ``Backbone`` wraps a headless timm model (``num_classes=0``: pooled features; ViTs use the CLS token
as DINO and PMF do) together with the input normalisation of its pretrained tag, so learners feed it
raw images. timm is never asked to download: models are built with ``pretrained=False`` and weights
are resolved here, in this order, and recorded as ``WeightsInfo`` for the run manifest:

1. an explicit ``weights=PATH`` (safetensors or torch state dict),
2. a file shipped inside an installed package ("package" backbones),
3. the local Hugging Face hub cache for timm's hub id of the tag,
4. a download from the hub, only when allowed, not offline, and the host answers within ~2 s,
5. otherwise random init, with a warning that accuracy will be near chance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from metabench.backbone_specs import BACKBONES, PACKAGE_FILES, BackboneSpec
from metabench.weights import (
    WeightsError,
    WeightsInfo,
    find_in_hub_cache,
    hub_cache_dir,
    hub_download,
    hub_offline,
    hub_reachable,
    load_into,
    load_state_dict_file,
    map_by_position,
    package_file,
    sha256_file,
)

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "WeightsError",
    "WeightsInfo",
    "create_backbone",
    "list_backbones",
    "load_state_dict_file",
]

log = logging.getLogger(__name__)

class Backbone(nn.Module):
    """A timm model returning pooled features, with its own input normalisation.

    Keeping mean/std here (from timm's pretrained config for the tag) means data pipelines hand over
    images in [0, 1] or uint8 and never hard-code a model's statistics.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, weights: WeightsInfo, default_image_size: int) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.weights = weights
        self.default_image_size = int(default_image_size)
        self.feature_dim = int(getattr(model, "num_classes", 0) or model.num_features)
        cfg = model.pretrained_cfg
        # Non-persistent: they come from the tag, not from a checkpoint, and follow .to(device/dtype).
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[n, feature_dim]`` for images ``x``: uint8 ``[n, 3, H, W]`` in 0..255 or float in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Backbone {self.spec.alias} expects images shaped [n, 3, H, W], got {tuple(x.shape)}.")
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255
        elif x.is_floating_point():
            x = x.to(self.mean.dtype)
        else:
            raise TypeError(f"Backbone {self.spec.alias} expects uint8 or float images, got {x.dtype}.")
        x = (x - self.mean) / self.std
        return self.model(x.contiguous(memory_format=torch.channels_last) if self.spec.channels_last else x)

    def describe(self) -> dict[str, Any]:
        """Flat provenance for manifests and ``metabench ls``."""
        return {
            "alias": self.spec.alias,
            "timm_name": self.spec.timm_name,
            "tag": self.spec.tag,
            "params": sum(p.numel() for p in self.model.parameters()),
            "feature_dim": self.feature_dim,
            "image_size": self.default_image_size,
            "pretrained": self.weights.pretrained,
            "weights_source": self.weights.source,
            "weights_location": self.weights.location,
            "weights_sha256": self.weights.sha256,
            "weights_note": self.weights.note,
        }


def list_backbones() -> list[str]:
    """Registered backbone aliases, sorted."""
    return BACKBONES.names()


def create_backbone(
    name: str, *, weights: str | Path | None = None, image_size: int | None = None, allow_download: bool = True
) -> Backbone:
    """Build the backbone registered as ``name`` and load its weights (see the module docstring for the order).

    Args:
        name: a registered alias, e.g. "vit_small".
        weights: path of a safetensors or torch state dict that takes precedence over every other source.
        image_size: the size the model is built for (ViT position embeddings are resampled to it);
            other sizes still work at run time. Defaults to the pretrained config's size.
        allow_download: whether step 4 (downloading from the hub) may run.
    """
    return _create_backbone(name, weights=weights, image_size=image_size, allow_download=allow_download)


def _create_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    image_size: int | None = None,
    allow_download: bool = True,
    num_classes: int = 0,
) -> Backbone:
    """``create_backbone`` plus ``num_classes``: a classifier head exists only for checks against ImageNet labels."""
    spec = BACKBONES.get(name)
    model = _build_model(spec, image_size=image_size, num_classes=num_classes)
    info = _resolve_weights(model, spec, weights=weights, allow_download=allow_download)
    default_size = image_size or spec.kwargs.get("img_size") or model.pretrained_cfg["input_size"][-1]
    return Backbone(model, spec, info, default_size)


def _build_model(spec: BackboneSpec, *, image_size: int | None, num_classes: int) -> nn.Module:
    kwargs = dict(spec.kwargs)
    if image_size is not None and kwargs.get("dynamic_img_size"):
        kwargs["img_size"] = image_size  # sizes the position-embedding grid that checkpoints are resampled to
    # pretrained=False always: weights are resolved below, so timm never reaches for the network.
    return timm.create_model(spec.timm_id, pretrained=False, num_classes=num_classes, **kwargs)


def _resolve_weights(
    model: nn.Module, spec: BackboneSpec, *, weights: str | Path | None, allow_download: bool
) -> WeightsInfo:
    """Walk the resolution order, load the first weights found into ``model``, and say what happened."""
    if weights is not None:
        path = Path(weights).expanduser()
        load_into(model, load_state_dict_file(path), origin=str(path))
        log.info("Backbone %s: loaded weights from %s", spec.alias, path)
        note = "Loaded from an explicit weights file."
        return WeightsInfo(True, "file", str(path), spec.tag, sha256_file(path), note)
    if spec.weights == "none":
        return WeightsInfo(False, "random", None, None, None, f"{spec.alias} uses random init by design.")
    if spec.weights == "package":
        info = _from_package(model, spec)
        if info is not None:
            return info
    info, why_not = _from_hub(model, spec, allow_download=allow_download)
    if info is not None:
        return info
    log.warning(
        "Backbone %s found no pretrained weights (no weights file, nothing for %s in the hub cache at %s, %s), "
        "so it starts from random init and accuracy will be near chance; "
        "pass --weights PATH or populate the Hugging Face hub cache.",
        spec.alias, _hub_id(spec) or spec.timm_id, hub_cache_dir(), why_not,
    )  # fmt: skip
    note = f"Random init: no weights file and nothing in the hub cache, and {why_not}."
    return WeightsInfo(False, "random", None, spec.tag, None, note)


def _from_package(model: nn.Module, spec: BackboneSpec) -> WeightsInfo | None:
    """Load a package-shipped port whose key names differ from timm's, matching tensors by position."""
    package, relative = PACKAGE_FILES[spec.alias]
    path = package_file(package, relative)
    location = f"{package}/{relative}"  # machine-independent, for manifests
    if path is None:
        log.info("Backbone %s: package file %s is not installed; trying the hub cache.", spec.alias, location)
        return None
    # The port keeps its ImageNet head, so map against a full timm model (on "meta": shapes only, no memory).
    with torch.device("meta"):
        reference = timm.create_model(spec.timm_id, pretrained=False, **spec.kwargs)
    sd = map_by_position(load_state_dict_file(path), reference.state_dict(), origin=str(path))
    load_into(model, sd, origin=str(path))
    log.info("Backbone %s: loaded weights from package file %s", spec.alias, location)
    return WeightsInfo(True, "package", location, spec.tag, sha256_file(path), "Loaded from a package-shipped file.")


def _hub_id(spec: BackboneSpec) -> str | None:
    if not spec.tag:
        return None
    cfg = timm.models.get_pretrained_cfg(spec.timm_id)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _hub_filenames(spec: BackboneSpec) -> tuple[str, ...]:
    cfg = timm.models.get_pretrained_cfg(spec.timm_id)
    name = getattr(cfg, "hf_hub_filename", None)
    return (name,) if name else ("model.safetensors", "pytorch_model.bin")


def _from_hub(model: nn.Module, spec: BackboneSpec, *, allow_download: bool) -> tuple[WeightsInfo | None, str]:
    """The local hub cache first; a download only when allowed, online, and the host answers quickly.

    Returns the loaded weights' info, or None and the reason nothing was downloaded.
    """
    repo_id = _hub_id(spec)
    if repo_id is None:
        return None, f"timm knows no hub id for {spec.timm_id}"
    filenames = _hub_filenames(spec)
    path = find_in_hub_cache(repo_id, filenames)
    source, note = "hub_cache", "Loaded from the local Hugging Face hub cache."
    if path is None:
        if not allow_download:
            return None, "downloads were not allowed"
        if hub_offline():
            return None, "HF_HUB_OFFLINE is set"
        if not hub_reachable():
            return None, "the Hugging Face hub did not answer within 2 s"
        log.info("Backbone %s: downloading %s from the Hugging Face hub.", spec.alias, repo_id)
        path = hub_download(repo_id, filenames)
        source, note = "hub", "Downloaded from the Hugging Face hub."
        if path is None:
            return None, "the download from the Hugging Face hub failed"
    load_into(model, load_state_dict_file(path), origin=str(path))
    log.info("Backbone %s: loaded weights for %s from %s", spec.alias, repo_id, path)
    return WeightsInfo(True, source, repo_id, spec.tag, sha256_file(path), note), ""
