"""Sources whose download holds one folder per class: Omniglot, DTD, CUB-200-2011 and Traffic Signs (GTSRB).

Upstream writes a class's files in ``sorted(os.listdir)`` order, skipping sub-folders and a few known stray
files, and converts each image to RGB; Omniglot is also inverted (black strokes on white become white on
black) and Traffic Signs' files are shuffled with ``np.random.RandomState(23)``, because GTSRB stores each
physical sign as 30 consecutive frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from episodes.prepare.inputs import InputNotFound, InputTree
from episodes.prepare.md_splits import SPLIT_ORDER, select, split_lists, stored_splits
from episodes.prepare.source import Plan, PreparedClass, open_image, upstream_pixels

__all__ = ["omniglot", "plain_loader", "traffic_sign", "cu_birds", "dtd"]


def plain_loader(tree: InputTree) -> Any:
    """Load a member as upstream does with no crop: RGB (a JPEG may decode at a reduced scale, as upstream's
    unchanged JPEG bytes are decoded by the TFRecord reader)."""

    def load(path: str, size: int) -> Any:
        return upstream_pixels(open_image(tree.read(path), f'Image "{path}" of {tree.origin(path)}', draft=size))

    return load


def _class_root(tree: InputTree, name: str, listed: Sequence[str], hint: str) -> str:
    """The shallowest folder called ``name`` that holds at least one listed class folder."""
    wanted = set(listed)
    hits = tree.find_dirs(name, where=lambda d: bool(wanted.intersection(tree.subdirs(d))))
    if not hits:
        raise InputNotFound(f"The inputs ({tree.describe()}) hold no {name}/ folder of class folders; pass {hint}.")
    return hits[0]


def _folder_plan(tree: InputTree, source: str, root: str, *, allow_missing: bool,
                 skip: dict[str, set[str]] | None = None) -> Plan:
    """One class per listed sub-folder of ``root``, its files sorted, minus upstream's known stray files."""
    lists = split_lists(source)
    found = {d: [f"{root}/{d}/{f}" for f in tree.files(f"{root}/{d}") if f not in (skip or {}).get(d, set())]
             for d in tree.subdirs(root)}
    chosen, missing = select(source, lists, found, allow_missing=allow_missing)
    classes = [PreparedClass(name, split, files) for split in SPLIT_ORDER for name, files in chosen[split]]
    return Plan(classes, plain_loader(tree), missing=missing)


def dtd(tree: InputTree, *, allow_missing: bool = False) -> Plan:
    """DTD (``dtd-r1.0.1.tar.gz``): ``dtd/images/<class>/*.jpg``; upstream skips waffled's stray ``.directory``."""
    root = _class_root(tree, "images", _all_listed("dtd"), "dtd-r1.0.1.tar.gz or its unpacked dtd/ folder")
    return _folder_plan(tree, "dtd", root, allow_missing=allow_missing, skip={"waffled": {".directory"}})


def cu_birds(tree: InputTree, *, allow_missing: bool = False) -> Plan:
    """CUB-200-2011 (``CUB_200_2011.tgz``): ``CUB_200_2011/images/<class>/*.jpg``."""
    root = _class_root(tree, "images", _all_listed("cu_birds"), "CUB_200_2011.tgz or its unpacked folder")
    return _folder_plan(tree, "cu_birds", root, allow_missing=allow_missing)


def traffic_sign(tree: InputTree, *, allow_missing: bool = False) -> Plan:
    """GTSRB (``GTSRB_Final_Training_Images.zip``): ``Final_Training/Images/<class:05d>/*.ppm`` plus one
    ``GT-<class>.csv`` of annotations, skipped; each class's sorted files shuffled with RandomState(23)."""
    hits = tree.find_dirs("Final_Training/Images")
    if not hits:
        raise InputNotFound(f"The inputs ({tree.describe()}) hold no Final_Training/Images/ folder; pass "
                            "GTSRB_Final_Training_Images.zip or the GTSRB/ folder it unpacks to.")
    root = hits[0]
    seed = int(stored_splits("traffic_sign")["image_order_seed"])
    found: dict[str, list[str]] = {}
    for name in split_lists("traffic_sign")[SPLIT_ORDER[2]]:
        folder = f"{root}/{int(name[:2]):05d}"
        if tree.is_dir(folder):
            files = [f"{folder}/{f}" for f in tree.files(folder) if f != f"GT-{int(name[:2]):05d}.csv"]
            np.random.RandomState(seed).shuffle(files)  # a fresh generator per class, as upstream
            found[name] = files
    chosen, missing = select("traffic_sign", split_lists("traffic_sign"), found, allow_missing=allow_missing)
    classes = [PreparedClass(name, split, files) for split in SPLIT_ORDER for name, files in chosen[split]]
    return Plan(classes, plain_loader(tree), missing=missing)


def omniglot(tree: InputTree, *, allow_missing: bool = False) -> Plan:
    """Omniglot (``images_background.zip``, ``images_evaluation.zip``): ``<set>/<alphabet>/<character>/*.png``.

    Alphabets are superclasses: TRAIN and VALID alphabets come from ``images_background``, TEST ones from
    ``images_evaluation``; characters are sorted within an alphabet and named ``<alphabet>-<character>``.
    Images are inverted, as upstream does.
    """
    lists = split_lists("omniglot")
    roots = {split: tree.find_dirs("images_evaluation" if split is SPLIT_ORDER[2] else "images_background")
             for split in SPLIT_ORDER}
    if not any(roots.values()):
        raise InputNotFound(f"The inputs ({tree.describe()}) hold no images_background/ or images_evaluation/ "
                            "folder; pass Omniglot's images_background.zip and images_evaluation.zip.")
    found: dict[str, tuple[str, str]] = {}
    for split in SPLIT_ORDER:
        for root in roots[split][:1]:
            for alphabet in tree.subdirs(root):
                if alphabet in lists[split]:
                    found[alphabet] = (root, alphabet)
    chosen, missing = select("omniglot", lists, found, allow_missing=allow_missing, what="alphabets")
    classes = []
    for split in SPLIT_ORDER:
        for alphabet, (root, _) in chosen[split]:
            for char in tree.subdirs(f"{root}/{alphabet}"):
                folder = f"{root}/{alphabet}/{char}"
                files = [f"{folder}/{f}" for f in tree.files(folder)]
                classes.append(PreparedClass(f"{alphabet}-{char}", split, files, superclass=alphabet))

    def load(path: str, size: int) -> Any:
        return upstream_pixels(open_image(tree.read(path), f'Image "{path}" of {tree.origin(path)}'), invert=True)

    return Plan(classes, load, native=_first_side(tree, classes), missing=missing)


def _first_side(tree: InputTree, classes: Sequence[PreparedClass]) -> int | None:
    """The side of the first image (Omniglot's are all 105 x 105), or None when it is not square."""
    for c in classes:
        for path in c.items[:1]:
            w, h = open_image(tree.read(path), f'Image "{path}" of {tree.origin(path)}').size
            return w if w == h else None
    return None


def _all_listed(source: str) -> list[str]:
    lists = split_lists(source)
    return [name for split in SPLIT_ORDER for name in lists[split]]
