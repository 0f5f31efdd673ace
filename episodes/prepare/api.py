"""``prepare``: a Meta-Dataset source's raw downloads in, metabench's packed HDF5 cache out, without TensorFlow.

The cache is written as ``<out>/<source>.h5``, where the named Meta-Dataset sources look for it (a data root
holding ``omniglot.h5`` serves ``omniglot`` with no TFRecords at all). Its spec (class names, splits, image
counts) is the one Meta-Dataset's ``dataset_to_records.py`` writes for the same images.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from episodes.prepare.inputs import InputTree, PrepareError
from episodes.prepare.source import PreparedSource
from episodes.readers.tfrecord import DEFAULT_IMAGE_SIZE
from episodes.spec import DatasetSpec
from episodes.split import Split

__all__ = ["PREPARERS", "PrepareSummary", "prepare", "prepared_source"]

log = logging.getLogger(__name__)

# Source name -> its converter, imported on first use.
PREPARERS: dict[str, str] = {
    "omniglot": "episodes.prepare.folders:omniglot",
    "aircraft": "episodes.prepare.annotated:aircraft",
    "cu_birds": "episodes.prepare.folders:cu_birds",
    "dtd": "episodes.prepare.folders:dtd",
    "quickdraw": "episodes.prepare.quickdraw:quickdraw",
    "fungi": "episodes.prepare.annotated:fungi",
    "vgg_flower": "episodes.prepare.annotated:vgg_flower",
    "traffic_sign": "episodes.prepare.folders:traffic_sign",
    "mscoco": "episodes.prepare.mscoco:mscoco",
    "ilsvrc_2012": "episodes.prepare.ilsvrc:ilsvrc_2012",
}
_SPLITS = (Split.TRAIN, Split.VALID, Split.TEST)


@dataclass(frozen=True)
class PrepareSummary(os.PathLike):
    """What ``prepare`` wrote (or found already written); ``os.fspath(summary)`` is the ``.h5`` file.

    ``classes`` and ``images`` count each split (keys "train", "valid", "test"); ``missing`` names the upstream
    classes the inputs lacked (only with ``allow_missing``); ``skipped`` is True when a finished file was kept.
    """

    source: str
    path: Path
    image_size: int
    store: str
    classes: dict[str, int]
    images: dict[str, int]
    missing: tuple[str, ...] = ()
    skipped: bool = False
    notes: tuple[str, ...] = ()

    def __fspath__(self) -> str:
        return str(self.path)

    @classmethod
    def of(cls, spec: DatasetSpec, path: Path, image_size: int, store: str, **kw: object) -> PrepareSummary:
        classes = {s.value: spec.classes_per_split[s] for s in _SPLITS}
        images = {s.value: sum(spec.images_per_class[c] for c in spec.class_ids(s)) for s in _SPLITS}
        return cls(spec.name, path, image_size, store, classes, images, **kw)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (``path`` as a string), for a ``--json`` output."""
        return {"source": self.source, "path": str(self.path), "image_size": self.image_size, "store": self.store,
                "classes": dict(self.classes), "images": dict(self.images), "missing": list(self.missing),
                "skipped": self.skipped, "notes": list(self.notes)}

    def describe(self) -> str:
        """A few lines for the console: where, what size, classes and images per split."""
        head = f"{self.source} -> {self.path} ({self.image_size} px, {self.store})"
        if self.skipped:
            head += ", already prepared: kept"
        rows = [head, f"  {'split':<6}{'classes':>9}{'images':>11}"]
        for split in ("train", "valid", "test"):
            rows.append(f"  {split:<6}{self.classes[split]:>9}{self.images[split]:>11}")
        rows.append(f"  {'total':<6}{sum(self.classes.values()):>9}{sum(self.images.values()):>11}")
        if self.missing:
            rows.append(f"  {len(self.missing)} classes Meta-Dataset lists were not in the inputs (first: "
                        f"{self.missing[0]})")
        rows.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(rows)


def _converter(source_name: str) -> object:
    if source_name not in PREPARERS:
        close = difflib.get_close_matches(source_name, PREPARERS, n=1)
        hint = f'did you mean "{close[0]}"? ' if close else ""
        raise PrepareError(f'Unknown Meta-Dataset source "{source_name}"; {hint}prepare knows '
                           f"{', '.join(PREPARERS)}.")
    module, _, attr = PREPARERS[source_name].partition(":")
    return getattr(importlib.import_module(module), attr)


