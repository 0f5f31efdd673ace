"""MSCOCO: every instance box of ``instances_train2017.json``, enlarged 1.2x, cropped from its ``train2017`` image.

Upstream walks the annotations in file order; each one adds the crop of its box to its category's class. The box
(x, y, w, h) grows by ``ratio`` about its centre and is turned into PIL's pixel-corner coordinates with Python's
``round`` (half to even): ``xmin = max(round(x - 0.5), 0)``, ``xmax = min(round(x + w - 0.5) + 1, width)``, the same
for y. Crops with no area are skipped, as upstream skips them. Image sizes come from the annotation file, and each
image is checked against them when it is read, so the class sizes are known before any image is decoded.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from episodes.prepare.inputs import InputNotFound, InputTree, PrepareError
from episodes.prepare.md_splits import SPLIT_ORDER, select, split_lists
from episodes.prepare.source import Plan, PreparedClass, open_image, upstream_pixels

__all__ = ["BOX_SCALE", "crop_box", "mscoco"]

BOX_SCALE = 1.2


def crop_box(bbox: Sequence[float], width: int, height: int, ratio: float = BOX_SCALE) -> tuple[int, int, int, int]:
    """Upstream's crop of COCO box ``(x, y, w, h)`` in a ``width`` x ``height`` image: (left, top, right, bottom)."""
    x, y, w, h = (float(v) for v in bbox)
    x, y = x - 0.5 * w * (ratio - 1.0), y - 0.5 * h * (ratio - 1.0)
    w, h = w * ratio, h * ratio
    left, top = max(int(round(x - 0.5)), 0), max(int(round(y - 0.5)), 0)
    right, bottom = min(int(round(x + w - 0.5)) + 1, width), min(int(round(y + h - 0.5)) + 1, height)
    return left, top, right, bottom


def _annotations(tree: InputTree) -> tuple[str, Any]:
    hits = tree.find_files("instances_train2017.json")
    if not hits:
        raise InputNotFound(f"The inputs ({tree.describe()}) hold no instances_train2017.json; pass "
                            "annotations_trainval2017.zip (or the json) with train2017.zip.")
    try:
        return hits[0], json.loads(tree.read(hits[0]))
    except ValueError as e:
        raise PrepareError(f'"{hits[0]}" of {tree.origin(hits[0])} is not valid JSON ({e}); download it '
                           "again.") from None


def mscoco(tree: InputTree, *, allow_missing: bool = False) -> Plan:
    """MSCOCO 2017 (``train2017.zip`` and ``annotations_trainval2017.zip``)."""
    where, data = _annotations(tree)
    folders = tree.find_dirs("train2017", where=lambda d: bool(tree.files(d)))
    if not folders:
        raise InputNotFound(f"The inputs ({tree.describe()}) hold no train2017/ folder of images; pass "
                            "train2017.zip or its unpacked folder.")
    images = folders[0]
    try:
        category = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        sizes = {int(im["id"]): (int(im["width"]), int(im["height"])) for im in data["images"]}
        crops: dict[str, list[tuple[str, tuple[int, int, int, int], tuple[int, int]]]] = defaultdict(list)
        for ann in data["annotations"]:
            image_id = int(ann["image_id"])
            size = sizes[image_id]
            box = crop_box(ann["bbox"], *size)
            if box[2] <= box[0] or box[3] <= box[1]:
                continue  # upstream: "crops are not valid", skipped
            crops[category[int(ann["category_id"])]].append((f"{images}/{image_id:012d}.jpg", box, size))
    except (KeyError, TypeError, ValueError) as e:
        raise PrepareError(f'"{where}" lacks the COCO instance fields (categories, images, annotations: {e}); '
                           "pass instances_train2017.json.") from None
    chosen, missing = select("mscoco", split_lists("mscoco"), crops, allow_missing=allow_missing)
    classes = [PreparedClass(name, split, items) for split in SPLIT_ORDER for name, items in chosen[split]]
    for c in classes:
        for path, _, _ in c.items:
            if not tree.exists(path):
                raise InputNotFound(f'"{path}", an image {where} annotates, is not in the inputs '
                                    f"({tree.describe()}); pass the complete train2017.zip.")

    def load(item: tuple[str, tuple[int, int, int, int], tuple[int, int]], size: int) -> Any:
        path, box, expected = item
        img = open_image(tree.read(path), f'Image "{path}" of {tree.origin(path)}')
        if img.size != expected:
            raise PrepareError(f'Image "{path}" is {img.size[0]}x{img.size[1]} but {where} says '
                               f"{expected[0]}x{expected[1]}; pass the train2017 images of that annotation file.")
        return upstream_pixels(img, box=box)

    return Plan(classes, load, missing=missing)
