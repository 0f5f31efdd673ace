"""Meta-Dataset episode rules as small pure functions.

Every function takes its ``np.random.Generator`` explicitly, so the caller decides the seeding
(one generator per episode in the loader) and results never depend on hidden global state or on
how many data workers run. The rules follow Meta-Dataset's ``EpisodeDescriptionSampler``:
ways ~ U{min_ways..min(max_ways, C)}, balanced queries, a support budget drawn with a uniform
beta, and per-class shots proportional to log-uniformly perturbed class sizes. Classes come from
one of three rules: ImageNet's WordNet DAG (``episodes.hierarchy``), Omniglot-style superclasses,
or uniformly over the split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from episodes.hierarchy import MAX_SPANNING_LEAVES_ELIGIBLE, ClassDag, class_dag
from episodes.spec import DatasetSpec, parse_split
from episodes.split import Split

__all__ = [
    "EpisodeDescription",
    "SamplerConfig",
    "check_split",
    "compute_num_query",
    "sample_class_ids",
    "sample_episode_description",
    "sample_num_support_per_class",
    "sample_num_ways",
    "sample_support_set_size",
]

SamplerMode = Literal["variable", "fixed", "any"]
MODES: tuple[str, ...] = get_args(SamplerMode)


@dataclass(frozen=True)
class SamplerConfig:
    """Episode shape. ``variable`` is Meta-Dataset's variable-way variable-shot protocol;
    ``fixed`` gives ``way``-way ``shot``-shot episodes with ``query`` queries per class; ``any`` is
    Meta-Album's any-way any-shot protocol: ways U{min_ways..max_ways_upper_bound} (capped by the
    classes available), one shot count U{min_shot..max_shot} for all classes of the episode (capped
    by the smallest class), ``query`` queries per class.

    The hierarchy switches apply only to specs that have one (a WordNet subgraph for the split,
    or superclasses); ``ignore_hierarchy_probability`` samples that share of their episodes flat.
    As in Meta-Dataset, ``fixed`` cannot follow a hierarchy: on a source that has one, set the switch
    to False (classes are then drawn uniformly over the split) or sampling stops with an error.
    """

    mode: SamplerMode = "variable"
    way: int = 5
    shot: int = 5
    query: int = 15
    min_ways: int = 5
    max_ways_upper_bound: int = 50
    max_num_query: int = 10
    max_support_set_size: int = 500
    max_support_size_contrib_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2)
    use_bilevel_hierarchy: bool = True
    use_dag_hierarchy: bool = True
    ignore_hierarchy_probability: float = 0.0  # share of episodes drawn uniformly despite a hierarchy
    min_shot: int = 1  # "any" mode
    max_shot: int = 20  # "any" mode

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f'Sampler mode "{self.mode}" is unknown; use "variable", "fixed" or "any".')
        for key in ("way", "shot", "query", "min_ways", "max_num_query", "max_support_size_contrib_per_class",
                    "min_shot"):
            if getattr(self, key) < 1:
                raise ValueError(f"Sampler setting {key}={getattr(self, key)} must be at least 1.")
        if self.max_ways_upper_bound < self.min_ways:
            raise ValueError(
                f"Sampler setting max_ways_upper_bound={self.max_ways_upper_bound} is below min_ways={self.min_ways}."
            )
        if self.max_shot < self.min_shot:
            raise ValueError(f"Sampler setting max_shot={self.max_shot} is below min_shot={self.min_shot}.")
        if self.min_log_weight > self.max_log_weight:
            raise ValueError("Sampler setting min_log_weight must not exceed max_log_weight.")
        if not 0.0 <= self.ignore_hierarchy_probability <= 1.0:
            raise ValueError(
                f"Sampler setting ignore_hierarchy_probability={self.ignore_hierarchy_probability} "
                "must be between 0 and 1."
            )

    @property
    def needed_ways(self) -> int:
        """The fewest classes a split (or superclass) must have to give an episode."""
        return self.way if self.mode == "fixed" else self.min_ways


@dataclass(frozen=True)
class EpisodeDescription:
    """What an episode contains, before any image is chosen: classes, shots and queries per class."""

    class_ids: tuple[int, ...]
    shots: tuple[int, ...]  # support images per class, aligned with class_ids
    n_query: int  # query images per class (the query set is balanced)

    @property
    def way(self) -> int:
        return len(self.class_ids)

    @property
    def n_support(self) -> int:
        return sum(self.shots)


# -- the four Meta-Dataset rules ---------------------------------------------------------------
def sample_num_ways(
    rng: np.random.Generator, num_classes: int, min_ways: int = 5, max_ways_upper_bound: int = 50
) -> int:
    """Ways uniform in {min_ways, ..., min(max_ways_upper_bound, num_classes)}."""
    high = min(max_ways_upper_bound, num_classes)
    if high < min_ways:
        raise ValueError(f"Cannot sample at least {min_ways} ways from {num_classes} classes.")
    return int(rng.integers(min_ways, high + 1))


def compute_num_query(images_per_class: Sequence[int], max_num_query: int = 10) -> int:
    """Queries per class: min(max_num_query, floor(min_c n_c / 2)); half the smallest class stays for support."""
    n_query = min(max_num_query, min(images_per_class) // 2)
    if n_query < 1:
        raise ValueError("Every class of an episode needs at least 2 images (one support, one query).")
    return n_query


def sample_support_set_size(
    rng: np.random.Generator,
    num_remaining_per_class: Sequence[int],
    max_support_size_contrib_per_class: int = 100,
    max_support_set_size: int = 500,
) -> int:
    """Support budget S = min(max, sum_c floor(beta * min(contrib, r_c) + 1)) with beta ~ U(0, 1).

    ``num_remaining_per_class`` is n_c - n_query, the images left for support; S >= ways always.
    """
    beta = rng.uniform()
    remaining = np.minimum(max_support_size_contrib_per_class, np.asarray(num_remaining_per_class))
    return int(min(max_support_set_size, np.floor(beta * remaining + 1).sum()))


def sample_num_support_per_class(
    rng: np.random.Generator,
    images_per_class: Sequence[int],
    num_remaining_per_class: Sequence[int],
    support_set_size: int,
    min_log_weight: float = math.log(0.5),
    max_log_weight: float = math.log(2),
) -> tuple[int, ...]:
    """Shots k_c = min(floor(w_c (S - N)) + 1, r_c) with w_c proportional to n_c * exp(alpha_c), alpha_c ~ U(min, max).

    Every class gets at least one shot; bigger classes get more, as in the source data.
    """
    n = np.asarray(images_per_class, dtype=np.float64)
    num_classes = len(n)
    if support_set_size < num_classes:
        raise ValueError(f"A support set of {support_set_size} images cannot hold {num_classes} classes.")
    alpha = rng.uniform(min_log_weight, max_log_weight, size=num_classes)
    weights = n * np.exp(alpha)
    weights /= weights.sum()
    shots = np.floor(weights * (support_set_size - num_classes)).astype(np.int64) + 1
    return tuple(int(k) for k in np.minimum(shots, np.asarray(num_remaining_per_class)))


# -- class selection ---------------------------------------------------------------------------
def _pick(rng: np.random.Generator, pool: Sequence[int], ways: int) -> tuple[int, ...]:
    chosen = rng.choice(np.asarray(pool), size=ways, replace=False)
    return tuple(int(c) for c in chosen)


def _dag(spec: DatasetSpec, split: Split, cfg: SamplerConfig) -> ClassDag | None:
    return class_dag(spec, split) if cfg.use_dag_hierarchy else None


def _uses_bilevel(spec: DatasetSpec, cfg: SamplerConfig) -> bool:
    return cfg.use_bilevel_hierarchy and spec.has_superclasses


def _eligible_superclasses(spec: DatasetSpec, split: Split, cfg: SamplerConfig) -> list[int]:
    return [s for s in spec.superclass_ids(split) if len(spec.classes_of_superclass(s)) >= cfg.needed_ways]


def _fixed_way_refusal(where: str, switch: str) -> str:
    """Meta-Dataset's rule: a fixed way cannot follow a class hierarchy (its sampler raises "use_dag_hierarchy
    is incompatible with num_ways"); with the hierarchy ignored, classes are drawn uniformly over the split."""
    kind = "WordNet class hierarchy" if switch == "use_dag_hierarchy" else "superclasses (alphabets)"
    return (f"{where} has {kind}, and a fixed way cannot follow them (Meta-Dataset refuses num_ways with a class "
            f"hierarchy); set {switch}=false in this sampler's settings (data.sampler / data.train_sampler) to draw "
            "the classes uniformly over the split, as Meta-Dataset then does, or use mode=variable.")


