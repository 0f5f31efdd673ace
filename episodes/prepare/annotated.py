"""Sources whose classes come from annotation files: FGVC-Aircraft, VGG Flower and Fungi.

* Aircraft: a class is a variant (``images_variant_{trainval,test}.txt``); its images, sorted by name, are cropped
  to their box of ``images_box.txt`` (which also removes the 20-pixel copyright banner).
* VGG Flower: ``imagelabels.mat`` gives the 1-based label of ``jpg/image_<i:05d>.jpg``; images stay in file order.
* Fungi: ``train.json`` and ``val.json`` (FGVCx 2018) together; a class is a category id, its images those of
  the two image lists, train first, in list order.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from typing import Any

from episodes.prepare.folders import plain_loader
from episodes.prepare.inputs import InputNotFound, InputTree, PrepareError
from episodes.prepare.md_splits import SPLIT_ORDER, select, split_lists
from episodes.prepare.source import Plan, PreparedClass, open_image, upstream_pixels

__all__ = ["aircraft", "fungi", "vgg_flower"]


def _one_file(tree: InputTree, name: str, hint: str) -> str:
    hits = tree.find_files(name)
    if not hits:
        raise InputNotFound(f"The inputs ({tree.describe()}) hold no {name}; pass {hint}.")
    return hits[0]


def _text_lines(tree: InputTree, path: str) -> list[str]:
    try:
        text = tree.read(path).decode("utf-8")
    except UnicodeDecodeError:
        raise PrepareError(f'"{path}" of {tree.origin(path)} is not UTF-8 text; download it again.') from None
    return [line for line in text.split("\n") if line.strip()]


def _require(tree: InputTree, paths: list[str], what: str) -> None:
    """Fail before conversion starts, naming the first file the annotations refer to that is not there."""
    for path in paths:
        if not tree.exists(path):
            raise InputNotFound(f'"{path}", an image {what} names, is not in the inputs ({tree.describe()}); '
                                "pass the complete download.")


def aircraft(tree: InputTree, *, allow_missing: bool = False) -> Plan:
    """FGVC-Aircraft 2013b (``fgvc-aircraft-2013b.tar.gz``)."""
    hint = "fgvc-aircraft-2013b.tar.gz or its unpacked folder"
    boxes_file = _one_file(tree, "data/images_box.txt", hint)
    data = boxes_file[: -len("/images_box.txt")]
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for line in _text_lines(tree, boxes_file):
        parts = line.split(" ")
        if len(parts) != 5:
            raise PrepareError(f'"{boxes_file}" has a line that is not "<image> xmin ymin xmax ymax": {line!r}.')
        boxes[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4]))
    variant_of: dict[str, str] = {}
    for part in ("trainval", "test"):
        path = f"{data}/images_variant_{part}.txt"
        if not tree.exists(path):
            raise InputNotFound(f'The inputs ({tree.describe()}) hold no "{path}"; pass {hint}.')
        for line in _text_lines(tree, path):
            name, _, variant = line.partition(" ")
            variant_of[name] = variant
    images_of: dict[str, list[str]] = defaultdict(list)
    for name, variant in variant_of.items():
        images_of[variant].append(name)
    chosen, missing = select("aircraft", split_lists("aircraft"), images_of, allow_missing=allow_missing)
    classes = []
    for split in SPLIT_ORDER:
        for variant, names in chosen[split]:
            unboxed = [n for n in names if n not in boxes]
            if unboxed:
                raise PrepareError(f'"{boxes_file}" has no box for image {unboxed[0]}; pass the complete download.')
            items = [(f"{data}/images/{n}.jpg", boxes[n]) for n in sorted(names)]
            _require(tree, [p for p, _ in items], f"{data}/images_variant_*.txt")
            classes.append(PreparedClass(variant, split, items))

    def load(item: tuple[str, tuple[int, int, int, int]], size: int) -> Any:
        path, box = item
        return upstream_pixels(open_image(tree.read(path), f'Image "{path}" of {tree.origin(path)}'), box=box)

    return Plan(classes, load, missing=missing)


def vgg_flower(tree: InputTree, *, allow_missing: bool = False) -> Plan:
    """VGG Flower 102 (``102flowers.tgz`` and ``imagelabels.mat``)."""
    from scipy.io import loadmat

    mat = _one_file(tree, "imagelabels.mat", "imagelabels.mat beside 102flowers.tgz")
    try:
        labels = loadmat(io.BytesIO(tree.read(mat)))["labels"][0]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise PrepareError(f'"{mat}" of {tree.origin(mat)} is not the flowers\' imagelabels.mat ({e}).') from None
    jpg = tree.find_dirs("jpg", where=lambda d: bool(tree.files(d)))
    if not jpg:
        raise InputNotFound(f"The inputs ({tree.describe()}) hold no jpg/ folder of images; pass 102flowers.tgz "
                            "or its unpacked jpg/ folder.")
    by_label: dict[int, list[str]] = defaultdict(list)
    for i, label in enumerate(labels.tolist()):
        by_label[int(label)].append(f"{jpg[0]}/image_{i + 1:05d}.jpg")
    lists = split_lists("vgg_flower")
    listed = [name for split in SPLIT_ORDER for name in lists[split]]
    found = {name: by_label[int(name[:3])] for name in listed if int(name[:3]) in by_label}
    chosen, missing = select("vgg_flower", lists, found, allow_missing=allow_missing)
    classes = [PreparedClass(name, split, paths) for split in SPLIT_ORDER for name, paths in chosen[split]]
    _require(tree, [p for c in classes for p in c.items], mat)
    return Plan(classes, plain_loader(tree), missing=missing)


def _read_json(tree: InputTree, path: str) -> Any:
    try:
        return json.loads(tree.read(path))
    except ValueError as e:
        raise PrepareError(f'"{path}" of {tree.origin(path)} is not valid JSON ({e}); download it again.') from None


def fungi(tree: InputTree, *, allow_missing: bool = False) -> Plan:
    """Fungi (FGVCx 2018: ``fungi_train_val.tgz`` and ``train_val_annotations.tgz``)."""
    hint = "train_val_annotations.tgz (or its train.json and val.json) with fungi_train_val.tgz"
    sets = [_read_json(tree, _one_file(tree, name, hint)) for name in ("train.json", "val.json")]
    try:
        if sets[0]["categories"] != sets[1]["categories"]:
            raise PrepareError("train.json and val.json list different categories; pass the pair from one download.")
        labels = {int(c["id"]): f"{int(c['id']):04d}.{c['name']}" for c in sets[0]["categories"]}
        images = sets[0]["images"] + sets[1]["images"]
        class_of: dict[Any, int] = {}
        for ann in sets[0]["annotations"] + sets[1]["annotations"]:
            if ann["image_id"] in class_of:
                raise PrepareError(f"Fungi image {ann['image_id']} is annotated twice; pass the original train.json "
                                   "and val.json.")
            class_of[ann["image_id"]] = int(ann["category_id"])
        unlabelled = [im["id"] for im in images if im["id"] not in class_of]
        if unlabelled:
            raise PrepareError(f"Fungi image {unlabelled[0]} has no annotation; pass the original train.json and "
                               "val.json.")
        files = [(str(im["file_name"]).strip("/"), class_of[im["id"]]) for im in images]
    except (KeyError, TypeError) as e:
        raise PrepareError(f"train.json / val.json lack the FGVCx fields (images, annotations, categories: {e}); "
                           "pass the FGVCx 2018 fungi annotations.") from None
    if not files:
        raise PrepareError("train.json and val.json list no images; pass the FGVCx 2018 fungi annotations.")
    root = _image_root(tree, files[0][0])
    by_class: dict[int, list[str]] = defaultdict(list)
    for name, category in files:
        by_class[category].append(root + name)
    chosen, missing = select("fungi", split_lists("fungi"), by_class, allow_missing=allow_missing)
    classes = [PreparedClass(labels.get(cid, f"{cid:04d}"), split, paths)
               for split in SPLIT_ORDER for cid, paths in chosen[split]]
    _require(tree, [p for c in classes for p in c.items], "train.json / val.json")
    return Plan(classes, plain_loader(tree), missing=[labels.get(m, f"{m:04d}") for m in missing])


def _image_root(tree: InputTree, file_name: str) -> str:
    """The folder the annotations' relative file names start from (where the image archive was unpacked)."""
    hits = tree.find_files(file_name)
    if not hits:
        raise InputNotFound(f'"{file_name}", the first image train.json names, is not in the inputs '
                            f"({tree.describe()}); pass fungi_train_val.tgz or its unpacked images/ folder.")
    return hits[0][: len(hits[0]) - len(file_name)]
