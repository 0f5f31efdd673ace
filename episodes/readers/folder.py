"""Image folders: the out-of-distribution datasets users download themselves (DomainNet, Food-101, EuroSAT, ...).

Two layouts are read, and told apart automatically:

* ``root/<class>/*.jpg`` (one sub-folder per class; class names are the sorted folder names). When
  no sub-folder holds images but exactly one holds class folders (``food-101/images/``,
  ``EuroSAT/2750/``), that one is used.
* Meta-Album's ``root/labels.csv`` (columns FILE_NAME, CATEGORY and maybe SUPER_CATEGORY) with
  the files under ``root/images/``. A labels.csv also suits datasets shipped flat with their
  labels in a table (Oxford Pets, Stanford Cars, ISIC, ChestX).

Every class goes to the TEST split unless ``splits`` says otherwise, since these are
evaluation-only sets. The file list is cached as JSON under ``cache_dir()/index`` and checked
against the folders' modification times, so a large folder is listed once, not every run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from episodes.episode import Split
from episodes.readers.base import Source, cache_dir
from episodes.spec import DatasetSpec, parse_split

__all__ = ["IMAGE_EXTENSIONS", "NAMED_FOLDERS", "FolderSourceError", "ImageFolderSource", "decode_image",
           "index_path", "open_named_folder", "within_class_order", "write_index"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
ORDER_SEED = 1729  # fixes the within-class shuffle; changing it changes every folder episode
INDEX_VERSION = 1
RESIZE_MODES = ("squash", "crop")
_LAYOUTS = ("auto", "folders", "meta_album")
_SPLIT_ORDER = (Split.TRAIN, Split.VALID, Split.TEST)


class FolderSourceError(ValueError):
    """Bad or missing data in a folder source; the message names the path and what to do."""


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
        raise FolderSourceError(f"{what} cannot be decoded ({e}); replace or delete it and run again.") from None


def within_class_order(class_key: str, n: int) -> np.ndarray:
    """The fixed shuffle of a class's sorted items (keyed by class name, so classes don't affect each other).

    Sorted-then-shuffled keeps neighbouring frames or near-duplicates (Meta-Dataset issue #54)
    from lining up, and is the same on every machine and run.
    """
    return np.random.default_rng([ORDER_SEED, zlib.crc32(class_key.encode("utf-8"))]).permutation(n)


# -- index cache (shared with the tfds reader) ---------------------------------------------------
def index_path(kind: str, key: str) -> Path:
    """Where the index of one folder or dataset is cached (one file per location, refreshed in place)."""
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
    return cache_dir() / "index" / f"{kind}-{digest}.json"


def write_index(path: Path, stamp: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
    """Write an index atomically (temp file, then rename); a failure only costs a rescan next time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"stamp": stamp, **payload}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("Could not cache the index at %s (%s); the data will be listed again next time.", path, e)
    finally:
        tmp.unlink(missing_ok=True)


# -- scanning ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Class:
    name: str
    files: tuple[str, ...]  # sorted, relative to the image base folder
    superclass: str | None = None


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_images(path: Path) -> bool:
    return any(e.is_file() and _is_image(e.name) for e in os.scandir(path))


def _find_class_root(root: Path, max_depth: int = 3) -> Path:
    """``root``, or the folder below it that holds the class folders, reached through single
    candidates (``food-101/images/`` beside ``food-101/meta/``, ``EuroSAT/2750/``)."""
    current = root
    for _ in range(max_depth + 1):
        subdirs = _subdirs(current)
        if any(_has_images(d) for d in subdirs):
            if current != root:
                log.info("Folder %s: reading the class folders in %s", root, current)
            return current
        deeper = [d for d in subdirs if _subdirs(d)]
        if len(deeper) != 1:
            break
        current = deeper[0]
    raise FolderSourceError(
        f"Folder {root} has no class sub-folders with images; put the images in {root}/<class name>/ "
        "or add a Meta-Album labels.csv with an images/ folder."
    )


def _scan_folders(root: Path) -> tuple[Path, list[_Class]]:
    base = _find_class_root(root)
    classes = []
    for d in _subdirs(base):
        files = sorted(f"{d.name}/{e.name}" for e in os.scandir(d) if e.is_file() and _is_image(e.name))
        if not files:
            raise FolderSourceError(
                f"Class folder {d} has no images (.jpg, .png, ...); add images or remove the folder."
            )
        classes.append(_Class(d.name, tuple(files)))
    return base, classes


def _scan_meta_album(root: Path) -> tuple[Path, list[_Class]]:
    labels, base = root / "labels.csv", root / "images"
    file_col, cat_col, super_col = "FILE_NAME", "CATEGORY", "SUPER_CATEGORY"
    if not labels.is_file():
        raise FolderSourceError(f"{labels} does not exist; the meta_album layout needs it (or use layout=folders).")
    with open(labels, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (file_col, cat_col) if c not in (reader.fieldnames or [])]
        if missing:
            raise FolderSourceError(f"{labels} has no {missing[0]} column; it needs {file_col} and {cat_col} "
                                    f"(and optionally {super_col}).")
        rows = [(r[file_col], r[cat_col], r.get(super_col) or None) for r in reader]
    if not base.is_dir():
        raise FolderSourceError(f"{labels} needs the images in {base}, which does not exist; unpack them there.")
    present = {e.name for e in os.scandir(base)}
    absent = [name for name, _, _ in rows if name.split("/")[0] not in present]
    if absent:
        raise FolderSourceError(f"{labels} names {len(absent)} file(s) missing from {base} (first: {absent[0]}); "
                                "restore them or delete their rows.")
    files: dict[str, list[str]] = {}
    supers: dict[str, str | None] = {}
    for name, category, superclass in rows:
        files.setdefault(category, []).append(name)
        if supers.setdefault(category, superclass) != superclass:
            raise FolderSourceError(f'{labels}: category "{category}" has two super-categories; give it one.')
    classes = [_Class(c, tuple(sorted(files[c])), supers[c]) for c in sorted(files)]
    return base, classes


