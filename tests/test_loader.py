"""EpisodeSet and make_loader: deterministic episodes from sources, whatever the workers."""

from __future__ import annotations

import pytest
import torch

from episodes.episode import Episode, Split
from episodes.loader import EpisodeSet, make_loader, resize_uint8
from episodes.readers.embedded import NotoGlyphs, SklearnDigits
from episodes.sampler import SamplerConfig


@pytest.fixture(scope="module")
def noto(tmp_path_factory):
    return NotoGlyphs(scripts=["latin", "greek"], instances=8, cache=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def digits():
    return SklearnDigits()


def same(a: Episode, b: Episode) -> bool:
    return (
        a.episode_id == b.episode_id
        and a.class_ids == b.class_ids
        and all(torch.equal(x, y) for x, y in zip(
            (a.support_x, a.support_y, a.query_x, a.query_y), (b.support_x, b.support_y, b.query_x, b.query_y)
        ))
    )


def test_episode_structure_and_labels(noto, digits):
    es = EpisodeSet([noto, digits], Split.TEST, n_episodes=6, seed=3)
    for i in range(len(es)):
        ep = es[i]
        way = len(ep.class_ids)
        assert ep.support_x.dtype == torch.uint8 and ep.support_x.shape[1:] == (3, 84, 84)
        assert ep.query_x.shape[0] == ep.query_y.shape[0] and ep.support_x.shape[0] == ep.support_y.shape[0]
        assert sorted(ep.support_y.unique().tolist()) == list(range(way)) and ep.way == way
        q = torch.bincount(ep.query_y, minlength=way)
        assert (q == q[0]).all() and q[0] >= 1  # balanced queries
        assert set(ep.class_ids) <= set((noto if ep.source == "noto" else digits).spec.class_ids(Split.TEST))


def test_images_match_the_plan(noto):
    es = EpisodeSet([noto], "test", n_episodes=3, seed=0)
    plan, ep = es.describe(2), es[2]
    assert plan.episode_id == ep.episode_id and plan.class_ids == ep.class_ids
    for row, (class_id, index) in enumerate(plan.support):
        assert ep.class_ids[ep.support_y[row]] == class_id
        expected = torch.from_numpy(noto.read(class_id, [index])[0]).permute(2, 0, 1)
        assert torch.equal(ep.support_x[row], expected)
    support, query = set(plan.support), set(plan.query)
    assert len(support) == len(plan.support) and not support & query  # no image twice


def test_describe_reads_no_image(noto, monkeypatch):
    es = EpisodeSet([noto], "train", n_episodes=4, seed=1)
    monkeypatch.setattr(noto, "read", lambda *a: pytest.fail("describe() read images"))
    plans = [es.describe(i) for i in range(4)]
    assert len({p.episode_id for p in plans}) == 4


def test_same_episodes_for_any_number_of_workers(noto, digits):
    es = EpisodeSet([noto, digits], "test", n_episodes=4, seed=5, image_size=40)  # resizing too
    serial = list(make_loader(es, num_workers=0))
    parallel = list(make_loader(es, num_workers=2))
    assert len(serial) == len(parallel) == 8
    assert all(same(a, b) for a, b in zip(serial, parallel))
    assert all(same(a, es[i]) for i, a in enumerate(serial))  # and for random access


def test_per_source_order_and_independence(noto, digits):
    both = EpisodeSet([noto, digits], "test", n_episodes=5, seed=2)
    assert [both.describe(i).source for i in range(10)] == ["noto"] * 5 + ["digits"] * 5
    alone = EpisodeSet([digits], "test", n_episodes=5, seed=2)
    # A source's episodes do not depend on which other sources share the set.
    assert [alone.describe(i).episode_id for i in range(5)] == [both.describe(5 + i).episode_id for i in range(5)]
    other_seed = EpisodeSet([digits], "test", n_episodes=5, seed=3)
    assert not {other_seed.describe(i).episode_id for i in range(5)} & {alone.describe(i).episode_id for i in range(5)}


def test_training_mixes_sources_uniformly(noto, tmp_path):
    other = NotoGlyphs(scripts=["latin"], instances=4, cache=tmp_path)
    other.name = "noto-small"  # a second source with its own name
    es = EpisodeSet([noto, other], "train", n_episodes=60, seed=0, per_source=False)
    assert len(es) == 60
    counts = {n: sum(es.describe(i).source == n for i in range(60)) for n in ("noto", "noto-small")}
    assert min(counts.values()) >= 15


def test_image_size_and_fixed_mode(noto):
    cfg = SamplerConfig(mode="fixed", way=5, shot=2, query=3, use_bilevel_hierarchy=False)
    es = EpisodeSet([noto], "test", cfg, n_episodes=2, image_size=32)
    ep = es[1]
    assert ep.support_x.shape == (10, 3, 32, 32) and ep.query_x.shape == (15, 3, 32, 32)
    assert ep.support_x.dtype == torch.uint8 and ep.shots == [2] * 5
    flat = torch.full((2, 3, 84, 84), 200, dtype=torch.uint8)
    assert (resize_uint8(flat, 224) == 200).all() and resize_uint8(flat, 84) is flat


def test_clear_errors(noto, digits):
    with pytest.raises(ValueError, match='Source "digits" split train has 0 classes'):
        EpisodeSet([noto, digits], "train", n_episodes=2)
    with pytest.raises(ValueError, match=r'Source "noto" split test class \d+ .* has 8 images, fewer than the 20'):
        EpisodeSet([noto], "test", SamplerConfig(mode="fixed", shot=5, query=15, use_bilevel_hierarchy=False))
    with pytest.raises(IndexError, match="out of range"):
        EpisodeSet([noto], "test", n_episodes=2).describe(2)


def test_train_augmentation_is_seeded_per_episode(noto, digits):
    from episodes.train_augment import TrainAugment

    plain = EpisodeSet([noto, digits], Split.TEST, SamplerConfig(), 2, seed=4, per_source=True)
    aug = EpisodeSet([noto, digits], Split.TEST, SamplerConfig(), 2, seed=4, per_source=True, augment=TrainAugment())
    a0 = [e for e in make_loader(aug, num_workers=0)]
    a2 = [e for e in make_loader(aug, num_workers=2)]
    for x, y, p in zip(a0, a2, plain):
        assert x.episode_id == y.episode_id == p.episode_id
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)
        assert x.support_x.shape == p.support_x.shape and x.support_x.dtype == torch.uint8
        assert not torch.equal(x.support_x, p.support_x)
