"""How a frozen suite stores its episodes: one index list per label, in label order (compact, lossless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from episodes.loader import EpisodePlan
from episodes.sampler import EpisodeDescription
from episodes.spec import parse_split

__all__ = ["SuiteError", "plan_from_json", "plan_to_json"]


class SuiteError(ValueError):
    """A suite that is missing, damaged, or does not match the sources; the message says what to do."""


def _grouped(pairs: Sequence[tuple[int, int]], class_ids: Sequence[int]) -> list[list[int]]:
    """(class, index) pairs -> one index list per label: plans group pairs by label, so this is lossless."""
    out: dict[int, list[int]] = {c: [] for c in class_ids}
    for c, i in pairs:
        out[c].append(i)
    return [out[c] for c in class_ids]


def plan_to_json(plan: EpisodePlan) -> dict[str, Any]:
    return {
        "source": plan.source,
        "split": plan.split.value,
        "episode_id": plan.episode_id,
        "class_ids": list(plan.class_ids),
        "shots": [sum(1 for c, _ in plan.support if c == k) for k in plan.class_ids],
        "n_query": plan.description.n_query,
        "support": _grouped(plan.support, plan.class_ids),
        "query": _grouped(plan.query, plan.class_ids),
    }


def plan_from_json(index: int, e: Mapping[str, Any], where: str) -> EpisodePlan:
    class_ids = tuple(int(c) for c in e["class_ids"])
    support = tuple((c, int(i)) for c, idx in zip(class_ids, e["support"]) for i in idx)
    query = tuple((c, int(i)) for c, idx in zip(class_ids, e["query"]) for i in idx)
    desc = EpisodeDescription(class_ids, tuple(int(k) for k in e["shots"]), int(e["n_query"]))  # label order
    plan = EpisodePlan(index, str(e["source"]), parse_split(e["split"]), desc, class_ids, support, query)
    if plan.episode_id != e["episode_id"]:
        raise SuiteError(f"{where}: episode {index} has id {e['episode_id']} but its images hash to "
                         f"{plan.episode_id}; episode ids changed in this version, so freeze the suite again.")
    return plan
