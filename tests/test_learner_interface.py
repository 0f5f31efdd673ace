"""The minimal Learner interface: adapt + predict are all a method needs; the prototype defaults are opt-in."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import metabench
from episodes.loader import EpisodeSet
from episodes.readers.embedded import SklearnDigits
from episodes.sampler import SamplerConfig
from metabench.backbones import create_backbone
from metabench.learners.base import Learner, LearnerConfig, PrototypeLearner, TaskState


@dataclass
class PixelState(TaskState):
    means: torch.Tensor


class NearestPixelMean(Learner):
    """Nearest class mean in raw pixel space: no backbone features, no prototype machinery."""

    def adapt(self, support, *, mode="zero_shot", steps=0, options=None) -> PixelState:
        x = support.x.float().flatten(1)
        return PixelState(support.way, torch.stack([x[support.y == c].mean(0) for c in range(support.way)]))

    def predict(self, state, query_x):
        return -torch.cdist(query_x.float().flatten(1), state.means)


def test_learner_is_abstract_until_adapt_and_predict_exist() -> None:
    backbone = create_backbone("vit_test")
    with pytest.raises(TypeError, match="abstract"):
        Learner(backbone, LearnerConfig())  # type: ignore[abstract]
    assert not NearestPixelMean(backbone, LearnerConfig(name="nearest")).meta_trainable
    assert issubclass(PrototypeLearner, Learner)


def test_a_minimal_learner_is_evaluated_like_any_other() -> None:
    learner = NearestPixelMean(create_backbone("vit_test"), LearnerConfig(name="nearest"))
    episodes = EpisodeSet([SklearnDigits()], "test", SamplerConfig(mode="fixed", way=5, shot=3, query=4), n_episodes=4,
                          seed=0, image_size=32, per_source=True)
    rows = metabench.evaluate(learner, episodes, modes=["zero_shot"])
    assert len(rows) == 4 and set(rows["learner"]) == {"nearest"}
    assert rows["accuracy"].mean() > 0.5  # digits are well separated in pixel space
