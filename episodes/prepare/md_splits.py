"""Meta-Dataset's class splits: the stored lists (``splits/*.json``) and the seeded rule upstream made them with.

The lists decide which class goes to which split and in which order the class ids run, so a prepared source has
exactly the spec of the upstream conversion. ``md_split`` is upstream's rule (NumPy's legacy global generator
seeded with 22, two ``choice`` calls); the tests check that it reproduces every stored list.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from episodes.prepare.inputs import PrepareError
from episodes.split import Split

__all__ = ["SPLIT_ORDER", "SPLITS_DIR", "md_split", "select", "split_lists", "stored_splits"]

log = logging.getLogger(__name__)

SPLITS_DIR = Path(__file__).with_name("splits")
SPLIT_ORDER = (Split.TRAIN, Split.VALID, Split.TEST)
T = TypeVar("T")


@cache
def stored_splits(source: str) -> dict[str, Any]:
    """The JSON record of ``source`` (``train``/``valid``/``test`` lists, ``rule``, provenance)."""
    path = SPLITS_DIR / f"{source}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise PrepareError(f"{path} is missing; reinstall metabench (the split lists ship with it).") from None


def split_lists(source: str) -> dict[Split, list[Any]]:
    """The classes of each split, in Meta-Dataset's id order."""
    data = stored_splits(source)
    return {split: list(data[split.value]) for split in SPLIT_ORDER}


def md_split(names: Sequence[T], sizes: Sequence[int], seed: int = 22) -> dict[Split, list[T]]:
    """Upstream's ``gen_rand_split_inds`` after ``np.random.seed(seed)``, applied to ``names``.

    The train+valid classes are drawn among all, the test classes are the rest in index order; the train classes
    are then drawn among train+valid (in draw order), the valid ones are the rest in index order. It uses NumPy's
    legacy global generator as upstream did; its state is saved and restored around the call.
    """
    n_train, n_valid, n_test = (int(s) for s in sizes)
    if n_train + n_valid + n_test != len(names):
        raise PrepareError(f"The split sizes {list(sizes)} do not add up to the {len(names)} classes given.")
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        n = len(names)
        trainval = np.random.choice(n, n_train + n_valid, replace=False)
        test = np.setdiff1d(np.arange(n), trainval)
        train = np.random.choice(trainval, n_train, replace=False)
        valid = np.setdiff1d(trainval, train)
    finally:
        np.random.set_state(state)
    return {Split.TRAIN: [names[i] for i in train], Split.VALID: [names[i] for i in valid],
            Split.TEST: [names[i] for i in test]}


def select(source: str, lists: Mapping[Split, Sequence[Any]], found: Mapping[Any, T], *, allow_missing: bool,
           what: str = "classes") -> tuple[dict[Split, list[tuple[Any, T]]], list[Any]]:
    """The listed entries present in ``found``, by split and in list order, and the listed ones that are not.

    A download that lacks listed classes would give another spec than upstream's, so that is an error unless
    ``allow_missing``; entries found but not listed are left out, as upstream does, with a warning.
    """
    chosen = {split: [(key, found[key]) for key in lists[split] if key in found] for split in SPLIT_ORDER}
    listed = [key for split in SPLIT_ORDER for key in lists[split]]
    missing = [key for key in listed if key not in found]
    if len(missing) == len(listed):
        raise PrepareError(f"The inputs hold none of the {len(listed)} {what} Meta-Dataset lists for {source} "
                           f'(such as "{listed[0]}"); pass the {source} download.')
    if missing and not allow_missing:
        raise PrepareError(f"The inputs lack {len(missing)} of the {len(listed)} {what} Meta-Dataset lists for "
                           f'{source} (first: "{missing[0]}"); pass the complete download, or allow_missing=True '
                           "to prepare the subset.")
    extra = sorted(set(found) - set(listed), key=str)
    if extra:
        log.warning('%s: %d %s in the inputs are in no Meta-Dataset split and are left out (first: "%s")',
                    source, len(extra), what, extra[0])
    return chosen, missing