def _detect_layout(root: Path, layout: str) -> str:
    if layout not in _LAYOUTS:
        raise ValueError(f'Folder layout "{layout}" is unknown; use one of {", ".join(_LAYOUTS)}.')
    if layout != "auto":
        return layout
    return "meta_album" if (root / "labels.csv").is_file() else "folders"


def _stamp(root: Path, layout: str, watched: Sequence[str]) -> dict[str, Any]:
    """What the cached index depends on: the folders' (and labels.csv's) modification times."""
    times = {rel: os.stat(root / rel).st_mtime_ns for rel in watched}
    return {"version": INDEX_VERSION, "root": str(root), "layout": layout, "mtimes": times,
            "extensions": sorted(IMAGE_EXTENSIONS)}


def _watched(root: Path, base: Path, layout: str, classes: Sequence[_Class]) -> list[str]:
    if layout == "meta_album":
        return [".", "labels.csv", "images"]
    prefix = os.path.relpath(base, root)
    parts = [] if prefix == "." else Path(prefix).parts
    between = [os.path.join(*parts[: k + 1]) for k in range(len(parts))]  # every folder down to the classes
    return [".", *between, *(os.path.normpath(os.path.join(prefix, c.name)) for c in classes)]


def _load_or_scan(root: Path, layout: str) -> tuple[Path, list[_Class]]:
    """The class list of ``root``, from the cached index when nothing has changed since it was written."""
    path = index_path("folder", f"{root}|{layout}")
    try:  # only stat() calls here: a valid index costs no directory listing
        cached = json.loads(path.read_text(encoding="utf-8"))
        fresh = cached["stamp"] == _stamp(root, layout, list(cached["stamp"]["mtimes"]))
    except (OSError, ValueError, KeyError, TypeError):
        fresh = False
    if fresh:
        classes = [_Class(c["name"], tuple(c["files"]), c.get("superclass")) for c in cached["classes"]]
        log.debug("Folder %s: %d classes from the cached index %s", root, len(classes), path)
        return root / cached["base"], classes
    base, classes = _scan_meta_album(root) if layout == "meta_album" else _scan_folders(root)
    payload = {"base": os.path.relpath(base, root),
               "classes": [{"name": c.name, "files": list(c.files), "superclass": c.superclass} for c in classes]}
    write_index(path, _stamp(root, layout, _watched(root, base, layout, classes)), payload)
    log.info("Folder %s: indexed %d classes, %d images", root, len(classes), sum(len(c.files) for c in classes))
    return base, classes


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


def _check_assignment(classes: Sequence[_Class], split_of: Mapping[str, Split], where: str) -> None:
    unknown = sorted(set(split_of) - {c.name for c in classes})
    if unknown:
        raise FolderSourceError(f'{where}: splits names class "{unknown[0]}", which is not in the data; '
                                "fix the name or remove it.")
    unlisted = [c.name for c in classes if c.name not in split_of]
    if unlisted:
        raise FolderSourceError(f'{where}: class "{unlisted[0]}" is in no split ({len(unlisted)} unassigned); '
                                "list every class in splits.")


def _build_spec(
    name: str, classes: Sequence[_Class], split_of: Mapping[str, Split], superclasses: bool, where: str
) -> tuple[list[_Class], DatasetSpec]:
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
        root: the folder (``root/<class>/*.jpg``, or ``root/labels.csv`` + ``root/images/``).
        name: source name in episodes and results; default ``"folder"``.
        domain: ``"ood"`` (held out) or ``"id"``.
        split: the split every class goes to when ``splits`` is not given.
        image_size: decoded images are ``image_size`` squares; None keeps the native size, which
            must then be the same for every image (Meta-Album's are all 128 x 128).
        layout: ``"auto"``, ``"folders"`` or ``"meta_album"``.
        splits: ``{"train": [class names], "valid": [...], "test": [...]}`` or a JSON file of it.
        superclasses: use Meta-Album's SUPER_CATEGORY as superclasses (the sampler then draws all
            ways of an episode from one super-category, as with Omniglot alphabets).
        resize: ``"squash"`` (Meta-Dataset's direct resize) or ``"crop"`` (shorter side, centre crop).
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
        superclasses: bool = False,
        resize: str = "squash",
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
        self.layout = _detect_layout(self.root, layout)
        self._base, classes = _load_or_scan(self.root, self.layout)
        if not classes:
            raise FolderSourceError(f"Folder {self.root} lists no images; add images or labels.csv rows.")
        split_of = _read_splits(splits)
        if split_of is None:
            split_of = dict.fromkeys((c.name for c in classes), parse_split(split))
        else:
            _check_assignment(classes, split_of, str(self.root))
        ordered, self.spec = _build_spec(self.name, classes, split_of, superclasses, str(self.root))
        self._files = [tuple(c.files[i] for i in within_class_order(c.name, len(c.files))) for c in ordered]
        self._native = (image_size, image_size) if image_size is not None else self._probe_size()

    def _probe_size(self) -> tuple[int, int]:
        path = self._base / self._files[0][0]
        try:
            with Image.open(path) as img:
                return img.height, img.width
        except OSError as e:
            raise FolderSourceError(f"Image {path} cannot be decoded ({e}); "
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
