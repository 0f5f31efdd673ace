"""Test helpers: tiny raw downloads of Meta-Dataset's sources, each in its published layout.

Every writer returns a ``Raw``: the paths to pass to ``prepare`` and the pixels of each image by member path, so
tests can check exact pixels after upstream's rules. Images are PNG bytes even under ``.jpg`` names (Pillow reads
by content), which keeps them lossless; the ``.npy``, ``.mat`` and JSON files are the real formats.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Raw:
    """What a writer made: the inputs for ``prepare`` and each image's pixels by member path."""

    inputs: list[Path]
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def noise(seed: int, h: int = 10, w: int = 12, grey: bool = False) -> np.ndarray:
    """A reproducible random image (RGB uint8, or H x W for ``grey``)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)


def png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, files: Mapping[str, bytes], compression: str = "gz") -> Path:
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, files: Mapping[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def write_folder(root: Path, files: Mapping[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def images(prefix: str, names: Iterable[str], seed: int, **kw: object) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """PNG bytes and pixels for ``prefix/<name>`` of each name."""
    files, pixels = {}, {}
    for k, name in enumerate(names):
        px = noise(seed + k, **kw)  # type: ignore[arg-type]
        files[f"{prefix}/{name}"], pixels[f"{prefix}/{name}"] = png(px), px
    return files, pixels


def omniglot(tmp: Path, alphabets: Mapping[str, Mapping[str, int]], side: int = 12) -> Raw:
    """images_background.zip / images_evaluation.zip: {set: {alphabet/character: n_images}} as 1-bit PNGs."""
    raw = Raw([])
    for k, (folder, chars) in enumerate(alphabets.items()):
        files = {}
        for c, (char, n) in enumerate(chars.items()):
            for i in range(n):
                bits = noise(1000 * k + 50 * c + i, side, side, grey=True) > 127
                name = f"{folder}/{char}/{i:04d}_{i + 1:02d}.png"
                files[name] = png(bits.astype(np.uint8) * 255, mode="1")
                raw.pixels[name] = np.repeat((bits.astype(np.uint8) * 255)[..., None], 3, axis=-1)
        raw.inputs.append(write_zip(tmp / f"{folder}.zip", files))
    return raw


def class_folders(root_name: str, classes: Mapping[str, int], seed: int = 0, ext: str = "jpg") -> Raw:
    """``<root_name>/<class>/<class>_<i>.<ext>`` members (not yet written)."""
    raw = Raw([])
    files: dict[str, bytes] = {}
    for c, (name, n) in enumerate(classes.items()):
        f, p = images(f"{root_name}/{name}", [f"{name}_{i:04d}.{ext}" for i in range(n)], seed + 100 * c)
        files.update(f)
        raw.pixels.update(p)
    raw.extra["files"] = files
    return raw


def dtd(tmp: Path, classes: Mapping[str, int]) -> Raw:
    """dtd-r1.0.1.tar.gz: dtd/images/<class>/*.jpg, dtd/labels/, and waffled's stray .directory file."""
    raw = class_folders("dtd/images", classes)
    files = dict(raw.extra.pop("files"))
    files["dtd/labels/labels_joint_anno.txt"] = b"banded/banded_0002.jpg banded\n"
    if "waffled" in classes:
        files["dtd/images/waffled/.directory"] = b"[Dolphin]\nTimestamp=2013,3,4\n"
    raw.inputs.append(write_tar(tmp / "dtd-r1.0.1.tar.gz", files))
    return raw


def cub(tmp: Path, classes: Mapping[str, int], as_folder: bool = False) -> Raw:
    """CUB_200_2011.tgz (or its unpacked folder): CUB_200_2011/images/<class>/*.jpg plus classes.txt."""
    raw = class_folders("CUB_200_2011/images", classes)
    files = dict(raw.extra.pop("files"))
    files["CUB_200_2011/classes.txt"] = "".join(f"{int(c[:3])} {c}\n" for c in classes).encode()
    if as_folder:
        write_folder(tmp, files)
        raw.inputs.append(tmp / "CUB_200_2011")
    else:
        raw.inputs.append(write_tar(tmp / "CUB_200_2011.tgz", files))
    return raw


def gtsrb(tmp: Path, classes: Mapping[int, int]) -> Raw:
    """GTSRB_Final_Training_Images.zip: GTSRB/Final_Training/Images/<class:05d>/*.ppm and GT-<class>.csv."""
    raw, files = Raw([]), {}
    for c, n in classes.items():
        folder = f"GTSRB/Final_Training/Images/{c:05d}"
        for i in range(n):
            px = noise(10 * c + i)
            buf = io.BytesIO()
            Image.fromarray(px).save(buf, format="PPM")
            name = f"{folder}/{i // 3:05d}_{i % 3:05d}.ppm"
            files[name], raw.pixels[name] = buf.getvalue(), px
        files[f"{folder}/GT-{c:05d}.csv"] = b"Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    raw.inputs.append(write_zip(tmp / "GTSRB_Final_Training_Images.zip", files))
    return raw


def quickdraw(tmp: Path, classes: Mapping[str, int], boolean: Sequence[str] = ()) -> Raw:
    """A folder of <class>.npy files of [n, 784] bitmaps (uint8 0-255, or bool for the names in ``boolean``)."""
    folder = tmp / "numpy_bitmap"
    folder.mkdir(parents=True, exist_ok=True)
    raw = Raw([folder])
    for k, (name, n) in enumerate(classes.items()):
        rows = np.random.default_rng(k).integers(0, 256, (n, 784), dtype=np.uint8)
        if name in boolean:
            rows = rows > 127
        np.save(folder / f"{name}.npy", rows)
        raw.extra[name] = rows
    return raw


def aircraft(tmp: Path, variants: Mapping[str, int], side: int = 8) -> Raw:
    """fgvc-aircraft-2013b.tar.gz: data/images/<id>.jpg (20 x 24, with a box of ``side``) and the data/ lists."""
    raw, files = Raw([]), {}
    boxes, trainval, test = [], [], []
    image_id = 1000
    for v, (variant, n) in enumerate(variants.items()):
        for i in range(n):
            image_id += 7 if i % 2 else 3  # ids out of order within a variant: the class is sorted by name
            name = f"{image_id:07d}"
            px = noise(image_id, 20, 24)
            x0, y0 = 1 + (i % 5), 2 + (v % 7)
            files[f"fgvc-aircraft-2013b/data/images/{name}.jpg"] = png(px)
            boxes.append(f"{name} {x0} {y0} {x0 + side} {y0 + side}")
            (test if i % 3 == 2 else trainval).append(f"{name} {variant}")
            raw.pixels[name] = px[y0 : y0 + side, x0 : x0 + side]
    files["fgvc-aircraft-2013b/data/images_box.txt"] = ("\n".join(boxes) + "\n").encode()
    files["fgvc-aircraft-2013b/data/images_variant_trainval.txt"] = ("\n".join(trainval) + "\n").encode()
    files["fgvc-aircraft-2013b/data/images_variant_test.txt"] = ("\n".join(test) + "\n").encode()
    files["fgvc-aircraft-2013b/data/variants.txt"] = ("\n".join(variants) + "\n").encode()
    raw.inputs.append(write_tar(tmp / "fgvc-aircraft-2013b.tar.gz", files))
    return raw


def vgg_flower(tmp: Path, labels: Sequence[int], drop: Sequence[int] = ()) -> Raw:
    """102flowers.tgz (jpg/image_<i:05d>.jpg) and imagelabels.mat with ``labels`` (1-based, one per image)."""
    from scipy.io import savemat

    names = [f"image_{i + 1:05d}.jpg" for i in range(len(labels))]
    files, pixels = images("jpg", names, seed=7)
    for i in drop:
        files.pop(f"jpg/{names[i]}")
    raw = Raw([write_tar(tmp / "102flowers.tgz", files)], pixels)
    savemat(tmp / "imagelabels.mat", {"labels": np.asarray([labels], dtype=np.uint8)})
    raw.inputs.append(tmp / "imagelabels.mat")
    return raw


def fungi(tmp: Path, categories: Mapping[int, str], per_class: Mapping[int, int]) -> Raw:
    """fungi_train_val.tgz (images/<folder>/<file>.JPG) and train_val_annotations.tgz (train.json, val.json)."""
    cats = [{"id": cid, "name": name, "supercategory": "Fungi"} for cid, name in sorted(categories.items())]
    sets: dict[str, dict] = {s: {"images": [], "annotations": [], "categories": cats} for s in ("train", "val")}
    files: dict[str, bytes] = {}
    raw = Raw([])
    image_id = 0
    for cid, n in per_class.items():
        for i in range(n):
            part = "val" if i % 3 == 1 else "train"
            folder = f"{cid:05d}_{categories[cid].replace(' ', '_')}" if len(per_class) <= 20 else "many"
            name = f"images/{folder}/F{image_id:06d}.JPG"  # one folder per species, unless there are many
            px = noise(500 + image_id)
            files[name], raw.pixels[name] = png(px), px
            sets[part]["images"].append({"id": image_id, "file_name": name, "width": 12, "height": 10})
            sets[part]["annotations"].append({"id": image_id, "image_id": image_id, "category_id": cid})
            image_id += 1
    raw.inputs.append(write_tar(tmp / "fungi_train_val.tgz", files))
    notes = {f"{s}.json": json.dumps(sets[s]).encode() for s in sets}
    raw.inputs.append(write_tar(tmp / "train_val_annotations.tgz", notes))
    raw.extra["sets"] = sets
    return raw


def mscoco(tmp: Path, categories: Sequence[str], boxes: Sequence[tuple[int, str, list[float]]],
           sizes: Mapping[int, tuple[int, int]]) -> Raw:
    """train2017/ (a folder) and annotations_trainval2017.zip: ``boxes`` are (image id, category, [x, y, w, h])."""
    cats = [{"id": 10 + 2 * k, "name": name, "supercategory": "thing"} for k, name in enumerate(categories)]
    ids = {c["name"]: c["id"] for c in cats}
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, (w, h) in sizes.items()],
            "annotations": [{"id": k, "image_id": i, "category_id": ids[c], "bbox": b, "iscrowd": 0}
                            for k, (i, c, b) in enumerate(boxes)],
            "categories": cats}
    folder = tmp / "coco"
    raw = Raw([])
    for i, (w, h) in sizes.items():
        px = noise(i, h, w)
        write_folder(folder, {f"train2017/{i:012d}.jpg": png(px)})
        raw.pixels[f"{i:012d}.jpg"] = px
    raw.inputs.append(folder / "train2017")
    raw.inputs.append(write_zip(tmp / "annotations_trainval2017.zip",
                                {"annotations/instances_train2017.json": json.dumps(data).encode()}))
    return raw


def ilsvrc(tmp: Path, synsets: Mapping[str, int], graph: Mapping[str, Mapping[str, Sequence[str]]],
           duplicate: Sequence[str] = ()) -> Raw:
    """ILSVRC2012_img_train.tar (one uncompressed tar per synset), a tiny Meta-Dataset ILSVRC spec whose split
    subgraphs are ``graph`` ({split: {node: children}}), and the three duplicates lists naming ``duplicate``."""
    from episodes.hierarchy import export_subgraph

    raw, outer = Raw([]), {}
    for s, (wn_id, n) in enumerate(synsets.items()):
        inner, p = images(wn_id, [f"{wn_id}_{i + 1}.JPEG" for i in range(n)], seed=300 + 20 * s)
        raw.pixels.update(p)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, data in inner.items():
                info = tarfile.TarInfo(name.rpartition("/")[2])
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        outer[f"{wn_id}.tar"] = buf.getvalue()
    raw.inputs.append(write_tar(tmp / "ILSVRC2012_img_train.tar", outer, compression=""))
    subgraphs = {split: export_subgraph(children) for split, children in graph.items()}
    leaves = {split: sorted(n["wn_id"] for n in nodes if not n["children_ids"]) for split, nodes in subgraphs.items()}
    order = [wn for split in ("TRAIN", "VALID", "TEST") for wn in leaves.get(split, [])]
    counts = {split: {wn: synsets.get(wn, 0) - sum(d.startswith(wn) for d in duplicate) for wn in leaves[split]}
              for split in leaves}
    spec = {"name": "ilsvrc_2012", "split_subgraphs": subgraphs, "images_per_class": counts,
            "class_names": {str(i): wn for i, wn in enumerate(order)}, "path": "/records/ilsvrc_2012",
            "file_pattern": "{}.tfrecords", "__class__": "HierarchicalDatasetSpecification"}
    conv = tmp / "dataset_conversion"
    write_folder(conv, {"dataset_specs/ilsvrc_2012_dataset_spec.json": json.dumps(spec).encode()})
    lines = "# header\n" + "".join(f"{d.split('_')[0]}/{d}  # other.jpg\n" for d in duplicate)
    for name in ("Caltech101", "Caltech256", "CUBirds"):
        write_folder(conv, {f"ImageNet_{name}_duplicates.txt": lines.encode() if name == "CUBirds" else b"# none\n"})
    raw.inputs.append(conv)
    raw.extra["spec"] = spec
    return raw
