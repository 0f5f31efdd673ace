"""Test helpers: write tiny sources in Meta-Dataset's public on-disk format.

The writer follows the format spec independently of the reader under test: a
``dataset_spec.json`` plus one TFRecord file per class, each record a ``tf.train.Example``
(built with the ``tfrecord`` package's protobuf classes) framed as
``uint64 length | masked crc32c(length) | data | masked crc32c(data)``.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import numpy as np
from PIL import Image, ImageDraw
from tfrecord import example_pb2

__all__ = ["MDSource", "class_image", "encode", "example_bytes", "frame", "write_md_source", "write_omniglot_like",
           "write_tfrecord"]

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def _masked(data: bytes) -> bytes:
    crc = crc32c.crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame(payload: bytes) -> bytes:
    """One TFRecord record around ``payload``."""
    length = struct.pack("<Q", len(payload))
    return length + _masked(length) + payload + _masked(payload)


def example_bytes(image: bytes, label: int) -> bytes:
    """A serialized ``tf.train.Example`` with ``image`` (bytes) and ``label`` (int64)."""
    features = example_pb2.Features(feature={
        "image": example_pb2.Feature(bytes_list=example_pb2.BytesList(value=[image])),
        "label": example_pb2.Feature(int64_list=example_pb2.Int64List(value=[label])),
    })
    return example_pb2.Example(features=features).SerializeToString()


def write_tfrecord(path: Path, payloads: Sequence[bytes]) -> list[int]:
    """Write framed records; return each record's byte offset."""
    offsets, pos = [], 0
    with open(path, "wb") as f:
        for p in payloads:
            offsets.append(pos)
            rec = frame(p)
            f.write(rec)
            pos += len(rec)
    return offsets


def class_image(class_id: int, index: int, size: tuple[int, int], grey: bool = False) -> np.ndarray:
    """A distinguishable image: class colour background, a shape whose position encodes the index."""
    h, w = size
    img = Image.new("RGB", (w, h), _PALETTE[class_id % len(_PALETTE)])
    draw = ImageDraw.Draw(img)
    x0, y0 = (index * 5) % max(w // 2, 1), (index * 3) % max(h // 2, 1)
    box = (x0, y0, x0 + w // 3, y0 + h // 3)
    fill = ((class_id * 37) % 256, (index * 53) % 256, 255 - (index * 19) % 256)
    (draw.ellipse if class_id % 2 else draw.rectangle)(box, fill=fill)
    if grey:
        img = img.convert("L").convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    """PNG (lossless) or JPEG bytes of an RGB uint8 array (greyscale when the channels agree)."""
    img = Image.fromarray(image)
    if (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all():
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@dataclass
class MDSource:
    """What ``write_md_source`` wrote: folder, spec dict and each class's images in file order."""

    folder: Path
    spec: dict
    images: list[list[np.ndarray]] = field(default_factory=list)
    offsets: list[list[int]] = field(default_factory=list)

    def class_file(self, class_id: int) -> Path:
        return self.folder / f"{class_id}.tfrecords"


def write_md_source(
    folder: Path,
    *,
    name: str = "toy",
    classes_per_split: tuple[int, int, int] = (6, 3, 3),
    images_per_class: Sequence[int] | None = None,
    size: int | None = 32,
    fmt: str = "PNG",
    classes_per_superclass: Sequence[int] | None = None,
    superclasses_per_split: tuple[int, int, int] | None = None,
    grey: bool = False,
) -> MDSource:
    """Write a Meta-Dataset-format source. ``size=None`` gives every image its own odd size."""
    folder.mkdir(parents=True, exist_ok=True)
    n_classes = sum(classes_per_split)
    counts = list(images_per_class or [6 + (c % 7) for c in range(n_classes)])
    out = MDSource(folder, {})
    for c in range(n_classes):
        imgs = [class_image(c, i, (size, size) if size else (20 + 3 * i, 30 + 2 * c), grey) for i in range(counts[c])]
        out.images.append(imgs)
        out.offsets.append(write_tfrecord(out.class_file(c), [example_bytes(encode(a, fmt), c) for a in imgs]))
    splits = ("TRAIN", "VALID", "TEST")
    spec: dict = {
        "name": name,
        "classes_per_split": {f"Split.{s}": k for s, k in zip(splits, classes_per_split)},
        "images_per_class": {str(c): counts[c] for c in range(n_classes)},
        "class_names": {str(c): f"class_{c:03d}" for c in range(n_classes)},
        "path": str(folder),
        "file_pattern": "{}.tfrecords",
    }
    if classes_per_superclass is not None and superclasses_per_split is not None:
        spec["__class__"] = "BiLevelDatasetSpecification"
        spec["superclasses_per_split"] = {f"Split.{s}": k for s, k in zip(splits, superclasses_per_split)}
        spec["classes_per_superclass"] = {str(s): k for s, k in enumerate(classes_per_superclass)}
        del spec["classes_per_split"]  # as in MD's BiLevel specs: implied by the superclasses
    (folder / "dataset_spec.json").write_text(json.dumps(spec, indent=1))
    out.spec = spec
    return out


def write_omniglot_like(folder: Path, name: str = "omniglot") -> MDSource:
    """Greyscale source with alphabets as superclasses: 3/1/2 alphabets of 5-6 characters."""
    per_super = [5, 6, 5, 5, 6, 5]
    return write_md_source(folder, name=name, classes_per_split=(16, 5, 11), images_per_class=[8] * 32,
                           classes_per_superclass=per_super, superclasses_per_split=(3, 1, 2), grey=True, size=28)
