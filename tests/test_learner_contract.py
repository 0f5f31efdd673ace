"""Contract every registered learner must meet; a new learner is tested by being registered."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from episodes.episode import Episode, Split
from metabench.backbones import create_backbone
from metabench.config import EVAL_MODES
from metabench.finetuning import FineTuneOptions
from metabench.learners import create_learner, list_learners
from metabench.nn.heads import class_prototypes, cosine_logits
from metabench.training import load_learner_state, save_learner


def _episode(seed: int, way: int = 5, shots: int = 3, queries: int = 4, size: int = 32) -> Episode:
    g = torch.Generator().manual_seed(seed)
    # Each class is a brightness level plus noise, so there is something to learn.
    levels = torch.linspace(20, 230, way)
    def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(way).repeat_interleave(n)
        x = levels[y][:, None, None, None] + 20 * torch.randn(len(y), 3, size, size, generator=g)
        return x.clamp(0, 255).to(torch.uint8), y
    sx, sy = images(shots)
    qx, qy = images(queries)
    return Episode(sx, sy, qx, qy, "synthetic", Split.TRAIN, f"ep{seed}")


def _learner(name: str):
    torch.manual_seed(0)
    return create_learner(name, create_backbone("vit_test"))


@pytest.fixture(params=list_learners())
def learner_name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_adapt_and_predict_leave_the_learner_unchanged(learner_name: str) -> None:
    learner = _learner(learner_name).eval()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = _episode(0)
    state = learner.adapt(ep.support, mode="zero_shot", steps=0)
    logits = learner.predict(state, ep.query_x)
    assert logits.shape == (ep.query_y.numel(), ep.way)
    assert torch.isfinite(logits).all()
    after = learner.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode", EVAL_MODES)
def test_every_mode_leaves_the_learner_unchanged_and_is_deterministic(learner_name: str, mode: str) -> None:
    learner = _learner(learner_name).eval()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    ep = _episode(4)
    options = FineTuneOptions(lr=1e-3)
    steps = 0 if mode == "zero_shot" else 2
    first = learner.predict(learner.adapt(ep.support, mode=mode, steps=steps, options=options), ep.query_x)
    second = learner.predict(learner.adapt(ep.support, mode=mode, steps=steps, options=options), ep.query_x)
    assert first.shape == (ep.query_y.numel(), ep.way) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    after = learner.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in learner.parameters())  # not even gradients leak into the learner
    assert not learner.training


def test_checkpoint_round_trip_gives_identical_logits(learner_name: str, tmp_path: Path) -> None:
    learner = _learner(learner_name)
    if learner.meta_trainable:
        learner.train()
        learner.meta_train_step([_episode(5)])
    learner.eval()
    save_learner(learner, tmp_path / "learner.safetensors")
    torch.manual_seed(123)  # a different random init: only the checkpoint can make them agree
    fresh = create_learner(learner_name, create_backbone("vit_test")).eval()
    load_learner_state(fresh, tmp_path / "learner.safetensors")
    ep = _episode(6)
    assert torch.equal(learner.predict(learner.adapt(ep.support), ep.query_x),
                       fresh.predict(fresh.adapt(ep.support), ep.query_x))


def test_training_checkpoint_resumes_exactly(learner_name: str, tmp_path: Path) -> None:
    """Two updates in one go equal one update, a checkpoint, a fresh learner restored from it, one more update."""
    from metabench.checkpoint import load_training_checkpoint, read_position, save_training_checkpoint

    learner = _learner(learner_name)
    if not learner.meta_trainable:
        pytest.skip(f"{learner_name} has no meta-training phase")
    ident = {"learner": learner_name, "backbone": "vit_test"}
    learner.setup_training(4)
    learner.train()
    learner.meta_train_step([_episode(10)])
    save_training_checkpoint(tmp_path, learner, update=1, tasks=1, identity=ident)
    expected = learner.meta_train_step([_episode(11)])
    state = {k: v.clone() for k, v in learner.state_dict().items()}

    torch.manual_seed(123)  # a fresh process: other RNG state, other initial weights
    restored = create_learner(learner_name, create_backbone("vit_test"))
    restored.setup_training(4)
    load_training_checkpoint(tmp_path, read_position(tmp_path), restored, ident)
    restored.train()
    assert restored.meta_train_step([_episode(11)]) == expected
    assert all(torch.equal(state[k], v) for k, v in restored.state_dict().items())
    with pytest.raises(ValueError, match="belongs to"):
        load_training_checkpoint(tmp_path, read_position(tmp_path), restored, {**ident, "backbone": "vit_small"})


def test_zero_shot_is_deterministic(learner_name: str) -> None:
    learner = _learner(learner_name).eval()
    ep = _episode(1)
    first = learner.predict(learner.adapt(ep.support), ep.query_x)
    second = learner.predict(learner.adapt(ep.support), ep.query_x)
    assert torch.equal(first, second)


def test_meta_train_step_changes_only_trainable_parameters(learner_name: str) -> None:
    learner = _learner(learner_name)
    if not learner.meta_trainable:
        pytest.skip(f"{learner_name} has no meta-training phase")
    learner.train()
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    metrics = learner.meta_train_step([_episode(2), _episode(3)])
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    changed = {n for n, p in learner.named_parameters() if not torch.equal(before[n], p.detach())}
    trainable = {n for n, p in learner.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable


def test_describe_reports_parameter_counts(learner_name: str) -> None:
    info = _learner(learner_name).describe()
    assert info["learner"] == learner_name
    assert info["parameters"] >= info["trainable_parameters"] >= 0


def test_prototypes_and_cosine_head() -> None:
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    protos = class_prototypes(feats, torch.tensor([0, 0, 1]), 2)
    assert torch.equal(protos, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    logits = cosine_logits(torch.tensor([[1.0, 1.0]]), protos, scale=10.0)
    assert torch.allclose(logits, torch.full((1, 2), 10 / math.sqrt(2)))


def test_batchnorm_statistics_stay_pretrained_in_meta_training() -> None:
    learner = create_learner("pmf", create_backbone("efficientnet_lite0"))
    learner.train()
    bns = [m for m in learner.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    before = bns[0].running_mean.clone()
    learner.meta_train_step([_episode(5, size=32)])
    assert torch.equal(bns[0].running_mean, before)
    learner.cfg.freeze_batchnorm = False
    assert all(m.training for m in learner.train().modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_and_predictions_are_finite(learner_name: str, precision: str) -> None:
    """The engine's autocast (CPU here; the same code path picks CUDA when present)."""
    from metabench.engine import autocast

    learner, ep, cpu = _learner(learner_name), _episode(7), torch.device("cpu")
    if learner.meta_trainable:
        learner.setup_training(2)
        learner.train()
        with autocast(cpu, precision):
            metrics = learner.meta_train_step([ep])
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    learner.eval()
    with torch.no_grad(), autocast(cpu, precision):
        logits = learner.predict(learner.adapt(ep.support), ep.query_x)
    assert logits.shape == (ep.query_y.numel(), ep.way) and torch.isfinite(logits.float()).all()