def prepared_source(
    source_name: str,
    inputs: Sequence[str | os.PathLike[str]],
    *,
    image_size: int | None = None,
    allow_missing: bool = False,
    shuffle: bool = True,
    reencode_jpeg: bool = False,
    work_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> PreparedSource:
    """The ``Source`` of ``source_name`` read straight from its raw ``inputs``; close it when done (``with``).

    ``image_size`` defaults to the side all images share (Omniglot 105, QuickDraw 28), else 128 as the TFRecord
    reader; ``work_dir`` receives compressed tars unpacked for random access (default: a temporary folder).
    """
    build = _converter(source_name)
    if isinstance(inputs, (str, os.PathLike)):  # one path, not a sequence of characters
        inputs = [inputs]
    own = work_dir is None
    work = Path(tempfile.mkdtemp(prefix=f"metabench-prepare-{source_name}-")) if own else Path(str(work_dir))
    tree = None
    try:
        tree = InputTree(inputs, work_dir=work, expand_tars=source_name == "ilsvrc_2012", progress=progress)
        plan = build(tree, allow_missing=allow_missing)  # type: ignore[operator]
        size = int(image_size or plan.native or DEFAULT_IMAGE_SIZE)
        return PreparedSource(source_name, plan, tree, image_size=size, shuffle=shuffle, reencode_jpeg=reencode_jpeg)
    except BaseException:
        if tree is not None:
            tree.close()
        if own:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _kept(target: Path, source_name: str, image_size: int | None, store: str, pixels: str) -> PrepareSummary:
    """The summary of a finished ``target`` made with these settings; an error when it was made otherwise."""
    from episodes.readers.hdf5 import PackedHDF5, PackedHDF5Error
    from episodes.spec import SpecError

    try:
        packed = PackedHDF5(target)
    except (PackedHDF5Error, SpecError, OSError) as e:
        raise PrepareError(f"{target} exists but is not a readable packed source ({e}); delete it or pass "
                           "overwrite=True.") from None
    size = packed.native_size[0]
    made = (packed.spec.extra.get("prepared") or {}).get("pixels", "converted records")
    same = (packed.stored_name == source_name and packed.store == store and image_size in (None, size)
            and made == pixels)
    packed.close()
    if not same:
        raise PrepareError(f"{target} already holds {packed.stored_name} at {size} px ({packed.store}, {made}), "
                           "not what was asked; delete it or pass overwrite=True.")
    return PrepareSummary.of(packed.spec, target, size, store, skipped=True)


def prepare(
    source_name: str,
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    store: str = "uint8",
    progress: bool = True,
    allow_missing: bool = False,
    overwrite: bool = False,
    reencode_jpeg: bool = False,
) -> PrepareSummary:
    """Write Meta-Dataset source ``source_name`` from its raw downloads ``inputs`` to ``<out>/<source_name>.h5``.

    Args:
        inputs: the downloads as published (archives, unpacked folders, loose annotation files), in any order.
        out: the folder to write into (a data root: the named source then reads the file).
        image_size: square side to store; default the side all images share (Omniglot 105, QuickDraw 28), else
            128, the TFRecord reader's size.
        store: "uint8" (decoded, fastest to read) or "encoded" (PNG bytes, smaller).
        progress: show progress bars (unpacking a compressed tar, converting classes).
        allow_missing: prepare the classes present when the inputs lack some Meta-Dataset lists (the spec then
            differs from upstream's); by default that is an error naming the first missing class.
        overwrite: rebuild ``<out>/<source_name>.h5`` even when a finished one with these settings exists (by
            default it is kept, so an interrupted batch of sources resumes where it stopped).
        reencode_jpeg: give the images upstream re-encodes (PNG, PPM, crops, inverted, QuickDraw) the same JPEG
            round trip (PIL's quality 75), so pixels match a cache converted from upstream's TFRecords; by default
            they are stored lossless.

    Raises:
        PrepareError: (a ValueError) an unknown source, wrong or incomplete inputs, a file that cannot be decoded;
            ``InputNotFound`` (also a FileNotFoundError) when an input or a file the layout needs is missing.
            Nothing is left in ``out`` but what was there before.
    """
    from episodes.convert import convert_source

    _converter(source_name)
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise PrepareError(f"{folder} is a file; pass the folder to write {source_name}.h5 into.")
    target = folder / f"{source_name}.h5"
    if target.exists() and not overwrite:
        return _kept(target, source_name, image_size, store, "upstream_jpeg" if reencode_jpeg else "lossless")
    created = not folder.exists()
    work = folder / f".{source_name}.prepare-{os.getpid()}"
    try:
        with prepared_source(source_name, inputs, image_size=image_size, allow_missing=allow_missing,
                             reencode_jpeg=reencode_jpeg, work_dir=work, progress=progress) as source:
            for note in source.plan.notes:
                log.warning("%s: %s", source_name, note)
            convert_source(source, target, image_size=source.image_size, store=store, progress=progress)
            summary = PrepareSummary.of(source.spec, target, source.image_size, store,
                                        missing=tuple(str(m) for m in source.plan.missing),
                                        notes=tuple(source.plan.notes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return summary
