"""Class hierarchies for episode sampling: Meta-Dataset's WordNet DAG for ImageNet.

ImageNet episodes in Meta-Dataset are not drawn uniformly: an internal WordNet node spanning a
moderate number of leaves is picked, and its leaves become the episode's classes, so classes are
semantically related ("dogs", "musical instruments"). The DAG is stored per split in the spec's
``split_subgraphs`` (kept in ``DatasetSpec.extra``), in the layout Meta-Dataset's ILSVRC
``dataset_spec.json`` uses: a list of ``{"wn_id", "words", "children_ids", "parents_ids"}``.
Leaves map to class ids through ``class_names``, which hold WordNet ids for ImageNet.

WordNet is a DAG, not a tree: a node may have several parents, so a leaf is reachable along
several paths; a node's span is the *set* of leaves below it, each counted once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from episodes.spec import DatasetSpec, SpecError, parse_split
from episodes.split import Split

__all__ = [
    "MAX_SPANNING_LEAVES_ELIGIBLE",
    "ClassDag",
    "class_dag",
    "export_subgraph",
    "parse_subgraph",
    "spec_from_md_hierarchical",
    "split_subgraph",
]

log = logging.getLogger(__name__)

# Meta-Dataset's bound: the smallest value that leaves every ILSVRC leaf reachable; larger
# values would only add near-uniform episodes (the sampler subsamples to max_ways anyway).
MAX_SPANNING_LEAVES_ELIGIBLE = 392


@dataclass(frozen=True)
class ClassDag:
    """One split's DAG, reduced to what the sampler needs.

    ``spans`` maps every internal node (by WordNet id, sorted) to the sorted class ids of the
    leaves it spans; ``leaves`` maps leaf WordNet ids to class ids; ``words`` names the nodes.
    """

    split: Split
    spans: dict[str, tuple[int, ...]]
    leaves: dict[str, int]
    words: dict[str, str]

    def eligible(self, min_leaves: int, max_leaves: int = MAX_SPANNING_LEAVES_ELIGIBLE) -> list[tuple[int, ...]]:
        """Leaf class ids of the internal nodes spanning min..max leaves, in node-id order (deterministic)."""
        return [leaves for leaves in self.spans.values() if min_leaves <= len(leaves) <= max_leaves]

    def eligible_nodes(self, min_leaves: int, max_leaves: int = MAX_SPANNING_LEAVES_ELIGIBLE) -> list[str]:
        """WordNet ids of the eligible internal nodes (same order as ``eligible``)."""
        return [n for n, leaves in self.spans.items() if min_leaves <= len(leaves) <= max_leaves]


def _children_map(nodes: Sequence[Mapping[str, Any]], where: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    children: dict[str, set[str]] = {}
    words: dict[str, str] = {}
    for node in nodes:
        try:
            wn_id = str(node["wn_id"])
        except (KeyError, TypeError):
            raise SpecError(f"{where}: every node needs a \"wn_id\" (got {node!r:.80}).") from None
        if wn_id in children:
            raise SpecError(f'{where}: node "{wn_id}" is listed twice.')
        children[wn_id] = {str(c) for c in node.get("children_ids", ())}
        words[wn_id] = str(node.get("words", ""))
    for node in nodes:  # parents_ids, when given, are the same edges seen from below
        for parent in node.get("parents_ids", ()):
            if str(parent) not in children:
                raise SpecError(f'{where}: node "{node["wn_id"]}" names parent "{parent}", which is not in the graph.')
            children[str(parent)].add(str(node["wn_id"]))
    for wn_id, kids in children.items():
        stray = sorted(kids - children.keys())
        if stray:
            raise SpecError(f'{where}: node "{wn_id}" names child "{stray[0]}", which is not in the graph.')
    return children, words


def _spanning_leaves(children: dict[str, set[str]], where: str) -> dict[str, frozenset[str]]:
    """Leaves below every node (a leaf spans itself), by an iterative depth-first walk that catches cycles."""
    span: dict[str, frozenset[str]] = {}
    on_path: set[str] = set()
    for root in sorted(children):
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in span:
                continue
            if expanded:
                on_path.discard(node)
                kids = children[node]
                span[node] = frozenset({node}) if not kids else frozenset().union(*(span[k] for k in kids))
                continue
            if node in on_path:
                raise SpecError(f'{where}: the graph has a cycle through "{node}"; a class hierarchy must be a DAG.')
            on_path.add(node)
            stack.append((node, True))
            stack.extend((k, False) for k in sorted(children[node]) if k not in span)
    return span


def parse_subgraph(nodes: Sequence[Mapping[str, Any]], spec: DatasetSpec, split: Split | str) -> ClassDag:
    """Build the sampler's view of one split's subgraph, mapping leaves to the split's class ids."""
    split = parse_split(split)
    where = f'Spec "{spec.name}" split_subgraphs[{split.name}]'
    children, words = _children_map(nodes, where)
    span = _spanning_leaves(children, where)
    split_ids = set(spec.class_ids(split))
    by_name: dict[str, int] = {}
    for class_id in sorted(split_ids):
        by_name.setdefault(spec.class_name(class_id), class_id)
    leaves: dict[str, int] = {}
    for wn_id in sorted(n for n, kids in children.items() if not kids):
        if wn_id not in by_name:
            raise SpecError(
                f'{where}: leaf "{wn_id}" is not the class_names entry of any {split.name} class; '
                "class_names must hold the WordNet ids of the leaves."
            )
        leaves[wn_id] = by_name[wn_id]
    unreachable = len(split_ids) - len(set(leaves.values()))
    if unreachable:
        log.warning("%s: %d classes of the split are not leaves of its subgraph and never get sampled",
                    where, unreachable)
    spans = {
        n: tuple(sorted(leaves[leaf] for leaf in span[n]))
        for n in sorted(children)
        if children[n]
    }
    return ClassDag(split, spans, leaves, words)


