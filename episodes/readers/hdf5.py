"""Packed HDF5 sources: one file per source, images pre-decoded (or kept encoded), read by class.

Decoding dominates episode loading (see the pipeline notes), so ``episodes.convert`` decodes a
source once into ``images`` [N, H, W, C] uint8 with ``offsets`` [C+1] marking each class's rows.
Reading is then a few hyperslab reads per class. The h5py file is opened lazily, once per
process, and dropped on pickling or after a fork, so DataLoader workers each open their own.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from episodes.readers.base import Source
from episodes.spec import DatasetSpec, SpecError

__all__ = ["FORMAT", "FORMAT_VERSION", "PackedHDF5", "PackedHDF5Error", "cache_matches_records", "open_h5"]

log = logging.getLogger(__name__)

FORMAT = "metabench-packed-source"
FORMAT_VERSION = 1
STORES = ("uint8", "encoded")


class PackedHDF5Error(ValueError):
    """A packed file that is missing pieces, truncated or corrupt; the message names the file."""


def _broken(path: Path, why: object) -> PackedHDF5Error:
    return PackedHDF5Error(f"{path} is not a readable metabench packed source ({why}); it is truncated or corrupt, "
                           "delete it and run `metabench data convert` again.")


class PackedHDF5(Source):
    """A source written by ``episodes.convert.convert_source``.

    Args:
        path: the ``.h5`` file.
        name: registry name written into episodes; default the name stored in the file.
        domain: "id" or "ood"; default the domain stored in the file.
        image_size: only for encoded files, the square side images are decoded to
            (default: the size recorded at conversion).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        domain: str | None = None,
        image_size: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; create it with `metabench data convert` "
                                    "or point path=... at an existing .h5 file.")
        self._h5: h5py.File | None = None
        self._images: h5py.Dataset | None = None
        self._pid = -1
        with self._open() as f:
            self._read_meta(f)
        self.name = name or self.stored_name
        self.domain = domain or self.stored_domain
        if image_size is not None:
            if self.store != "encoded":
                raise ValueError(f"{self.path} stores decoded {self._size}px images; image_size applies to "
                                 "encoded files only (the loader resizes with EpisodeSet(image_size=...)).")
            self._size = int(image_size)

    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except (OSError, ValueError) as e:
            raise _broken(self.path, e) from None

    def _read_meta(self, f: h5py.File) -> None:
        attrs = f.attrs
        if attrs.get("format") != FORMAT:
            raise PackedHDF5Error(f"{self.path} is an HDF5 file but not a metabench packed source (no "
                                  f'format="{FORMAT}" attribute); convert the source with `metabench data convert`.')
        version = int(attrs.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise PackedHDF5Error(f"{self.path} has format version {version}, newer than this metabench reads "
                                  f"({FORMAT_VERSION}); upgrade metabench or convert again.")
        try:
            self.spec = DatasetSpec.from_dict(json.loads(str(attrs["spec"])), origin=str(self.path))
            self.stored_name, self.stored_domain = str(attrs["source"]), str(attrs["domain"])
            self.store, self._size = str(attrs["store"]), int(attrs["image_size"])
            self._channels = int(attrs["channels"])
            self._offsets = np.asarray(f["offsets"][:], dtype=np.int64)
            n_images = f["images"].shape[0]
            self._chunks = _chunk_table(f["images"]) if self.store == "uint8" else None
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as e:
            raise _broken(self.path, f"missing or unreadable metadata: {e}") from None
        counts = [self.spec.images_per_class[c] for c in range(self.spec.num_classes)]
        expected = np.concatenate([[0], np.cumsum(counts)])
        if self.store not in STORES or not np.array_equal(self._offsets, expected) or n_images != expected[-1]:
            raise _broken(self.path, f"offsets/images disagree with the stored spec ({n_images} images)")

    # -- reading -------------------------------------------------------------------------------
    @property
    def native_size(self) -> tuple[int, int]:
        return (self._size, self._size)

    def _dataset(self) -> h5py.Dataset:
        if self._images is None or self._pid != os.getpid():
            self._h5 = self._images = None  # after a fork: never use the parent's HDF5 handle
            self._h5 = self._open()
            self._images = self._h5["images"]
            self._pid = os.getpid()
        return self._images

    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        idx = self._check_read(class_id, indices)
        rows, inverse = np.unique(self._offsets[class_id] + idx, return_inverse=True)
        try:
            if self.store == "encoded":
                return self._read_encoded(rows)[inverse]
            images = self._read_runs(rows) if self._chunks is None else self._read_chunks(rows)
        except (OSError, RuntimeError) as e:  # h5py raises these for unreadable chunks
            raise _broken(self.path, e) from None
        images = images[inverse]
        return np.repeat(images, 3, axis=-1) if self._channels == 1 else images

    def _read_chunks(self, rows: np.ndarray) -> np.ndarray:
        """Read each image's chunk straight from the file (one ``preadv`` into the output row)."""
        assert self._chunks is not None
        ds = self._dataset()
        assert self._h5 is not None
        fd = self._h5.id.get_vfd_handle()
        out = np.empty((len(rows), *ds.shape[1:]), dtype=np.uint8)
        nbytes = out[0].nbytes if len(rows) else 0  # an empty request reads nothing
        for k, row in enumerate(rows):
            if os.preadv(fd, [out[k].reshape(-1)], int(self._chunks[row])) != nbytes:
                raise OSError(f"image {int(row)} lies past the end of the file")
        return out

    def _read_runs(self, rows: np.ndarray) -> np.ndarray:
        """Read sorted unique rows, one hyperslab per run of consecutive rows (fancy indexing is slow)."""
        ds = self._dataset()
        out = np.empty((len(rows), *ds.shape[1:]), dtype=np.uint8)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
            first = int(rows[a])
            ds.read_direct(out, np.s_[first : first + (b - a)], np.s_[a:b])
        return out

    def _read_encoded(self, rows: np.ndarray) -> np.ndarray:
        from episodes.readers.tfrecord import decode_image

        ds = self._dataset()
        out = np.empty((len(rows), self._size, self._size, 3), dtype=np.uint8)
        for k, row in enumerate(rows):
            data = ds[int(row)].tobytes()
            out[k] = decode_image(data, self._size, f"{self.path} image {int(row)}")
        return out

    def close(self) -> None:
        """Close this process's handle (reads reopen it)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._images = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = state["_images"] = None  # each worker opens its own handle
        state["_pid"] = -1
        return state


def _chunk_table(ds: h5py.Dataset) -> np.ndarray | None:
    """File offset of every image when each is one unfiltered chunk, else None (h5py reads then).

    h5py costs tens of microseconds per read call; a direct ``preadv`` per image costs a few, and
    the table (8 bytes per image) is built once from HDF5's chunk index.
    """
    n = ds.shape[0]
    if ds.chunks != (1, *ds.shape[1:]) or ds.compression or ds.fletcher32 or ds.shuffle or ds.scaleoffset:
        return None
    if not hasattr(ds.id, "chunk_iter") or ds.file.driver != "sec2" or n == 0:
        return None
    table = np.full(n, -1, dtype=np.int64)
    nbytes = int(np.prod(ds.chunks))

    def visit(info: Any) -> None:
        if info.filter_mask == 0 and info.size == nbytes:
            table[info.chunk_offset[0]] = info.byte_offset

    ds.id.chunk_iter(visit)
    return table if (table >= 0).all() else None


def cache_matches_records(cache: Path, folder: Path, image_size: int | None = None) -> bool:
    """True when the packed ``cache`` may stand in for the records in ``folder``.

    A cache that cannot be read, whose spec differs from ``folder/dataset_spec.json`` (stale),
    or that holds another image size than one explicitly asked for is skipped with a warning,
    so a cache never silently changes what a run reads.
    """
    try:
        packed = PackedHDF5(cache)
    except (PackedHDF5Error, SpecError, OSError) as e:
        log.warning("ignoring the packed cache: %s", e)
        return False
    cached = packed.spec
    if image_size is not None and packed.store == "uint8" and packed.native_size[0] != int(image_size):
        log.warning("ignoring the packed cache %s: it holds %d px images, image_size=%s was asked; reading the "
                    "records (convert again at that size to cache it)", cache, packed.native_size[0], image_size)
        return False
    spec_file = folder / "dataset_spec.json"
    if not spec_file.is_file():
        return True
    from episodes.readers.tfrecord import read_md_spec

    records = read_md_spec(spec_file)
    same = (records.classes_per_split == cached.classes_per_split
            and records.images_per_class == cached.images_per_class)
    if not same:
        log.warning("ignoring the packed cache %s: its classes differ from %s; convert again", cache, spec_file)
    return same


def open_h5(root: str | None = None, *, path: str | None = None, name: str | None = None, **options: Any) -> PackedHDF5:
    """Registry factory: ``path`` (absolute or under ``root``), or ``<root>/<name>.h5``."""
    if path is not None:
        target = Path(path) if root is None or Path(path).is_absolute() else Path(root) / path
    elif name is not None and root is not None:
        target = Path(root) / f"{name}.h5"
    else:
        raise ValueError('Source "h5" needs path=... (a packed .h5 file, absolute or under data.root) '
                         "or name=... with data.root=... holding <name>.h5.")
    return PackedHDF5(target, name=name, **options)
