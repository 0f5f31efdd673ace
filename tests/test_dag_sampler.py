"""ImageNet-style WordNet-DAG episodes (Meta-Dataset's use_dag_hierarchy) on small DAGs built here."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from scipy import stats

from episodes.hierarchy import (
    MAX_SPANNING_LEAVES_ELIGIBLE,
    class_dag,
    export_subgraph,
    parse_subgraph,
    spec_from_md_hierarchical,
)
from episodes.loader import EpisodeSet
from episodes.readers.base import Source
from episodes.sampler import SamplerConfig, check_split, sample_class_ids, sample_episode_description
from episodes.spec import DatasetSpec, SpecError
from episodes.split import Split


def leaves(prefix: str, start: int, stop: int) -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(start, stop)]


# TRAIN: 30 classes. "shared" has two parents (animal and thing): a DAG, not a tree.
SMALL = {
    "root": ["animal", "thing"],
    "animal": ["dog", "cat", "shared"],
    "dog": leaves("n", 0, 6),
    "cat": leaves("n", 6, 9),
    "shared": leaves("n", 9, 13),
    "thing": ["tool", "shared", "n013"],
    "tool": leaves("n", 14, 30),
}
# Spans: dog 6, cat 3, shared 4, animal 13, tool 16, thing 21, root 30 (not 34: shared counts once).
SMALL_SPANS = {"animal": 13, "cat": 3, "dog": 6, "root": 30, "shared": 4, "thing": 21, "tool": 16}
SMALL_ELIGIBLE = ["animal", "dog", "root", "thing", "tool"]

# TEST: 420 classes; the root spans more than 392 leaves (never eligible), "big" 60 (subsampled to 50).
BIG = {
    "top": ["big", "mid", "rest"],
    "big": leaves("t", 0, 60),
    "mid": ["small", *leaves("t", 60, 70)],
    "small": leaves("t", 70, 77),
    "rest": leaves("t", 77, 420),
}


def dag_spec(sizes: dict[int, int] | None = None, shuffle_nodes: bool = False) -> DatasetSpec:
    """30 TRAIN classes (SMALL DAG), 5 VALID classes without a subgraph, 420 TEST classes (BIG DAG)."""
    names = leaves("n", 0, 30) + leaves("v", 0, 5) + leaves("t", 0, 420)
    small, big = export_subgraph(SMALL), export_subgraph(BIG, words={"big": "big things"})
    if shuffle_nodes:  # node order in the file must not matter
        random.Random(0).shuffle(small)
        random.Random(1).shuffle(big)
    return DatasetSpec(
        name="imagenet-like",
        classes_per_split={Split.TRAIN: 30, Split.VALID: 5, Split.TEST: 420},
        images_per_class=sizes or {c: 40 + (7 * c) % 900 for c in range(455)},
        class_names=dict(enumerate(names)),
        extra={"split_subgraphs": {"TRAIN": small, "VALID": [], "TEST": big}},
    )


SPEC = dag_spec()


def span_sets(spec: DatasetSpec, split: str) -> dict[str, set[int]]:
    dag = class_dag(spec, split)
    return {n: set(ids) for n, ids in dag.spans.items()}


# -- the DAG ------------------------------------------------------------------------------------
def test_spanning_counts_each_leaf_once():
    dag = class_dag(SPEC, "train")
    assert {n: len(ids) for n, ids in dag.spans.items()} == SMALL_SPANS
    assert dag.eligible_nodes(5) == SMALL_ELIGIBLE  # sorted by WordNet id: deterministic
    assert dag.spans["shared"] == (9, 10, 11, 12) and set(dag.spans["root"]) == set(range(30))
    assert dag.leaves["n013"] == 13 and len(dag.leaves) == 30
    big = class_dag(SPEC, "test")
    assert len(big.spans["top"]) == 420 > MAX_SPANNING_LEAVES_ELIGIBLE
    assert big.eligible_nodes(5) == ["big", "mid", "rest", "small"] and big.words["big"] == "big things"
    assert class_dag(SPEC, "valid") is None  # an empty subgraph: flat sampling
    assert class_dag(SPEC, "train") is dag  # parsed once per spec


def test_node_order_in_the_file_does_not_matter():
    shuffled = dag_spec(shuffle_nodes=True)
    assert class_dag(shuffled, "train") == class_dag(SPEC, "train")
    for seed in range(50):
        for split in ("train", "test"):
            a = sample_episode_description(SPEC, split, np.random.default_rng(seed))
            assert a == sample_episode_description(shuffled, split, np.random.default_rng(seed))


# -- sampling -----------------------------------------------------------------------------------
def test_classes_share_an_eligible_ancestor():
    spans = span_sets(SPEC, "train")
    eligible = [spans[n] for n in SMALL_ELIGIBLE]
    chosen = []
    for seed in range(2000):
        ids = set(sample_class_ids(SPEC, "train", np.random.default_rng(seed)))
        assert any(ids <= span for span in eligible)
        chosen.append(next(n for n in SMALL_ELIGIBLE if spans[n] == ids))  # all spans <= 50: taken whole
    counts = np.array([chosen.count(n) for n in SMALL_ELIGIBLE])
    assert stats.chisquare(counts).pvalue > 1e-3  # one eligible node uniformly


def test_way_within_bounds_and_big_nodes_subsampled():
    spans = span_sets(SPEC, "test")
    ways = []
    for seed in range(600):
        ids = sample_class_ids(SPEC, "test", np.random.default_rng(seed))
        assert 5 <= len(ids) <= 50 and len(set(ids)) == len(ids)
        assert any(set(ids) <= spans[n] for n in ("big", "mid", "rest", "small"))
        ways.append(len(ids))
    assert set(ways) == {7, 17, 50}  # small, mid, and 50 of big (60) or of rest (343)
    d = sample_episode_description(SPEC, "test", np.random.default_rng(3))
    counts = [SPEC.images_per_class[c] for c in d.class_ids]
    assert d.n_query == min(10, min(counts) // 2) and d.n_support <= 500 and all(k >= 1 for k in d.shots)


def test_deterministic_per_seed():
    a = [sample_class_ids(SPEC, "test", np.random.default_rng(s)) for s in range(20)]
    b = [sample_class_ids(dag_spec(), "test", np.random.default_rng(s)) for s in range(20)]
    assert a == b and len(set(a)) > 10


def test_switches_ignore_probability_and_fixed_mode():
    dag_ways = set(SMALL_SPANS[n] for n in SMALL_ELIGIBLE)
    flat = SamplerConfig(use_dag_hierarchy=False)
    flat_ways = {len(sample_class_ids(SPEC, "train", np.random.default_rng(s), flat)) for s in range(300)}
    assert flat_ways - dag_ways  # uniform ways 5..30
    ignore = SamplerConfig(ignore_hierarchy_probability=0.5)
    mixed = [len(sample_class_ids(SPEC, "train", np.random.default_rng(s), ignore)) for s in range(1000)]
    off_dag = sum(w not in dag_ways for w in mixed) / len(mixed)
    assert 0.25 < off_dag < 0.5  # half the episodes are uniform, most of whose ways are off the DAG's
    # As upstream: a fixed way refuses the DAG; with it ignored, classes are uniform over the split.
    with pytest.raises(ValueError, match=r'Source .* split train has WordNet class hierarchy.*use_dag_hierarchy=false'):
        check_split(SPEC, "train", SamplerConfig(mode="fixed", way=5, shot=1, query=1))
    with pytest.raises(ValueError, match="use_dag_hierarchy=false"):
        sample_class_ids(SPEC, "train", np.random.default_rng(0), SamplerConfig(mode="fixed", way=5, shot=1, query=1))
    fixed = SamplerConfig(mode="fixed", way=5, shot=1, query=1, use_dag_hierarchy=False)
    spans = span_sets(SPEC, "train")
    every = set(SPEC.class_ids("train"))
    proper = [spans[n] for n in SMALL_ELIGIBLE if spans[n] != every]
    draws = [set(sample_class_ids(SPEC, "train", np.random.default_rng(seed), fixed)) for seed in range(100)]
    assert all(len(ids) == 5 for ids in draws)
    assert sum(any(ids <= p for p in proper) for ids in draws) < 50  # uniform draws span nodes
    with pytest.raises(ValueError, match="ignore_hierarchy_probability=1.5 must be between 0 and 1"):
        SamplerConfig(ignore_hierarchy_probability=1.5)


def test_json_round_trip_keeps_the_dag(tmp_path):
    path = tmp_path / "dataset_spec.json"
    SPEC.to_json(path)
    again = DatasetSpec.from_json(path)
    for seed in range(20):
        rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
        assert sample_episode_description(SPEC, "train", rng_a) == sample_episode_description(again, "train", rng_b)


def test_meta_dataset_hierarchical_layout():
    small = export_subgraph(SMALL)
    tiny = {"vroot": leaves("v", 0, 5)}
    big = export_subgraph(BIG)
    names = leaves("n", 0, 30) + leaves("v", 0, 5) + leaves("t", 0, 420)
    data = {  # MD's HierarchicalDatasetSpecification: no classes_per_split, counts per split and wn_id
        "name": "ilsvrc_2012",
        "__class__": "HierarchicalDatasetSpecification",
        "split_subgraphs": {"TRAIN": small, "VALID": export_subgraph(tiny), "TEST": big},
        "images_per_class": {
            "TRAIN": {**{n: 50 for n in leaves("n", 0, 30)}, "root": 1500},
            "VALID": {n: 20 for n in leaves("v", 0, 5)},
            "TEST": {n: 30 for n in leaves("t", 0, 420)},
        },
        "class_names": {str(i): n for i, n in enumerate(names)},
        "path": "/data/ilsvrc_2012",
        "file_pattern": "{}.tfrecords",
    }
    spec = spec_from_md_hierarchical(json.loads(json.dumps(data)))
    assert spec.classes_per_split == {Split.TRAIN: 30, Split.VALID: 5, Split.TEST: 420}
    assert spec.images_per_class[0] == 50 and spec.images_per_class[454] == 30
    assert class_dag(spec, "valid").eligible_nodes(5) == ["vroot"]
    ids = sample_class_ids(spec, "valid", np.random.default_rng(0))
    assert ids == (30, 31, 32, 33, 34)  # the one node's leaves, sorted
    data["class_names"] = {str(i): n for i, n in enumerate(reversed(names))}
    with pytest.raises(SpecError, match="not the contiguous range"):
        spec_from_md_hierarchical(data)


# -- errors -------------------------------------------------------------------------------------
def small_flat_spec(graph: dict[str, list[str]], n: int = 8) -> DatasetSpec:
    return DatasetSpec(
        name="broken",
        classes_per_split={Split.TRAIN: n},
        images_per_class={c: 20 for c in range(n)},
        class_names={c: f"n{c:03d}" for c in range(n)},
        extra={"split_subgraphs": {"Split.TRAIN": export_subgraph(graph)}},
    )


def test_clear_errors():
    no_eligible = small_flat_spec({"a": leaves("n", 0, 4), "b": leaves("n", 4, 8)})
    with pytest.raises(ValueError, match=r'"broken" split train has no node of its class hierarchy spanning 5'):
        check_split(no_eligible, "train")
    check_split(no_eligible, "train", SamplerConfig(use_dag_hierarchy=False))
    stranger = small_flat_spec({"a": [*leaves("n", 0, 7), "x999"]})
    with pytest.raises(SpecError, match='leaf "x999" is not the class_names entry of any TRAIN class'):
        check_split(stranger, "train")
    cyclic = small_flat_spec({"a": ["b", *leaves("n", 0, 8)], "b": ["c"], "c": ["a"]})
    with pytest.raises(SpecError, match="has a cycle through"):
        check_split(cyclic, "train")
    dangling = DatasetSpec("broken", {Split.TRAIN: 2}, {0: 2, 1: 2}, {0: "n000", 1: "n001"},
                           extra={"split_subgraphs": {"TRAIN": [{"wn_id": "a", "children_ids": ["zz"]}]}})
    with pytest.raises(SpecError, match='node "a" names child "zz", which is not in the graph'):
        parse_subgraph(dangling.extra["split_subgraphs"]["TRAIN"], dangling, "train")


# -- through the loader -------------------------------------------------------------------------
class BlankSource(Source):
    """Images of a constant grey per class: enough to run EpisodeSet on a spec without data."""

    domain = "id"

    def __init__(self, spec: DatasetSpec) -> None:
        self.name, self.spec = spec.name, spec

    @property
    def native_size(self) -> tuple[int, int]:
        return (4, 4)

    def read(self, class_id: int, indices) -> np.ndarray:
        idx = self._check_read(class_id, indices)
        return np.full((len(idx), 4, 4, 3), class_id % 256, dtype=np.uint8)


def test_episode_set_uses_the_dag():
    es = EpisodeSet([BlankSource(SPEC)], "train", n_episodes=20, seed=4)
    spans = span_sets(SPEC, "train")
    for i in range(len(es)):
        ep = es[i]
        assert set(ep.class_ids) in [spans[n] for n in SMALL_ELIGIBLE]
        assert all(int(ep.support_x[k, 0, 0, 0]) == ep.class_ids[int(y)] for k, y in enumerate(ep.support_y))
