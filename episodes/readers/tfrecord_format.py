"""The TFRecord file format, read without TensorFlow: framing, CRCs, the offset index, decoding.

A TFRecord file is a sequence of records, each ``uint64 length | uint32 masked CRC of the length |
data | uint32 masked CRC of the data``. Meta-Dataset keeps one such file per class, each record a
serialized ``tf.train.Example`` with an encoded ``image``. This module knows the bytes; the
``tfrecord`` module knows Meta-Dataset's folders, specs and image order.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import zlib
from pathlib import Path

import crc32c
import numpy as np
from PIL import Image, UnidentifiedImageError

from episodes.atomic import atomic_path
from episodes.readers.base import cache_dir

__all__ = ["IndexCache", "TFRecordError", "decode_image", "group_spans", "image_bytes", "masked_crc32c",
           "scan_records", "unframe"]

log = logging.getLogger(__name__)

_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4  # uint32 masked crc of the data
_MAX_SPAN = 8 << 20  # bytes read at once: bounds memory whatever the episode
_MAX_GAP = 256 << 10  # records closer than this are read in one request
_INDEX_NAME = ".metabench-tfrecord-index.npz"
_INDEX_VERSION = 1


class TFRecordError(ValueError):
    """A TFRecord file that is truncated, corrupt or undecodable; the message names file and position."""


# -- framing and the offset index -----------------------------------------------------------------
def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC32C: rotate right by 15 bits and add a constant (mod 2**32)."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def scan_records(path: Path, verify_crc: bool = True) -> np.ndarray:
    """Byte offsets of the records of one TFRecord file, reading only the 12-byte headers.

    Checks that every record lies inside the file (and the length CRC), so truncation is found
    when indexing, not in the middle of an epoch.
    """
    size = path.stat().st_size
    offsets: list[int] = []
    pos = 0
    with open(path, "rb") as f:
        while pos < size:
            header = f.read(_HEADER)
            if len(header) < _HEADER:
                raise TFRecordError(f"{path} is truncated at byte {pos} (a record header is cut off); "
                                    "re-copy or re-convert the file.")
            length, crc = struct.unpack("<QI", header)
            if verify_crc and crc != masked_crc32c(header[:8]):
                raise TFRecordError(f"{path}: CRC mismatch in the length of the record at byte {pos}; "
                                    "the file is corrupt, re-copy or re-convert it.")
            end = pos + _HEADER + length + _FOOTER
            if end > size:
                raise TFRecordError(f"{path} is truncated at byte {pos} (the record there needs {end - pos} bytes, "
                                    f"{size - pos} remain); re-copy or re-convert the file.")
            offsets.append(pos)
            pos = end
            f.seek(pos)
    return np.asarray(offsets, dtype=np.int64)


class IndexCache:
    """Record offsets of every class file of one source, kept in one ``.npz``.

    Each class is re-scanned only when its file's size or mtime changed. The cache lives in the
    source folder when that is writable, else under the metabench cache directory.
    """

    def __init__(self, folder: Path, pattern: str, index_dir: str | os.PathLike[str] | None) -> None:
        self.folder, self.pattern = folder, pattern
        key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
        fallback = Path(index_dir) if index_dir is not None else cache_dir() / "tfrecord-index"
        self.paths = [folder / _INDEX_NAME, fallback / f"{folder.name}-{key}.npz"]

    def _load(self) -> dict[int, tuple[int, int, np.ndarray]]:
        for path in self.paths:
            try:
                with np.load(path, allow_pickle=False) as z:
                    if int(z["version"]) != _INDEX_VERSION or str(z["pattern"]) != self.pattern:
                        continue
                    starts, offsets = z["starts"], z["offsets"]
                    return {c: (int(z["sizes"][c]), int(z["mtimes"][c]), offsets[starts[c] : starts[c + 1]])
                            for c in range(len(starts) - 1)}
            except (OSError, KeyError, ValueError, zlib.error) as e:
                if not isinstance(e, FileNotFoundError):
                    log.debug("ignoring unusable index %s: %s", path, e)
        return {}

    def load_or_build(self, num_classes: int, verify_crc: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """(file sizes, starts [C+1], offsets, classes scanned now); raises if a class file is missing."""
        cached = self._load()
        sizes, mtimes, parts, scanned = [], [], [], []
        for c in range(num_classes):
            path = self.folder / self.pattern.format(c)
            try:
                st = path.stat()
            except FileNotFoundError:
                raise FileNotFoundError(f"{path} (class {c}) does not exist; the Meta-Dataset conversion is "
                                        "incomplete, re-run it for this source.") from None
            hit = cached.get(c)
            if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                parts.append(hit[2])
            else:
                parts.append(scan_records(path, verify_crc))
                scanned.append(c)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
        starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        offsets = np.concatenate(parts or [np.zeros(0, np.int64)]).astype(np.int64)
        sizes_a, mtimes_a = np.asarray(sizes, np.int64), np.asarray(mtimes, np.int64)
        if scanned or len(cached) != num_classes:
            self._save(sizes=sizes_a, mtimes=mtimes_a, starts=starts, offsets=offsets)
            log.info("indexed %d class files of %s", len(scanned), self.folder)
        return sizes_a, starts, offsets, scanned

    def _save(self, **arrays: np.ndarray) -> None:
        for path in self.paths:
            try:
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.savez(f, version=np.int64(_INDEX_VERSION), pattern=np.str_(self.pattern), **arrays)
                return
            except OSError as e:
                log.debug("cannot write index %s (%s); trying the next location", path, e)
        log.warning("could not cache the record index of %s anywhere; it will be rebuilt next time", self.folder)


# -- reading records ------------------------------------------------------------------------------
def group_spans(offsets: np.ndarray, ends: np.ndarray) -> list[list[int]]:
    """Group positions (sorted by offset) into runs read with one request each."""
    spans: list[list[int]] = []
    for k in range(len(offsets)):
        if spans:
            first = spans[-1][0]
            if offsets[k] - ends[spans[-1][-1]] <= _MAX_GAP and ends[k] - offsets[first] <= _MAX_SPAN:
                spans[-1].append(k)
                continue
        spans.append([k])
    return spans


def unframe(buf: bytes, a: int, b: int, path: Path, offset: int, verify_crc: bool) -> bytes:
    """The data of the record framed in ``buf[a:b]`` (at byte ``offset`` of ``path``), CRCs checked."""
    if b > len(buf):
        raise TFRecordError(f"{path} is truncated at byte {offset}; re-copy or re-convert the file.")
    (length,) = struct.unpack_from("<Q", buf, a)
    if a + _HEADER + length + _FOOTER != b:
        raise TFRecordError(f"{path}: the record at byte {offset} has a corrupt length field; "
                            "re-copy or re-convert the file.")
    view = memoryview(buf)
    data = view[a + _HEADER : b - _FOOTER]
    if verify_crc:
        (len_crc,) = struct.unpack_from("<I", buf, a + 8)
        (data_crc,) = struct.unpack_from("<I", buf, b - _FOOTER)
        if len_crc != masked_crc32c(view[a : a + 8]) or data_crc != masked_crc32c(data):
            raise TFRecordError(f"{path}: CRC mismatch in the record at byte {offset}; the file is corrupt, "
                                "re-copy or re-convert it.")
    return bytes(data)


# -- decoding -------------------------------------------------------------------------------------
def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """Decode JPEG/PNG bytes to RGB uint8 ``[size, size, 3]`` (bilinear, like MD's square resize).

    JPEG ``draft`` mode decodes at a reduced scale still at least ``size``, which makes large
    photos several times cheaper to decode. ``where`` names the record in the error message.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.draft(img.mode if img.mode in ("L", "RGB") else "RGB", (size, size))
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        if img.size != (size, size):  # greyscale is resized before widening: a third of the work
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img.convert("RGB") if img.mode == "L" else img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        why = "not a known image format" if isinstance(e, UnidentifiedImageError) else e
        raise TFRecordError(f"{where} holds an image that cannot be decoded ({why}); "
                            "re-convert this class or remove the record.") from None


def image_bytes(payload: bytes, where: str) -> bytes:
    """The encoded ``image`` feature of one serialized ``tf.train.Example``."""
    from tfrecord import example_pb2  # the pinned tfrecord package: Example protobuf without TensorFlow

    try:
        example = example_pb2.Example.FromString(payload)
        values = example.features.feature["image"].bytes_list.value
    except Exception as e:  # protobuf's DecodeError has no stable import path
        raise TFRecordError(f"{where} is not a tf.train.Example ({e}); re-convert this class.") from None
    if len(values) != 1:
        raise TFRecordError(f'{where} has no single "image" bytes feature; is this Meta-Dataset data?')
    return values[0]
