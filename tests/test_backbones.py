"""Backbones and weight resolution: registry, tiny ViT behaviour, safe loading, offline fallback, package weights.

Offline by construction: the only "hub" is a cache directory built in tmp_path.
"""

from __future__ import annotations

import logging
import pickle
import socket
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from episodes.registry import RegistryError
from metabench import backbones as bb
from metabench.backbones import (
    BACKBONES,
    Backbone,
    WeightsError,
    create_backbone,
    list_backbones,
    load_state_dict_file,
)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty hub cache and offline mode, so nothing real can be found or fetched."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _features(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(x)


# --------------------------------------------------------------------------- registry


def test_registry_lists_the_papers_backbones_sorted():
    names = list_backbones()
    assert names == sorted(names) and {"vit_small", "efficientnet_lite0", "vit_test"} <= set(names)
    spec = BACKBONES.get("vit_small")
    assert (spec.timm_name, spec.tag, spec.weights) == ("vit_small_patch16_224", "dino", "hub")
    assert BACKBONES.get("efficientnet_lite0").timm_name == "tf_efficientnet_lite0"


def test_unknown_backbone_suggests_a_name():
    with pytest.raises(RegistryError, match='Did you mean "vit_small"'):
        create_backbone("vit_smal")


# --------------------------------------------------------------------------- the test ViT


def test_vit_test_is_a_real_tiny_timm_vit():
    b = create_backbone("vit_test")
    names = dict(b.named_parameters())
    assert "model.blocks.0.attn.qkv.weight" in names and "model.blocks.1.mlp.fc2.weight" in names
    assert "model.blocks.2.attn.qkv.weight" not in names
    assert 30_000 < sum(p.numel() for p in b.parameters()) < 200_000
    assert b.feature_dim == 48 and b.default_image_size == 32
    assert b.weights.source == "random" and not b.weights.pretrained
    assert "mean" not in b.state_dict() and "std" not in b.state_dict()  # non-persistent buffers
    info = b.describe()
    assert info["alias"] == "vit_test" and info["params"] == sum(p.numel() for p in b.model.parameters())


@pytest.mark.parametrize("size", [32, 48, 84])
def test_vit_test_any_image_size(size):
    b = create_backbone("vit_test")
    assert _features(b, _images(3, size)).shape == (3, 48)


def test_uint8_and_float_inputs_agree():
    b = create_backbone("vit_test")
    x = _images(4, 32)
    assert torch.equal(_features(b, x), _features(b, x.float() / 255))


def test_bad_input_shape_is_a_clear_error():
    b = create_backbone("vit_test")
    with pytest.raises(ValueError, match=r"\[n, 3, H, W\]"):
        b(torch.zeros(2, 1, 32, 32))


# --------------------------------------------------------------------------- explicit weights files


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt_wrapped"])
def test_weights_file_round_trip(tmp_path, fmt):
    torch.manual_seed(1)
    src = create_backbone("vit_test")
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    elif fmt == "pt":
        torch.save(src.state_dict(), path)  # "model." prefixes from the Backbone wrapper
    else:
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.model.state_dict().items()}}, path)
    torch.manual_seed(2)
    dst = create_backbone("vit_test", weights=str(path))
    x = _images(2, 48)
    assert torch.equal(_features(dst, x), _features(src, x))
    assert dst.weights.source == "file" and dst.weights.pretrained and dst.weights.location == str(path)
    assert dst.weights.sha256 is not None and len(dst.weights.sha256) == 64


def test_checkpoint_from_another_image_size_is_resampled(tmp_path):
    src = create_backbone("vit_test", image_size=64)  # 8x8 patch grid + CLS = 65 position embeddings
    assert src.model.pos_embed.shape[1] == 65
    path = tmp_path / "w64.safetensors"
    save_file(src.model.state_dict(), str(path))
    dst = create_backbone("vit_test", weights=path)  # 4x4 grid + CLS = 17
    assert dst.model.pos_embed.shape[1] == 17
    assert torch.equal(dst.model.blocks[1].attn.qkv.weight, src.model.blocks[1].attn.qkv.weight)
    assert torch.equal(dst.model.pos_embed[:, 0], src.model.pos_embed[:, 0])  # CLS position kept as is
    same_size = create_backbone("vit_test", weights=path, image_size=64)
    assert torch.equal(_features(same_size, _images(2, 64)), _features(src, _images(2, 64)))


def test_classifier_head_in_file_is_dropped(tmp_path):
    kwargs = BACKBONES.get("vit_test").kwargs
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, **kwargs)
    path = tmp_path / "with_head.pt"
    torch.save(model.state_dict(), path)
    assert "head.weight" in torch.load(path, weights_only=True)
    b = create_backbone("vit_test", weights=path)
    assert torch.equal(b.model.norm.weight, model.norm.weight)