def split_subgraph(spec: DatasetSpec, split: Split | str) -> list[Mapping[str, Any]] | None:
    """The raw node list of ``split`` in ``spec.extra["split_subgraphs"]``; None when absent or empty."""
    graphs = spec.extra.get("split_subgraphs")
    if not isinstance(graphs, Mapping):
        return None
    split = parse_split(split)
    for key, nodes in graphs.items():
        try:
            if parse_split(key) is split:
                return list(nodes) or None
        except SpecError:
            raise SpecError(f'Spec "{spec.name}": split_subgraphs has an unknown split key "{key}".') from None
    return None


# Parsing ImageNet's subgraph takes tens of milliseconds; episodes are sampled by the thousand.
# Specs are unhashable (dict fields), so the cache is keyed by identity and checked by weak reference.
_CACHE: dict[tuple[int, Split], tuple[weakref.ref[DatasetSpec], ClassDag | None]] = {}


def class_dag(spec: DatasetSpec, split: Split | str) -> ClassDag | None:
    """The parsed DAG of ``split`` (None when the spec has no subgraph for it), cached per spec object."""
    split = parse_split(split)
    key = (id(spec), split)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is spec:
        return hit[1]
    nodes = split_subgraph(spec, split)
    dag = None if nodes is None else parse_subgraph(nodes, spec, split)
    _CACHE[key] = (weakref.ref(spec, lambda _ref, k=key: _CACHE.pop(k, None)), dag)
    return dag


def export_subgraph(
    children: Mapping[str, Sequence[str]], words: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Write a DAG given as {node: children} in Meta-Dataset's node-list layout (sorted, with parents_ids).

    Nodes that appear only as children become leaves. Used by converters and tests.
    """
    kids = {str(n): sorted({str(c) for c in cs}) for n, cs in children.items()}
    for cs in list(kids.values()):
        for c in cs:
            kids.setdefault(c, [])
    parents: dict[str, list[str]] = {n: [] for n in kids}
    for n, cs in kids.items():
        for c in cs:
            parents[c].append(n)
    words = words or {}
    return [
        {"wn_id": n, "words": words.get(n, n), "children_ids": kids[n], "parents_ids": sorted(parents[n])}
        for n in sorted(kids)
    ]


def spec_from_md_hierarchical(data: Mapping[str, Any]) -> DatasetSpec:
    """Convert Meta-Dataset's ``HierarchicalDatasetSpecification`` JSON (ILSVRC) to a DatasetSpec.

    MD's ILSVRC spec has no ``classes_per_split`` and counts images per split and WordNet id
    (for every node); here classes per split are the subgraph leaves, and images per class
    come from the leaf counts. ``split_subgraphs`` is kept for the DAG sampler.
    """
    name = str(data.get("name", "ilsvrc_2012"))
    graphs, counts = data.get("split_subgraphs"), data.get("images_per_class")
    if not isinstance(graphs, Mapping) or not isinstance(counts, Mapping):
        raise SpecError(f'Spec "{name}": a hierarchical spec needs split_subgraphs and per-split images_per_class.')
    class_names = {int(k): str(v) for k, v in (data.get("class_names") or {}).items()}
    ids_of = {v: k for k, v in class_names.items()}
    per_split = {parse_split(k): v for k, v in graphs.items()}
    split_counts = {parse_split(k): v for k, v in counts.items()}
    images: dict[int, int] = {}
    classes_per_split: dict[Split, int] = {}
    for split in (Split.TRAIN, Split.VALID, Split.TEST):
        leaves = sorted(str(n["wn_id"]) for n in per_split.get(split, ()) if not n.get("children_ids"))
        classes_per_split[split] = len(leaves)
        for wn_id in leaves:
            if wn_id not in ids_of:
                raise SpecError(f'Spec "{name}": leaf "{wn_id}" of split {split.name} has no class id in class_names.')
            images[ids_of[wn_id]] = int(split_counts.get(split, {}).get(wn_id, 0))
    known = {"name", "split_subgraphs", "images_per_class", "class_names", "path", "file_pattern", "__class__"}
    extra = {k: v for k, v in data.items() if k not in known}
    extra["split_subgraphs"] = {s.name: list(v) for s, v in per_split.items()}
    spec = DatasetSpec(
        name=name,
        classes_per_split=classes_per_split,
        images_per_class=images,
        class_names={c: n for c, n in class_names.items() if c in images},
        path=data.get("path"),
        file_pattern=str(data.get("file_pattern") or "{}.tfrecords"),
        extra=extra,
    )
    for split, nodes in per_split.items():  # class ids must be contiguous by split, TRAIN first
        leaf_ids = {ids_of[str(n["wn_id"])] for n in nodes if not n.get("children_ids")}
        if leaf_ids != set(spec.class_ids(split)):
            raise SpecError(f'Spec "{name}": the class ids of split {split.name} are not the contiguous range '
                            "Meta-Dataset assigns (TRAIN, then VALID, then TEST).")
    return spec
