"""Meta-Dataset sampler rules and DatasetSpec, on specs built here (no data needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from episodes.sampler import (
    EpisodeDescription,
    SamplerConfig,
    compute_num_query,
    sample_class_ids,
    sample_episode_description,
    sample_num_support_per_class,
    sample_num_ways,
    sample_support_set_size,
)
from episodes.spec import DatasetSpec, SpecError
from episodes.split import Split


def flat_spec(counts: dict[Split, list[int]], name: str = "fake") -> DatasetSpec:
    """Classes with the given image counts, ids contiguous by split (TRAIN, VALID, TEST)."""
    sizes = counts.get(Split.TRAIN, []) + counts.get(Split.VALID, []) + counts.get(Split.TEST, [])
    return DatasetSpec(
        name=name,
        classes_per_split={s: len(counts.get(s, [])) for s in Split},
        images_per_class=dict(enumerate(sizes)),
    )


def bilevel_spec() -> DatasetSpec:
    """Omniglot-like: 4 TRAIN superclasses of 6, 9, 14 and 3 classes, 1 TEST superclass of 7."""
    per_super = [6, 9, 14, 3, 7]
    n = sum(per_super)
    return DatasetSpec(
        name="alphabets",
        classes_per_split={Split.TRAIN: n - 7, Split.VALID: 0, Split.TEST: 7},
        images_per_class={c: 20 for c in range(n)},
        superclasses_per_split={Split.TRAIN: 4, Split.VALID: 0, Split.TEST: 1},
        classes_per_superclass=dict(enumerate(per_super)),
    )


MD_LIKE = flat_spec({Split.TRAIN: [10, 20, 30] * 10, Split.VALID: [10, 20, 30] * 2, Split.TEST: [40] * 8})
BIG = flat_spec({Split.TRAIN: list(range(30, 1300, 20))})  # ImageNet-sized classes


# -- spec ----------------------------------------------------------------------------------------
def test_spec_ids_and_json_round_trip(tmp_path):
    spec = bilevel_spec()
    assert spec.class_ids(Split.TEST) == list(range(32, 39))
    assert spec.superclass_ids("train") == [0, 1, 2, 3]
    assert spec.classes_of_superclass(1) == list(range(6, 15))
    assert spec.split_of(33) is Split.TEST
    path = tmp_path / "dataset_spec.json"
    spec.to_json(path)
    assert DatasetSpec.from_json(path) == spec


def test_spec_reads_meta_dataset_split_spellings():
    data = {
        "name": "md",
        "classes_per_split": {"Split.TRAIN": 2, "Split.VALID": 1, "Split.TEST": 1},
        "images_per_class": {"0": 5, "1": 6, "2": 7, "3": 8},
        "class_names": {"0": "n01", "3": "n04"},
        "path": "/data/md",
        "file_pattern": "{}.tfrecords",
        "__class__": "DatasetSpecification",
        "split_subgraphs": {"TRAIN": []},
    }
    spec = DatasetSpec.from_json(data)
    assert spec.classes_per_split == {Split.TRAIN: 2, Split.VALID: 1, Split.TEST: 1}
    assert spec.images_per_class[3] == 8 and spec.class_name(3) == "n04" and spec.class_name(1) == "1"
    assert json.loads(spec.to_json())["split_subgraphs"] == {"TRAIN": []}  # unknown MD keys survive


def test_spec_errors_name_the_problem(tmp_path):
    with pytest.raises(SpecError, match="adds up to 3 classes but images_per_class lists 2"):
        DatasetSpec("x", {Split.TRAIN: 3}, {0: 1, 1: 1})
    with pytest.raises(SpecError, match="split TRAIN has 5 classes .* superclasses list 4"):
        DatasetSpec("x", {Split.TRAIN: 5}, {c: 1 for c in range(5)}, superclasses_per_split={Split.TRAIN: 1},
                    classes_per_superclass={0: 4})
    with pytest.raises(SpecError, match="Unknown split"):
        DatasetSpec.from_json({"name": "x", "classes_per_split": {"TRAINING": 1}, "images_per_class": {"0": 1}})
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(SpecError, match="bad.json: not valid JSON"):
        DatasetSpec.from_json(tmp_path / "bad.json")


# -- variable-way variable-shot invariants -------------------------------------------------------
@pytest.mark.parametrize("spec", [MD_LIKE, BIG], ids=["md_like", "big_classes"])
def test_variable_episode_invariants(spec):
    cfg = SamplerConfig()
    for seed in range(300):
        d = sample_episode_description(spec, Split.TRAIN, np.random.default_rng(seed), cfg)
        counts = [spec.images_per_class[c] for c in d.class_ids]
        assert 5 <= d.way <= min(50, len(spec.class_ids(Split.TRAIN)))
        assert len(set(d.class_ids)) == d.way and set(d.class_ids) <= set(spec.class_ids(Split.TRAIN))
        assert d.n_query == min(10, min(counts) // 2)  # one query count for all: balanced
        assert all(k >= 1 for k in d.shots)
        assert all(k <= n - d.n_query for k, n in zip(d.shots, counts))
        assert d.n_support <= 500
        # The per-class contribution cap bounds the support budget the shots share.
        assert d.n_support <= sum(min(100, n - d.n_query) + 1 for n in counts)


def test_seeds_reproduce_and_differ():
    a = [sample_episode_description(MD_LIKE, "train", np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    others = {sample_episode_description(MD_LIKE, "train", np.random.default_rng(s)) for s in range(8, 18)}
    assert a[0] not in others and len(others) == 10


def test_ways_are_uniform_chi_square():
    rng = np.random.default_rng(0)
    draws = [sample_num_ways(rng, 20) for _ in range(4800)]
    observed = np.bincount(draws, minlength=21)[5:]
    assert len(observed) == 16 and observed.min() > 0
    assert stats.chisquare(observed).pvalue > 1e-3
    # Through the class sampler too, on a split of 12 classes: ways uniform in {5..12}.
    spec = flat_spec({Split.TEST: [20] * 12})
    ways = [len(sample_class_ids(spec, "test", rng)) for _ in range(2400)]
    assert stats.chisquare(np.bincount(ways, minlength=13)[5:]).pvalue > 1e-3


def test_support_size_follows_beta_rule_in_expectation():
    remaining = [20, 30, 50, 150]  # contributions capped at 100; the 500 cap never binds here
    rng = np.random.default_rng(1)
    sizes = np.array([sample_support_set_size(rng, remaining) for _ in range(6000)])
    expected = sum((min(100, r) + 1) / 2 for r in remaining)  # E[floor(beta*m) + 1] = (m + 1) / 2
    assert abs(sizes.mean() - expected) < 4 * sizes.std() / np.sqrt(len(sizes))
    assert sizes.min() >= len(remaining) and sizes.max() <= sum(min(100, r) + 1 for r in remaining)
    big = [sample_support_set_size(rng, [100] * 40) for _ in range(50)]
    assert max(big) == 500


def test_shots_follow_class_sizes():
    rng = np.random.default_rng(2)
    shots = np.array([sample_num_support_per_class(rng, [50, 100, 200], [40, 90, 190], 300) for _ in range(500)])
    assert (shots.sum(1) <= 300).all() and (shots >= 1).all()
    mean = shots.mean(0)
    assert mean[0] < mean[1] < mean[2]
    assert compute_num_query([3, 40, 40]) == 1 and compute_num_query([100, 300]) == 10


# -- hierarchy, fixed mode, errors ---------------------------------------------------------------
def test_bilevel_keeps_one_superclass():
    spec = bilevel_spec()
    supers = {s: set(spec.classes_of_superclass(s)) for s in spec.superclass_ids("train")}
    used = set()
    for seed in range(200):
        ids = set(sample_class_ids(spec, "train", np.random.default_rng(seed)))
        owners = [s for s, members in supers.items() if ids <= members]
        assert len(owners) == 1 and 5 <= len(ids) <= len(supers[owners[0]])
        used.add(owners[0])
    assert used == {0, 1, 2}  # superclass 3 has only 3 classes, fewer than min_ways
    flat = SamplerConfig(use_bilevel_hierarchy=False)
    spans = [sample_class_ids(spec, "train", np.random.default_rng(s), flat) for s in range(50)]
    assert any(not any(set(ids) <= m for m in supers.values()) for ids in spans)


def test_fixed_mode():
    cfg = SamplerConfig(mode="fixed", way=5, shot=1, query=15)
    d = sample_episode_description(MD_LIKE, "test", np.random.default_rng(0), cfg)
    assert d == EpisodeDescription(d.class_ids, (1,) * 5, 15) and len(set(d.class_ids)) == 5


def test_fixed_way_refuses_superclasses_unless_ignored_then_draws_uniformly():
    spec = bilevel_spec()
    cfg = SamplerConfig(mode="fixed", way=5, shot=1, query=1)
    with pytest.raises(ValueError, match=r"superclasses \(alphabets\).*set use_bilevel_hierarchy=false"):
        sample_episode_description(spec, "train", np.random.default_rng(0), cfg)
    flat = SamplerConfig(mode="fixed", way=5, shot=1, query=1, use_bilevel_hierarchy=False)
    supers = [set(spec.classes_of_superclass(s)) for s in spec.superclass_ids("train")]
    draws = [set(sample_class_ids(spec, "train", np.random.default_rng(s), flat)) for s in range(100)]
    assert all(len(ids) == 5 for ids in draws)
    assert sum(any(ids <= m for m in supers) for ids in draws) < 20  # mostly across alphabets


def test_any_way_any_shot_mode():
    cfg = SamplerConfig(mode="any", min_ways=2, max_ways_upper_bound=20, min_shot=1, max_shot=20, query=5)
    rng = np.random.default_rng(0)
    draws = [sample_episode_description(MD_LIKE, "train", rng, cfg) for _ in range(400)]
    ways = {d.way for d in draws}
    shots = {d.shots[0] for d in draws}
    assert min(ways) == 2 and max(ways) == 20
    assert all(len(set(d.shots)) == 1 and d.n_query == 5 for d in draws)
    # shots are capped so that every class keeps its 5 queries (the smallest classes hold 10 images)
    assert all(d.shots[0] <= min(MD_LIKE.images_per_class[c] for c in d.class_ids) - 5 for d in draws)
    assert min(shots) == 1 and 5 < max(shots) <= 20
    with pytest.raises(ValueError, match="max_shot=1 is below min_shot=2"):
        SamplerConfig(mode="any", min_shot=2, max_shot=1)


def test_clear_errors_for_small_classes_and_splits():
    cfg = SamplerConfig(mode="fixed", way=5, shot=5, query=15)
    with pytest.raises(ValueError, match=r'Source "fake" split train class 0 .* has 10 images, fewer than the 20'):
        sample_episode_description(MD_LIKE, "train", np.random.default_rng(0), cfg)
    tiny = flat_spec({Split.TRAIN: [10] * 3, Split.TEST: [1] + [10] * 6}, name="tiny")
    with pytest.raises(ValueError, match=r'Source "tiny" split train has 3 classes, fewer than the 5 ways'):
        sample_episode_description(tiny, "train", np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"split test class 3 .* has 1 images"):
        sample_episode_description(tiny, "test", np.random.default_rng(0))
    with pytest.raises(ValueError, match='mode "sometimes" is unknown'):
        SamplerConfig(mode="sometimes")