def test_wrong_architecture_names_the_bad_key(tmp_path):
    kwargs = dict(BACKBONES.get("vit_test").kwargs, embed_dim=64)
    other = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **kwargs)
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(WeightsError, match=r"other\.safetensors.*'cls_token' has shape \(1, 1, 64\)"):
        create_backbone("vit_test", weights=path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = create_backbone("vit_test").model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "norm.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match=r"'norm\.weight' is missing"):
        create_backbone("vit_test", weights=tmp_path / "missing.safetensors")
    save_file({**sd, "extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsError, match=r"'extra\.weight' in the file is not in the model"):
        create_backbone("vit_test", weights=tmp_path / "extra.safetensors")


class _Boom:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_corrupt_and_malicious_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01definitely not weights" * 10)
    (tmp_path / "notes.txt").write_text("hello")
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(100)}, str(good))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-50])
    for name in ("junk.bin", "notes.txt", "cut.safetensors"):
        with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
            load_state_dict_file(tmp_path / name)
    marker = tmp_path / "code_ran"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"w": _Boom(marker)}, f)
    torch.save({"w": torch.ones(1), "x": _Boom(marker)}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="neither a safetensors file nor a torch state dict"):
        load_state_dict_file(tmp_path / "evil.pkl")
    with pytest.raises(WeightsError, match="Python objects other than tensors"):
        create_backbone("vit_test", weights=tmp_path / "evil.pt")
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "mixed.pt")  # allowed by weights_only, not weights
    with pytest.raises(WeightsError, match="entry 'step' is a int"):
        load_state_dict_file(tmp_path / "mixed.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict_file(tmp_path / "absent.pt")
    assert not marker.exists()


# --------------------------------------------------------------------------- resolution without a --weights file


def test_offline_without_cache_falls_back_to_random_quickly(empty_hub, caplog):
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="metabench.backbones"):
        b = create_backbone("vit_small")
    assert time.perf_counter() - start < 10
    assert not b.weights.pretrained and b.weights.source == "random" and b.weights.tag == "dino"
    assert "HF_HUB_OFFLINE" in b.weights.note
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "vit_small" in record.getMessage() and "near chance" in record.getMessage()
    assert "--weights PATH" in record.getMessage()
    assert b.feature_dim == 384 and b.default_image_size == 224
    assert b.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # DINO's ImageNet statistics


def test_unreachable_hub_fails_fast_without_downloading(empty_hub, monkeypatch):
    with socket.socket() as s:  # a local port with nobody listening: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(bb, "hub_download", lambda *a, **k: pytest.fail("tried to download"))
    start = time.perf_counter()
    b = create_backbone("vit_tiny")
    assert time.perf_counter() - start < 10
    assert b.weights.source == "random" and "did not answer" in b.weights.note
    assert create_backbone("vit_tiny", allow_download=False).weights.note.endswith("downloads were not allowed.")


def test_weights_from_a_populated_hub_cache(empty_hub):
    repo = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = empty_hub / f"models--{repo.replace('/', '--')}"
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    torch.manual_seed(3)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)  # hub files keep the head
    save_file(ref.state_dict(), str(repo_dir / "snapshots" / commit / "model.safetensors"))
    b = create_backbone("vit_tiny")
    assert b.weights.pretrained and b.weights.source == "hub_cache" and b.weights.location == repo
    assert torch.equal(b.model.blocks[11].mlp.fc2.weight, ref.blocks[11].mlp.fc2.weight)
    assert b.mean.flatten().tolist() == [0.5, 0.5, 0.5]


# --------------------------------------------------------------------------- package weights (EfficientNet-Lite0)


def _imagenet_input(image) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)


def test_efficientnet_lite0_package_weights_classify_imagenet_photos(empty_hub):
    data = pytest.importorskip("skimage.data")
    headless = create_backbone("efficientnet_lite0")
    assert headless.weights.source == "package" and headless.weights.pretrained
    assert headless.weights.location.endswith("models/efficientnet-lite0-57934424.pth")
    assert headless.feature_dim == 1280 and headless.default_image_size == 224
    assert headless.mean.flatten().tolist() == [0.5] * 3 and headless.std.flatten().tolist() == [0.5] * 3
    classifier = bb._create_backbone("efficientnet_lite0", num_classes=1000)
    for image, label in ((data.chelsea(), 285), (data.coffee(), 967)):  # Egyptian cat, espresso
        x = _imagenet_input(image)
        assert _features(classifier, x).argmax(-1).item() == label
        assert _features(headless, x).shape == (1, 1280)


def test_package_file_of_another_model_is_refused(tmp_path, monkeypatch):
    other = tmp_path / "pkg.pth"
    torch.save(create_backbone("vit_test").model.state_dict(), other)
    monkeypatch.setattr(bb, "package_file", lambda package, relative: other)
    with pytest.raises(WeightsError, match="tensors but the timm model expects 296"):
        create_backbone("efficientnet_lite0")


def test_channels_last_inputs_give_the_features_of_nchw_inputs() -> None:
    """EfficientNet runs on channels-last inputs (faster on CPU); the features are those of the NCHW forward."""
    backbone = create_backbone("efficientnet_lite0").eval()
    assert backbone.spec.channels_last
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        nchw = backbone.model((x.float() / 255 - backbone.mean) / backbone.std)
        assert torch.allclose(backbone(x), nchw, atol=1e-4, rtol=1e-4)
