"""ILSVRC-2012: the train images (``ILSVRC2012_img_train.tar``, one tar per synset) with Meta-Dataset's WordNet DAG.

Upstream derives the class splits from WordNet (its ``imagenet_specification``); the result, three subgraphs whose
leaves are the TRAIN / VALID / TEST classes, ships as ``dataset_specs/ilsvrc_2012_dataset_spec.json``. That file is
an input here: its subgraphs become the spec's ``split_subgraphs`` (read by ``episodes.hierarchy`` for the DAG
sampler) and its ``class_names`` fix the class ids (each split's leaves, sorted). A class's images are the sorted
files of its synset minus those in upstream's three ``ImageNet_*_duplicates.txt`` lists (ImageNet images that are
also test images of CUB or Caltech), matched by file name, as upstream matches them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from episodes.hierarchy import export_subgraph, spec_from_md_hierarchical
from episodes.prepare.folders import plain_loader
from episodes.prepare.inputs import InputNotFound, InputTree, PrepareError
from episodes.prepare.md_splits import SPLIT_ORDER, select
from episodes.prepare.source import Plan, PreparedClass
from episodes.spec import SpecError
from episodes.split import Split

__all__ = ["DUPLICATE_LISTS", "SPEC_FILE", "duplicates", "ilsvrc_2012"]

log = logging.getLogger(__name__)

SPEC_FILE = "ilsvrc_2012_dataset_spec.json"
DUPLICATE_LISTS = ("ImageNet_Caltech101_duplicates.txt", "ImageNet_Caltech256_duplicates.txt",
                   "ImageNet_CUBirds_duplicates.txt")
_HINT = "Meta-Dataset's meta_dataset/dataset_conversion/"
_WNID = re.compile(r"n\d{8}")


def duplicates(text: str) -> set[str]:
    """File names a duplicates list excludes: each non-comment line's path before ``#``, reduced to its name."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(line.split("#")[0].strip().rpartition("/")[2])
    return names


def _upstream_spec(tree: InputTree) -> dict[str, Any]:
    hits = tree.find_files(SPEC_FILE)
    if not hits:
        raise InputNotFound(f"The inputs ({tree.describe()}) hold no {SPEC_FILE}; pass {_HINT}dataset_specs/"
                            f"{SPEC_FILE}, which holds Meta-Dataset's WordNet class DAG and splits.")
    try:
        data = json.loads(tree.read(hits[0]))
        graphs = {Split[str(k).rsplit(".", 1)[-1].upper()]: list(v) for k, v in data["split_subgraphs"].items()}
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise PrepareError(f'"{hits[0]}" is not Meta-Dataset\'s ILSVRC spec (no split_subgraphs: {e}); pass '
                           f"{_HINT}dataset_specs/{SPEC_FILE}.") from None
    if not data.get("class_names"):  # the class ids upstream assigns: each split's leaves, sorted
        leaves = [sorted(n["wn_id"] for n in graphs.get(s, ()) if not n.get("children_ids")) for s in SPLIT_ORDER]
        data["class_names"] = {str(i): wn for i, wn in enumerate(wn for split in leaves for wn in split)}
    data["split_subgraphs"] = {s.name: graphs.get(s, []) for s in SPLIT_ORDER}
    return data


def _skipped(tree: InputTree) -> set[str]:
    names: set[str] = set()
    for list_name in DUPLICATE_LISTS:
        hits = tree.find_files(list_name)
        if not hits:
            raise InputNotFound(f"The inputs ({tree.describe()}) hold no {list_name}; pass the three "
                                f"ImageNet_*_duplicates.txt files of {_HINT}.")
        names |= duplicates(tree.read(hits[0]).decode("utf-8", errors="replace"))
    return names


def _synset_root(tree: InputTree, wn_ids: Sequence[str]) -> str:
    for wn_id in wn_ids:
        hits = tree.find_dirs(wn_id)
        if hits:
            return hits[0].rpartition("/")[0]
    raise InputNotFound(f"The inputs ({tree.describe()}) hold no synset folder or tar (such as {wn_ids[0]}/); pass "
                        "ILSVRC2012_img_train.tar or the folder it unpacks to.")


def _prune(nodes: Sequence[Mapping[str, Any]], keep: set[str]) -> list[dict[str, Any]]:
    """The subgraph without the leaves not in ``keep`` and the nodes left with no leaf below them."""
    children = {str(n["wn_id"]): [str(c) for c in n.get("children_ids", ())] for n in nodes}
    parents: dict[str, list[str]] = {n: [] for n in children}
    for n, kids in children.items():
        for c in kids:
            parents.setdefault(c, []).append(n)
    alive, stack = set(), [n for n, kids in children.items() if not kids and n in keep]
    while stack:
        n = stack.pop()
        if n not in alive:
            alive.add(n)
            stack.extend(parents.get(n, ()))
    words = {str(n["wn_id"]): str(n.get("words", "")) for n in nodes}
    return export_subgraph({n: [c for c in kids if c in alive] for n, kids in children.items() if n in alive}, words)


def ilsvrc_2012(tree: InputTree, *, allow_missing: bool = False) -> Plan:
    """ILSVRC-2012 train images plus Meta-Dataset's ILSVRC spec and duplicates lists."""
    data = _upstream_spec(tree)
    try:
        upstream = spec_from_md_hierarchical(data)
    except SpecError as e:
        raise PrepareError(f"{SPEC_FILE} does not describe Meta-Dataset's ILSVRC classes ({e}).") from None
    lists = {s: [upstream.class_name(c) for c in upstream.class_ids(s)] for s in SPLIT_ORDER}
    skip = _skipped(tree)
    root = _synset_root(tree, [wn for s in SPLIT_ORDER for wn in lists[s]])
    found = {}
    for wn_id in tree.subdirs(root):
        if _WNID.fullmatch(wn_id):  # not the spec's folder beside the synsets
            folder = f"{root}/{wn_id}" if root else wn_id
            found[wn_id] = [f"{folder}/{f}" for f in tree.files(folder) if f not in skip]
    chosen, missing = select("ilsvrc_2012", lists, found, allow_missing=allow_missing, what="synsets")
    classes = [PreparedClass(wn, split, paths) for split in SPLIT_ORDER for wn, paths in chosen[split]]
    graphs = data["split_subgraphs"]
    if missing:
        kept = {c.name for c in classes}
        graphs = {s.name: _prune(graphs[s.name], kept) for s in SPLIT_ORDER}
    expected = {upstream.class_name(c): n for c, n in upstream.images_per_class.items()}
    differ = [c for c in classes if len(c.items) != expected.get(c.name)]
    notes = []
    if differ:
        c = differ[0]
        notes.append(f"{len(differ)} synsets have another image count than {SPEC_FILE} (first: {c.name}, "
                     f"{len(c.items)} files here, {expected.get(c.name)} upstream); is this the official "
                     "ILSVRC-2012 train set?")
    return Plan(classes, plain_loader(tree), missing=missing, notes=notes, extra={"split_subgraphs": graphs})
