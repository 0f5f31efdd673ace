"""Behaviour specific to the comparison learners (pmf, lora, finetune); the shared contract: test_learner_contract."""

from __future__ import annotations

import math

import pytest
import torch

from episodes.episode import Episode, Split
from metabench.backbones import create_backbone
from metabench.config import load_config
from metabench.learners import create_learner, learner_config_class
from metabench.runs import plan_eval


def _learner(name: str, **options):
    torch.manual_seed(0)
    return create_learner(name, create_backbone("vit_test"), learner_config_class(name)(name=name, **options))


def _episode(seed: int, way: int = 3, shots: int = 3, queries: int = 3) -> Episode:
    g = torch.Generator().manual_seed(seed)
    levels = torch.linspace(30, 220, way)
    y = torch.arange(way).repeat_interleave(shots + queries)
    x = (levels[y][:, None, None, None] + 25 * torch.randn(len(y), 3, 32, 32, generator=g)).clamp(0, 255)
    support = (torch.arange(len(y)) % (shots + queries)) < shots
    x = x.to(torch.uint8)
    return Episode(x[support], y[support], x[~support], y[~support], "synthetic", Split.TRAIN, f"e{seed}")


def test_warmup_cosine_schedule_drives_the_learning_rate() -> None:
    from metabench.schedules import warmup_cosine

    factors = [warmup_cosine(u, warmup=2, total=10) for u in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] < 0.05
    learner = _learner("pmf", lr=1e-3, warmup_fraction=0.2)
    learner.setup_training(10)
    learner.train()
    lrs = [learner.meta_train_step([_episode(i)])["lr"] for i in range(3)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])


def test_pmf_trains_the_whole_backbone_and_its_head() -> None:
    learner = _learner("pmf", clip_grad=1.0)
    assert all(p.requires_grad for p in learner.backbone.parameters())
    assert learner.head.scale.item() == 10.0 and learner.head.bias.item() == 0.0
    learner.train()
    ep = _episode(0)
    first = learner.meta_train_step([ep])
    assert math.isfinite(first["grad_norm"])
    for _ in range(4):
        last = learner.meta_train_step([ep])
    assert last["loss"] < first["loss"]  # the same episode gets easier
    assert learner.head.scale.item() != 10.0 and learner.head.bias.item() != 0.0
    decayed = {id(p) for p in learner.optimizer.param_groups[0]["params"]}
    assert id(learner.head.scale) not in decayed and id(learner.backbone.model.blocks[0].attn.qkv.weight) in decayed


def test_lora_meta_tunes_only_adapters_and_head() -> None:
    lora, pmf = _learner("lora"), _learner("pmf")
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n} | {"head.scale", "head.bias"}
    assert "backbone.model.blocks.0.attn.qkv.lora_A.default.weight" in trainable
    assert not any("patch_embed" in n for n in trainable)
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    n_pmf = sum(p.numel() for p in pmf.parameters() if p.requires_grad)
    assert lora.describe()["trainable_parameters"] == n_lora < n_pmf / 4
    # LoRA's B starts at zero: before training, the learner is the pretrained backbone.
    ep = _episode(1)
    assert torch.allclose(lora.predict(lora.adapt(ep.support), ep.query_x),
                          pmf.predict(pmf.adapt(ep.support), ep.query_x), atol=1e-5)


def test_finetune_defaults_to_full_fine_tuning_and_zero_shot_still_works() -> None:
    cfg = load_config(overrides=["eval.steps=7"], flags={"learner": {"name": "finetune"}})
    learner = _learner("finetune")
    assert [p.label for p in plan_eval(cfg, learner)] == ["full@7"]
    assert [p.label for p in plan_eval(cfg, learner, modes=["zero_shot"])] == ["zero_shot"]
    pre_cfg = load_config(flags={"learner": {"name": "pre"}})
    assert [p.label for p in plan_eval(pre_cfg, _learner("pre"))] == ["zero_shot"]
    ep = _episode(2)
    pre = _learner("pre")
    assert torch.equal(learner.predict(learner.adapt(ep.support), ep.query_x),
                       pre.predict(pre.adapt(ep.support), ep.query_x))
    assert not learner.meta_trainable


def test_default_lora_target_covers_vits_and_efficientnets() -> None:
    """ViT blocks' Linear layers; EfficientNet's 1x1 convs and head conv, never the stem or depthwise convs."""
    import re

    import timm

    from metabench.config import LORA_TARGET

    names = [n for n, m in timm.create_model("tf_efficientnet_lite0").named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    chosen = {n for n in names if re.fullmatch(LORA_TARGET, f"backbone.model.{n}")}
    assert {"blocks.0.0.conv_pw", "blocks.1.0.conv_pwl", "conv_head"} <= chosen and len(chosen) == 32
    assert not any("conv_dw" in n or n in ("conv_stem", "classifier") for n in chosen)
    vit = {n for n, _ in create_backbone("vit_test").named_modules() if re.fullmatch(LORA_TARGET, n)}
    assert vit == {f"model.blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
