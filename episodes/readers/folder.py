"""Image folders: the out-of-distribution datasets users download themselves (DomainNet, Food-101, EuroSAT, ...).

Three layouts are read, and told apart automatically:

* ``root/<class>/*.jpg`` (one sub-folder per class; class names are the sorted folder names). When
  no sub-folder holds images but exactly one holds class folders (``food-101/images/``,
  ``EuroSAT/2750/``), that one is used.
* ``root/<superclass>/<class>/*.png`` (``nested``: Omniglot's released layout, alphabets then characters):
  classes are ``<superclass>/<class>``, and their folders are superclasses for the bilevel sampler.
* Meta-Album's ``root/labels.csv`` (columns FILE_NAME, CATEGORY and maybe SUPER_CATEGORY) with
  the files under ``root/images/``. A labels.csv also suits datasets shipped flat with their
  labels in a table (Oxford Pets, Stanford Cars, ISIC, ChestX).

Every class goes to the TEST split unless ``splits`` says otherwise, since these are
evaluation-only sets. The file list is cached as JSON under ``cache_dir()/index`` and checked
against the folders' modification times, so a large folder is listed once, not every run
(listing and the cache live in ``folder_index``). ``exclude`` leaves listed files out, e.g.
ImageNet-train images that duplicate another source's test images, as Meta-Dataset's conversion does.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from episodes.readers.base import Source
from episodes.readers.folder_index import (  # re-exported: this module was their home
    IMAGE_EXTENSIONS,
    INDEX_VERSION,
    LAYOUTS,
    ClassFiles,
    FolderSourceError,
    index_path,
    load_or_scan,
    read_exclusion,
    write_index,
)
from episodes.spec import DatasetSpec, parse_split
from episodes.split import Split

__all__ = ["IMAGE_EXTENSIONS", "INDEX_VERSION", "NAMED_FOLDERS", "RESIZE_MODES", "FolderSourceError",
           "ImageFolderSource", "decode_image", "index_path", "open_named_folder", "within_class_order", "write_index"]

log = logging.getLogger(__name__)

ORDER_SEED = 1729  # fixes the within-class shuffle; changing it changes every folder episode
RESIZE_MODES = ("squash", "crop")
_SPLIT_ORDER = (Split.TRAIN, Split.VALID, Split.TEST)


# -- decoding ----------------------------------------------------------------------------------
def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):  # 16-bit medical/greyscale PNG and TIFF: scale, don't clip
        grey = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(
    data: str | os.PathLike[str] | bytes | IO[bytes],
    size: int | None,
    *,
    resize: str = "squash",
    what: str = "image",
) -> np.ndarray:
    """Decode one image to uint8 RGB ``[H, W, 3]``, resized to ``size`` x ``size`` unless ``size`` is None.

    ``resize="squash"`` resizes to the square directly, ignoring the aspect ratio, as Meta-Dataset
    does; ``"crop"`` scales the shorter side to ``size`` and centre-crops. Both are bilinear
    (Pillow's, so antialiased when shrinking). ``what`` names the image in the error message.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f'Resize mode "{resize}" is unknown; use "squash" or "crop".')
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with Image.open(stream) as img:
            if size is not None and img.format == "JPEG":
                img.draft("RGB", (size, size))  # JPEG decodes at 1/2..1/8 scale when that still covers `size`
            rgb = _to_rgb(img)
            if size is not None and rgb.size != (size, size):
                if resize == "squash":
                    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                else:
                    rgb = ImageOps.fit(rgb, (size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        why = "not a known image format" if isinstance(e, UnidentifiedImageError) else e
        raise FolderSourceError(f"{what} cannot be decoded ({why}); replace or delete it and run again.") from None


def within_class_order(class_key: str, n: int) -> np.ndarray:
    """The fixed shuffle of a class's sorted items (keyed by class name, so classes don't affect each other).

    Sorted-then-shuffled keeps neighbouring frames or near-duplicates (Meta-Dataset issue #54)
    from lining up, and is the same on every machine and run.
    """
    return np.random.default_rng([ORDER_SEED, zlib.crc32(class_key.encode("utf-8"))]).permutation(n)


# -- splits and spec ---------------------------------------------------------------------------
def _read_splits(splits: Mapping[str, Sequence[str]] | str | os.PathLike[str] | None) -> dict[str, Split] | None:
    """Class name -> split, from ``{"train": [...], "valid": [...], "test": [...]}`` or a JSON file of that form."""
    if splits is None:
        return None
    if isinstance(splits, (str, os.PathLike)):
        path = Path(splits)
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
        except OSError:
            raise FolderSourceError(f"Split file {path} cannot be read; check the path.") from None
        except ValueError as e:
            raise FolderSourceError(f"Split file {path} is not valid JSON ({e}).") from None
    if not isinstance(splits, Mapping):
        raise FolderSourceError("splits must map split names (train, valid, test) to lists of class names.")
    out: dict[str, Split] = {}
    for key, names in splits.items():
        split = parse_split(key)
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise FolderSourceError(f'splits["{key}"] must be a list of class names.')
        for class_name in map(str, names):
            if out.setdefault(class_name, split) is not split:
                raise FolderSourceError(f'splits puts class "{class_name}" in two splits; keep it in one.')
    return out


def _assign(classes: Sequence[ClassFiles], split_of: Mapping[str, Split], where: str) -> dict[str, Split]:
    """Class name -> split, where ``split_of`` names classes or whole superclasses (a class's own entry wins)."""
    supers = {c.superclass for c in classes if c.superclass is not None}
    unknown = sorted(set(split_of) - {c.name for c in classes} - supers)
    if unknown:
        raise FolderSourceError(f'{where}: splits names class "{unknown[0]}", which is not in the data (neither a '
                                "class nor a superclass); fix the name or remove it.")
    assigned = {c.name: split_of.get(c.name, split_of.get(str(c.superclass))) for c in classes}
    unlisted = [name for name, split in assigned.items() if split is None]
    if unlisted:
        raise FolderSourceError(f'{where}: class "{unlisted[0]}" is in no split ({len(unlisted)} unassigned); '
                                "list every class (or its superclass) in splits.")
    return assigned  # type: ignore[return-value]


def _build_spec(
    name: str, classes: Sequence[ClassFiles], split_of: Mapping[str, Split], superclasses: bool, where: str
) -> tuple[list[ClassFiles], DatasetSpec]:
    """Order classes Meta-Dataset style (by split, then superclass, then name) and describe them."""
    if superclasses:
        home: dict[str, Split] = {}
        for c in classes:
            if c.superclass is None:
                raise FolderSourceError(f'{where}: superclasses=True but class "{c.name}" has no super-category; '
                                        "fill the SUPER_CATEGORY column or set superclasses=False.")
            if home.setdefault(c.superclass, split_of[c.name]) is not split_of[c.name]:
                raise FolderSourceError(f'{where}: super-category "{c.superclass}" spans two splits; '
                                        "keep all of its classes in one split.")
    ordered = sorted(classes, key=lambda c: (_SPLIT_ORDER.index(split_of[c.name]),
                                              (c.superclass or "") if superclasses else "", c.name))
    extra: dict[str, Any] = {}
    super_kwargs: dict[str, Any] = {}
    if superclasses:
        supers = list(dict.fromkeys(str(c.superclass) for c in ordered))
        super_kwargs = {
            "superclasses_per_split": {s: len({c.superclass for c in ordered if split_of[c.name] is s})
                                       for s in _SPLIT_ORDER},
            "classes_per_superclass": {i: sum(c.superclass == s for c in ordered) for i, s in enumerate(supers)},
        }
        extra["superclass_names"] = {str(i): s for i, s in enumerate(supers)}
    spec = DatasetSpec(
        name=name,
        classes_per_split={s: sum(split_of[c.name] is s for c in ordered) for s in _SPLIT_ORDER},
        images_per_class={i: len(c.files) for i, c in enumerate(ordered)},
        class_names={i: c.name for i, c in enumerate(ordered)},
        path=where,
        extra=extra,
        **super_kwargs,
    )
    return ordered, spec


# -- the source --------------------------------------------------------------------------------
class ImageFolderSource(Source):
    """A folder of images, one class per sub-folder or a Meta-Album labels.csv; every class in TEST by default.

    Args:
        root: the folder (``root/<class>/*.jpg``, ``root/<superclass>/<class>/*.png``, or ``root/labels.csv`` +
            ``root/images/``).
        name: source name in episodes and results; default ``"folder"``.
        domain: ``"ood"`` (held out) or ``"id"``.
        split: the split every class goes to when ``splits`` is not given.
        image_size: decoded images are ``image_size`` squares; None keeps the native size, which
            must then be the same for every image (Meta-Album's are all 128 x 128).
        layout: ``"auto"``, ``"folders"``, ``"nested"`` or ``"meta_album"``.
        splits: ``{"train": [class or superclass names], "valid": [...], "test": [...]}`` or a JSON file of it;
            a superclass name assigns all its classes (``nested`` classes are named ``<superclass>/<class>``).
        superclasses: use the superclasses (the nested layout's folders, Meta-Album's SUPER_CATEGORY): the
            sampler then draws all ways of an episode from one of them, as with Omniglot alphabets. Default:
            on for the nested layout, off otherwise.
        resize: ``"squash"`` (Meta-Dataset's direct resize) or ``"crop"`` (shorter side, centre crop).
        exclude: files to leave out, e.g. images duplicating another source's test images (Meta-Dataset's
            ``ImageNet_CUBirds_duplicates.txt`` works as is): a text file (looked up as given, then under
            ``root``) with one entry per line and ``#`` starting a comment, or a list of entries. An entry
            with a ``/`` is a path relative to the class folders' parent (``images/`` for Meta-Album) or to
            ``root``; one without is a file name, matched in every class. Excluded files never enter the
            spec or the index; entries that match nothing are reported in one warning.

    Attributes:
        excluded: how many files ``exclude`` left out.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        *,
        name: str | None = None,
        domain: str = "ood",
        split: Split | str = Split.TEST,
        image_size: int | None = 128,
        layout: str = "auto",
        splits: Mapping[str, Sequence[str]] | str | os.PathLike[str] | None = None,
        superclasses: bool | None = None,
        resize: str = "squash",
        exclude: str | os.PathLike[str] | Sequence[str] | None = None,
    ) -> None:
        self.name = name or "folder"
        if root is None:
            raise FolderSourceError(f'Source "{self.name}" needs the image folder: set data.root=DIR '
                                    "(DIR/<class>/*.jpg or DIR/labels.csv + DIR/images/).")
        if domain not in ("id", "ood"):
            raise ValueError(f'Source "{self.name}": domain "{domain}" is unknown; use "id" or "ood".')
        if resize not in RESIZE_MODES or (image_size is not None and image_size < 1):
            raise ValueError(f'Source "{self.name}": need resize in {RESIZE_MODES} and image_size >= 1 or None.')
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"Image folder {self.root} does not exist; "
                                    "download the data there or fix the path.")
        self.domain, self.image_size, self.resize = domain, image_size, resize
        if layout not in LAYOUTS:
            raise ValueError(f'Folder layout "{layout}" is unknown; use one of {", ".join(LAYOUTS)}.')
        self._base, classes, self.excluded, self.layout = load_or_scan(self.root, layout,
                                                                      read_exclusion(exclude, self.root))
        if not classes:
            raise FolderSourceError(f"Folder {self.root} lists no images; add images or labels.csv rows.")
        split_of = _read_splits(splits)
        if split_of is None:
            split_of = dict.fromkeys((c.name for c in classes), parse_split(split))
        else:
            split_of = _assign(classes, split_of, str(self.root))
        if superclasses is None:
            superclasses = self.layout == "nested"
        ordered, self.spec = _build_spec(self.name, classes, split_of, superclasses, str(self.root))
        self._files = [tuple(c.files[i] for i in within_class_order(c.name, len(c.files))) for c in ordered]
        self._native = (image_size, image_size) if image_size is not None else self._probe_size()

    def _probe_size(self) -> tuple[int, int]:
        path = self._base / self._files[0][0]
        try:
            with Image.open(path) as img:
                return img.height, img.width
        except OSError as e:
            why = "not a known image format" if isinstance(e, UnidentifiedImageError) else e
            raise FolderSourceError(f"Image {path} cannot be decoded ({why}); "
                                    "replace or delete it and run again.") from None

    @property
    def native_size(self) -> tuple[int, int]:
        return self._native

    def path_of(self, class_id: int, index: int) -> Path:
        """The file behind image ``index`` of ``class_id`` (after the fixed within-class shuffle)."""
        self._check_read(class_id, [index])
        return self._base / self._files[class_id][index]

    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        idx = self._check_read(class_id, indices)
        height, width = self._native
        out = np.empty((len(idx), height, width, 3), dtype=np.uint8)
        for k, i in enumerate(idx.tolist()):
            path = self._base / self._files[class_id][i]
            image = decode_image(path, self.image_size, resize=self.resize, what=f"Image {path}")
            if image.shape[:2] != (height, width):
                raise FolderSourceError(f"Image {path} is {image.shape[1]}x{image.shape[0]}, not {width}x{height} "
                                        "like the rest; pass image_size=N to resize every image.")
            out[k] = image
        return out


# -- named out-of-distribution folders under data.root ---------------------------------------------
NAMED_FOLDERS: dict[str, tuple[str, str]] = {  # name -> (title, what <data.root>/<name>/ holds)
    "sketch": ("DomainNet Sketch", "<class>/*.jpg, as DomainNet's sketch.zip unpacks"),
    "clipart": ("DomainNet Clipart", "<class>/*.jpg, as DomainNet's clipart.zip unpacks"),
    "food101": ("Food-101", "<class>/*.jpg, or food-101/images/<class>/ as the archive unpacks"),
    "pets": ("Oxford-IIIT Pets", "one folder per breed, or labels.csv + images/ (the download is flat)"),
    "cars": ("Stanford Cars", "one folder per car model, or labels.csv + images/"),
    "cropdisease": ("CropDisease (PlantVillage)", "one folder per crop-disease class"),
    "eurosat": ("EuroSAT (RGB)", "<class>/*.jpg, or 2750/<class>/ as the archive unpacks"),
    "isic": ("ISIC 2018 skin lesions", "labels.csv + images/ made from the ground-truth CSV, or class folders"),
    "chestx": ("ChestX-ray14", "labels.csv + images/ for CDFSL's 7 single-label classes, or class folders"),
}


def open_named_folder(name: str, root: str | os.PathLike[str] | None, **options: Any) -> ImageFolderSource:
    """Open ``<root>/<name>/`` for one of ``NAMED_FOLDERS``, or say exactly where the data should be."""
    title, hint = NAMED_FOLDERS[name]
    if root is None:
        raise FolderSourceError(f'Source "{name}" ({title}) needs a data root: set data.root=DIR and put the '
                                f"images in DIR/{name}/ ({hint}).")
    folder = Path(root).expanduser() / name
    if not folder.is_dir():
        raise FileNotFoundError(f'Source "{name}" ({title}) expects its images in {folder}, which does not exist; '
                                f"download the dataset and put it there ({hint}).")
    return ImageFolderSource(folder, name=name, **options)


def _named_factory(name: str) -> Any:
    def factory(root: str | os.PathLike[str] | None = None, **options: Any) -> ImageFolderSource:
        return open_named_folder(name, root, **options)

    title, hint = NAMED_FOLDERS[name]
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{title}, out-of-distribution, read from <data.root>/{name}/ ({hint})."
    return factory


sketch = _named_factory("sketch")
clipart = _named_factory("clipart")
food101 = _named_factory("food101")
pets = _named_factory("pets")
cars = _named_factory("cars")
cropdisease = _named_factory("cropdisease")
eurosat = _named_factory("eurosat")
isic = _named_factory("isic")
chestx = _named_factory("chestx")
