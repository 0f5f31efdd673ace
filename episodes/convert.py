"""Convert any source into one packed HDF5 file (``episodes.readers.hdf5.PackedHDF5``).

Decoding once and storing uint8 makes episode loading 12-19x faster than decoding per episode
(pipeline notes). The file keeps the source's within-class order, so a cached source yields
exactly the episodes of the source it came from. Writing goes to a temporary file in the
target folder, renamed only when complete: an error or Ctrl-C leaves nothing half-written.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from episodes.atomic import atomic_path
from episodes.loader import resize_uint8
from episodes.readers.base import Source
from episodes.readers.hdf5 import FORMAT, FORMAT_VERSION, STORES

__all__ = ["convert_configured", "convert_named", "convert_source"]

log = logging.getLogger(__name__)

_BLOCK = 256  # images read, resized and written at once: bounds memory for 1,300-image classes
COMPRESSIONS = (None, "lzf", "gzip")


def convert_source(
    source: Source,
    out_path: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    store: str = "uint8",
    compression: str | None = None,
    progress: bool = True,
) -> Path:
    """Write ``source`` to ``out_path`` as one packed HDF5 file and return its path.

    Args:
        image_size: square side to store; default the source's native size.
        store: "uint8" (decoded, fastest to read) or "encoded" (PNG/JPEG bytes: smaller, decoded
            per read; a TFRecord source's original bytes are kept as they are).
        compression: None (default: reads are fastest) or "lzf"/"gzip" for uint8 stores.
        progress: show a progress bar over classes.
    """
    if store not in STORES:
        raise ValueError(f'store="{store}" is unknown; use "uint8" or "encoded".')
    if compression not in COMPRESSIONS:
        raise ValueError(f'compression="{compression}" is unknown; use none, "lzf" or "gzip".')
    size = int(image_size or source.native_size[0])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with atomic_path(out) as tmp:  # also on Ctrl-C: never a partial file under the final name
        with h5py.File(tmp, "w") as f:
            _write_attrs(f, source, store, size)
            counts = [source.spec.images_per_class[c] for c in range(source.spec.num_classes)]
            f.create_dataset("offsets", data=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
            writer = (_EncodedWriter if store == "encoded" else _Uint8Writer)(f, sum(counts), size, compression)
            for class_id in _classes(source, progress):
                for first in range(0, counts[class_id], _BLOCK):
                    rows = range(first, min(first + _BLOCK, counts[class_id]))
                    writer.add(source, class_id, rows, size)
            f.attrs["channels"] = writer.channels
    log.info('converted source "%s" (%d images) to %s in %.1f s', source.name, sum(counts), out,
             time.perf_counter() - start)
    return out


def _write_attrs(f: h5py.File, source: Source, store: str, size: int) -> None:
    f.attrs.update({
        "format": FORMAT, "format_version": FORMAT_VERSION, "source": source.name, "domain": source.domain,
        "store": store, "image_size": size, "spec": source.spec.to_json(), "reader": type(source).__name__,
        "metabench_version": _version(),
    })


def _version() -> str:
    """The installed distribution's version (the data layer does not import the core package for it)."""
    try:
        return version("metabench")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _classes(source: Source, progress: bool) -> Iterator[int]:
    ids = range(source.spec.num_classes)
    if not progress:
        return iter(ids)
    from tqdm.auto import tqdm

    return iter(tqdm(ids, desc=f"convert {source.name}", unit="class"))


def _square(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 [k, H, W, 3] to ``size`` with the loader's resize, so both paths agree."""
    if images.shape[1:3] == (size, size):
        return images
    pixels = resize_uint8(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), size)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def _is_grey(images: np.ndarray) -> bool:
    return bool((images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all())


class _Uint8Writer:
    """Appends decoded images; stores one channel until the first colour image appears.

    Colour sources reveal themselves in the first class, so the one-off widening copy is small;
    greyscale sources (Omniglot, QuickDraw) are stored at a third of the size.
    """

    def __init__(self, f: h5py.File, n: int, size: int, compression: str | None) -> None:
        self.f, self.n, self.size, self.compression = f, n, size, compression
        self.channels = 0  # decided by the first block
        self.written = 0

    def _create(self, name: str, channels: int) -> h5py.Dataset:
        shape = (self.n, self.size, self.size, channels)
        return self.f.create_dataset(name, shape=shape, dtype=np.uint8, chunks=(1, *shape[1:]),
                                     compression=self.compression)

    def _widen(self) -> None:
        old = self.f["images"]
        new = self._create("images_rgb", 3)
        for a in range(0, self.written, _BLOCK):
            b = min(a + _BLOCK, self.written)
            new[a:b] = np.repeat(old[a:b], 3, axis=-1)
        del self.f["images"]
        self.f.move("images_rgb", "images")
        self.channels = 3

    def add(self, source: Source, class_id: int, rows: range, size: int) -> None:
        images = _square(source.read(class_id, rows), size)
        grey = _is_grey(images)
        if self.channels == 0:
            self.channels = 1 if grey else 3
            self._create("images", self.channels)
        elif self.channels == 1 and not grey:
            self._widen()
        block = images[..., :1] if self.channels == 1 else images
        self.f["images"][self.written : self.written + len(block)] = block
        self.written += len(block)


class _EncodedWriter:
    """Appends encoded bytes: a TFRecord source's own bytes when no resize is asked, else PNG."""

    def __init__(self, f: h5py.File, n: int, size: int, compression: str | None) -> None:
        self.ds = f.create_dataset("images", shape=(n,), dtype=h5py.vlen_dtype(np.uint8))
        self.channels = 3
        self.written = 0

    def add(self, source: Source, class_id: int, rows: range, size: int) -> None:
        read_encoded = getattr(source, "read_encoded", None)
        if read_encoded is not None:  # decoded at read time to ``size``, exactly as the source does
            blobs = list(read_encoded(class_id, rows))
        else:
            blobs = [_png(image) for image in _square(source.read(class_id, rows), size)]
        for blob in blobs:
            self.ds[self.written] = np.frombuffer(blob, dtype=np.uint8)
            self.written += 1


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    img = Image.fromarray(image[..., 0] if _is_grey(image[None]) else image)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def convert_named(
    source_name: str,
    root: str | None,
    out: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    store: str = "uint8",
    *,
    compression: str | None = None,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Convert a registered source; the entry point of ``metabench data convert``.

    Meta-Dataset sources are read from their TFRecords (never from an existing cache) and, by
    default, written to ``<root>/<name>.h5``, where the named source picks them up. ``out`` may
    be a file or an existing folder (then ``<out>/<name>.h5``).
    """
    from episodes.readers import SOURCES
    from episodes.readers.tfrecord import MD_SOURCES

    factory = SOURCES.get(source_name)
    if source_name in MD_SOURCES:
        options.setdefault("format", "tfrecord")
    if image_size is not None and (source_name in MD_SOURCES or source_name == "md_tfrecords"):
        # TFRecords hold encoded images of any size: decode straight to the stored size, as a direct read at
        # that size does, instead of decoding at the default and resizing twice.
        options.setdefault("image_size", image_size)
    source = factory(root=root, **options)
    return convert_source(source, _target(source_name, root, out), image_size=image_size, store=store,
                          compression=compression, progress=progress)


def _target(name: str, root: str | None, out: str | os.PathLike[str] | None) -> Path:
    """``out`` (a file, or a folder that receives ``<name>.h5``), else ``<root>/<name>.h5``."""
    if out is None:
        if root is None:
            raise ValueError(f'Converting "{name}" needs out=... (or data.root=...) to know where to write.')
        return Path(root) / f"{name}.h5"
    return Path(out) / f"{name}.h5" if Path(out).is_dir() else Path(out)


def convert_configured(name: str, settings: Any, root: str | None, out: str | os.PathLike[str] | None = None,
                       image_size: int | None = None, store: str = "uint8", *, progress: bool = True) -> Path:
    """Convert a source defined in ``data.sources`` (``settings``: its ``SourceSettings``); a reader that decodes to
    a size (folders, TFRecords) is given ``image_size`` directly, so no image is resized twice."""
    import dataclasses

    from episodes.configured import KINDS, open_configured

    if image_size is not None and "image_size" in KINDS.get(settings.kind, ()) and settings.image_size is None:
        settings = dataclasses.replace(settings, image_size=image_size)
    source = open_configured(name, settings, root)
    return convert_source(source, _target(name, settings.root or root, out), image_size=image_size, store=store,
                          progress=progress)