def _sample_from_dag(dag: ClassDag, rng: np.random.Generator, cfg: SamplerConfig) -> tuple[int, ...]:
    """Meta-Dataset's ImageNet rule: one eligible internal node uniformly, its leaves, at most max ways of them."""
    nodes = dag.eligible(cfg.needed_ways, MAX_SPANNING_LEAVES_ELIGIBLE)
    leaves = nodes[int(rng.integers(len(nodes)))]
    limit = cfg.max_ways_upper_bound
    return _pick(rng, leaves, limit) if len(leaves) > limit else leaves


def sample_class_ids(
    spec: DatasetSpec, split: Split | str, rng: np.random.Generator, cfg: SamplerConfig | None = None
) -> tuple[int, ...]:
    """Choose the classes of one episode.

    With a WordNet subgraph for the split (ImageNet) and ``use_dag_hierarchy``, an internal node
    spanning between ``min_ways`` and 392 leaves is drawn uniformly and its leaves (subsampled to
    ``max_ways_upper_bound``) are the classes, so ways are not uniform. With superclasses
    (Omniglot alphabets) and ``use_bilevel_hierarchy``, one superclass with enough classes is
    drawn uniformly and all ways come from it. Otherwise ways are drawn over the whole split and
    classes uniformly; ``ignore_hierarchy_probability`` sends that share of episodes here too.
    """
    cfg = cfg or SamplerConfig()
    split = parse_split(split)
    dag = _dag(spec, split, cfg)
    bilevel = dag is None and _uses_bilevel(spec, cfg)
    if cfg.mode == "fixed" and (dag is not None or bilevel):
        where = f'Source "{spec.name}" split {split.value}'
        raise ValueError(_fixed_way_refusal(where, "use_dag_hierarchy" if dag is not None else "use_bilevel_hierarchy"))
    if (dag is not None or bilevel) and cfg.ignore_hierarchy_probability > 0:
        if rng.uniform() < cfg.ignore_hierarchy_probability:  # drawn only then: p=0 keeps old streams
            dag, bilevel = None, False
    if dag is not None:
        return _sample_from_dag(dag, rng, cfg)
    if bilevel:
        eligible = _eligible_superclasses(spec, split, cfg)
        pool = spec.classes_of_superclass(int(rng.choice(eligible)))
    else:
        pool = spec.class_ids(split)
    if cfg.mode == "fixed":
        ways = cfg.way
    else:
        ways = sample_num_ways(rng, len(pool), cfg.min_ways, cfg.max_ways_upper_bound)
    return _pick(rng, pool, ways)


