"""A prepared source: Meta-Dataset's classes of a raw download, read lazily, image by image, in upstream's order.

Each converter turns a download into a ``Plan``: the classes in Meta-Dataset order (TRAIN ids first, then VALID,
then TEST; an alphabet's characters contiguous), each with its images in the order upstream wrote them into the
class's TFRecord file, and a loader that applies upstream's pixel rules (RGB, crop, inversion). ``PreparedSource``
serves them through the ``Source`` interface, so ``convert_source`` packs them like any other source.

Reading index ``i`` of a class returns record ``order[i]``, where ``order`` is the fixed within-class shuffle the
TFRecord reader applies (``MetaDatasetTFRecords(shuffle=True)``): a cache prepared from the raw files then yields
the same episodes as one converted from upstream's records.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from episodes.prepare.inputs import InputTree, PrepareError
from episodes.prepare.md_splits import SPLIT_ORDER
from episodes.readers.base import Source
from episodes.readers.tfrecord import MD_SOURCES
from episodes.readers.tfrecord import record_order as md_record_order
from episodes.spec import DatasetSpec
from episodes.split import Split

__all__ = ["ORIGINAL_JPEG", "Loader", "Plan", "PreparedClass", "PreparedSource", "as_upstream_record", "build_spec",
           "md_record_order", "open_image", "upstream_pixels"]

Loader = Callable[[Any, int], "Image.Image | np.ndarray"]  # (item, target side) -> image (PIL, or uint8 H x W)
ORIGINAL_JPEG = "metabench.original_jpeg"  # PIL info key: upstream stored the file's own JPEG bytes


@dataclass(frozen=True)
class PreparedClass:
    """One class: its name, split, superclass (Omniglot's alphabet) and its images in upstream record order."""

    name: str
    split: Split
    items: Sequence[Any]
    superclass: str | None = None


@dataclass
class Plan:
    """What a converter found: the classes in Meta-Dataset order and how to load one image.

    ``native`` is the side shared by every image when the download guarantees one (Omniglot, QuickDraw), used
    when no image size is asked; ``missing`` lists the upstream classes the inputs lack (``allow_missing``);
    ``extra`` goes into the spec (``superclass_names``, ILSVRC's ``split_subgraphs``); ``notes`` are findings
    worth a warning, such as image counts that differ from upstream's spec.
    """

    classes: list[PreparedClass]
    load: Loader
    native: int | None = None
    missing: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def open_image(data: bytes, what: str, draft: int | None = None) -> Image.Image:
    """Decode ``data`` (``what`` names it in errors); with ``draft``, an RGB JPEG decodes at a reduced scale of at
    least that side, as the TFRecord reader decodes the bytes upstream stored unchanged."""
    try:
        img = Image.open(io.BytesIO(data))
        if draft is not None and img.format == "JPEG" and img.mode == "RGB":
            img.draft("RGB", (draft, draft))
        img.load()
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        why = "not a known image format" if isinstance(e, UnidentifiedImageError) else e
        raise PrepareError(f"{what} cannot be decoded ({why}); replace it with the file from the original "
                           "download.") from None


def upstream_pixels(img: Image.Image, *, box: Sequence[int] | None = None, invert: bool = False) -> Image.Image:
    """Upstream's pixel rules, in its order: to RGB, crop to ``box`` (left, top, right, bottom), invert.

    The result records whether upstream kept the file's bytes as they were (an RGB JPEG it neither cropped nor
    inverted) or wrote a new JPEG of these pixels (see ``PreparedSource(reencode_jpeg=True)``).
    """
    unchanged = img.format == "JPEG" and img.mode == "RGB" and box is None and not invert
    if img.mode != "RGB":
        img = img.convert("RGB")
    if box is not None:
        img = img.crop(tuple(int(v) for v in box))
    if invert:
        img = ImageOps.invert(img)
    img.info[ORIGINAL_JPEG] = unchanged
    return img


def as_upstream_record(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """``image`` as the TFRecord reader returns it from upstream's record: saved as JPEG with PIL's defaults
    (quality 75), as ``dataset_to_records.py`` saves every image it changed, then decoded and resized."""
    from episodes.readers.tfrecord_format import decode_image

    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG")
    return decode_image(buf.getvalue(), size, "a re-encoded image")


def _resized(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 ``[size, size, 3]``: bilinear squash, as the TFRecord and folder readers resize."""
    if isinstance(image, np.ndarray) and image.shape == (size, size):  # QuickDraw at its native size: no PIL
        return np.repeat(image[..., None], 3, axis=-1)
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _check_order(name: str, classes: Sequence[PreparedClass]) -> None:
    ranks = [SPLIT_ORDER.index(c.split) for c in classes]
    if ranks != sorted(ranks):
        raise PrepareError(f'Source "{name}": classes must come TRAIN first, then VALID, then TEST.')
    seen: list[str] = []
    for c in classes:
        if c.superclass is not None and c.superclass in seen and seen[-1] != c.superclass:
            raise PrepareError(f'Source "{name}": the classes of superclass "{c.superclass}" are not contiguous.')
        if c.superclass is not None and (not seen or seen[-1] != c.superclass):
            seen.append(c.superclass)


def build_spec(name: str, classes: Sequence[PreparedClass], extra: dict[str, Any] | None = None) -> DatasetSpec:
    """The DatasetSpec of ``classes`` (already in Meta-Dataset order); superclasses when every class has one."""
    _check_order(name, classes)
    extra = dict(extra or {})
    kwargs: dict[str, Any] = {}
    if classes and all(c.superclass is not None for c in classes):
        supers = list(dict.fromkeys(str(c.superclass) for c in classes))
        kwargs["superclasses_per_split"] = {s: len({c.superclass for c in classes if c.split is s})
                                            for s in SPLIT_ORDER}
        kwargs["classes_per_superclass"] = {i: sum(c.superclass == s for c in classes) for i, s in enumerate(supers)}
        extra["superclass_names"] = {str(i): s for i, s in enumerate(supers)}
    return DatasetSpec(
        name=name,
        classes_per_split={s: sum(c.split is s for c in classes) for s in SPLIT_ORDER},
        images_per_class={i: len(c.items) for i, c in enumerate(classes)},
        class_names={i: c.name for i, c in enumerate(classes)},
        extra=extra,
        **kwargs,
    )


class PreparedSource(Source):
    """A source read straight from raw downloads through a converter's ``Plan``.

    Args:
        name: the Meta-Dataset source name (also the spec's name and the key of the within-class order).
        plan: classes, loader and findings of the converter.
        tree: the inputs the loader reads; closed by ``close``.
        image_size: the side every image is resized to.
        shuffle: apply the TFRecord reader's within-class order (default); False keeps upstream's record order.
        reencode_jpeg: pass every image upstream re-encoded (PNGs, crops, inverted, greyscale, QuickDraw rows)
            through the same JPEG round trip (PIL's quality 75), so pixels match a cache converted from upstream's
            TFRecords instead of being lossless.
    """

    def __init__(self, name: str, plan: Plan, tree: InputTree, *, image_size: int, shuffle: bool = True,
                 reencode_jpeg: bool = False) -> None:
        if image_size < 1:
            raise ValueError(f'Source "{name}": image_size={image_size} must be a positive integer.')
        self.name = name
        self.domain = MD_SOURCES.get(name, "ood")
        self.plan, self.tree = plan, tree
        self.image_size = int(image_size)
        self.shuffle = shuffle
        self.reencode_jpeg = reencode_jpeg
        pixels = "upstream_jpeg" if reencode_jpeg else "lossless"  # told apart when a finished file is kept
        self.spec = build_spec(name, plan.classes, {**plan.extra, "prepared": {"from": "raw", "pixels": pixels}})
        self._orders: dict[int, np.ndarray] = {}

    @property
    def native_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    def record_numbers(self, class_id: int) -> np.ndarray:
        """Upstream record number (position in the class's TFRecord file) of each image index of ``class_id``."""
        order = self._orders.get(class_id)
        if order is None:
            n = self.spec.images_per_class[class_id]
            order = md_record_order(self.name, class_id, n) if self.shuffle else np.arange(n, dtype=np.int64)
            self._orders[class_id] = order
        return order

    def item(self, class_id: int, index: int) -> Any:
        """What image ``index`` of ``class_id`` is read from (a member path, a crop, a row of a file)."""
        self._check_read(class_id, [index])
        return self.plan.classes[class_id].items[int(self.record_numbers(class_id)[index])]

    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        idx = self._check_read(class_id, indices)
        records = self.record_numbers(class_id)[idx]
        items = self.plan.classes[class_id].items
        out = np.empty((len(idx), self.image_size, self.image_size, 3), dtype=np.uint8)
        for k, r in enumerate(records.tolist()):
            image = self.plan.load(items[r], self.image_size)
            if self.reencode_jpeg and not (isinstance(image, Image.Image) and image.info.get(ORIGINAL_JPEG)):
                out[k] = as_upstream_record(image, self.image_size)
            else:
                out[k] = _resized(image, self.image_size)
        return out

    def close(self) -> None:
        """Close the inputs (and remove any staged files)."""
        self.tree.close()

    def __enter__(self) -> PreparedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