# -- checks and the whole description ---------------------------------------------------------
def check_split(spec: DatasetSpec, split: Split | str, cfg: SamplerConfig | None = None) -> None:
    """Raise one clear ValueError if ``split`` of ``spec`` cannot give episodes under ``cfg``.

    Called before sampling so a bad class fails the first episode, not the 317th.
    """
    cfg = cfg or SamplerConfig()
    split = parse_split(split)
    where = f'Source "{spec.name}" split {split.value}'
    ids = spec.class_ids(split)
    if len(ids) < cfg.needed_ways:
        raise ValueError(
            f"{where} has {len(ids)} classes, fewer than the {cfg.needed_ways} ways an episode needs; "
            f"use another split or lower {'way' if cfg.mode == 'fixed' else 'min_ways'}."
        )
    dag = _dag(spec, split, cfg)
    if dag is not None and not dag.eligible(cfg.needed_ways, MAX_SPANNING_LEAVES_ELIGIBLE):
        raise ValueError(
            f"{where} has no node of its class hierarchy spanning {cfg.needed_ways} to "
            f"{MAX_SPANNING_LEAVES_ELIGIBLE} leaves; set use_dag_hierarchy=False or lower the ways."
        )
    if cfg.mode == "fixed" and (dag is not None or _uses_bilevel(spec, cfg)):
        raise ValueError(_fixed_way_refusal(where, "use_dag_hierarchy" if dag is not None else "use_bilevel_hierarchy"))
    if dag is None and _uses_bilevel(spec, cfg) and not _eligible_superclasses(spec, split, cfg):
        raise ValueError(
            f"{where} has no superclass with {cfg.needed_ways} classes or more; "
            "set use_bilevel_hierarchy=False or lower the ways."
        )
    need = {"fixed": cfg.shot + cfg.query, "any": cfg.min_shot + cfg.query}.get(cfg.mode, 2)
    for class_id in ids:
        have = spec.images_per_class[class_id]
        if have < need:
            request = {"fixed": f"{cfg.shot}-shot {cfg.query}-query episodes need",
                       "any": f"{cfg.min_shot}-shot {cfg.query}-query episodes need"}.get(
                           cfg.mode, "every episode needs (one support, one query)")
            fix = "lower shot/query" if cfg.mode in ("fixed", "any") else "add images"
            raise ValueError(
                f'{where} class {class_id} ("{spec.class_name(class_id)}") has {have} images, '
                f"fewer than the {need} that {request}; {fix} or drop this class from the spec."
            )


def sample_episode_description(
    spec: DatasetSpec,
    split: Split | str,
    rng: np.random.Generator,
    cfg: SamplerConfig | None = None,
    *,
    check: bool = True,
) -> EpisodeDescription:
    """Sample classes, shots and queries of one episode (pass ``check=False`` if already checked)."""
    cfg = cfg or SamplerConfig()
    if check:
        check_split(spec, split, cfg)
    class_ids = sample_class_ids(spec, split, rng, cfg)
    if cfg.mode == "fixed":
        return EpisodeDescription(class_ids, (cfg.shot,) * len(class_ids), cfg.query)
    if cfg.mode == "any":
        fewest = min(spec.images_per_class[c] for c in class_ids)
        shot = min(int(rng.integers(cfg.min_shot, cfg.max_shot + 1)), fewest - cfg.query)
        return EpisodeDescription(class_ids, (shot,) * len(class_ids), cfg.query)
    counts = [spec.images_per_class[c] for c in class_ids]
    n_query = compute_num_query(counts, cfg.max_num_query)
    remaining = [n - n_query for n in counts]
    size = sample_support_set_size(rng, remaining, cfg.max_support_size_contrib_per_class, cfg.max_support_set_size)
    shots = sample_num_support_per_class(rng, counts, remaining, size, cfg.min_log_weight, cfg.max_log_weight)
    return EpisodeDescription(class_ids, shots, n_query)
