"""Meta-Dataset TFRecord sources, read without TensorFlow.

Meta-Dataset stores one TFRecord file per class (``{class_id}.tfrecords``), each record a
serialized ``tf.train.Example`` holding an encoded ``image`` and an int64 ``label``. Records
are found through a per-class offset index built once by scanning only the framing (never
decoding an image) and cached beside the data, so a read is: open, seek, read, verify CRCs,
parse, decode, close. No file handle outlives a ``read`` call, so thousands of classes never
exhaust ``ulimit -n`` and memory does not grow with the number of classes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
from PIL import Image

from episodes.episode import Split
from episodes.readers.base import Source, cache_dir
from episodes.spec import DatasetSpec, SpecError, parse_split

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "MD_SOURCES",
    "MetaDatasetTFRecords",
    "TFRecordError",
    "decode_image",
    "md_tfrecords",
    "open_md_source",
    "read_md_spec",
]

log = logging.getLogger(__name__)

# Meta-Dataset's sources and their role in the "all sources" protocol: the 8 training sources'
# test splits are in-domain, Traffic Signs and MSCOCO are held-out domains.
MD_SOURCES: dict[str, str] = {
    "ilsvrc_2012": "id", "omniglot": "id", "aircraft": "id", "cu_birds": "id", "dtd": "id",
    "quickdraw": "id", "fungi": "id", "vgg_flower": "id", "traffic_sign": "ood", "mscoco": "ood",
}
# 128 px: PMF's and Meta-Album's size, close to MD's 126; the loader downsizes to 84 cheaply,
# while upsampling from 84 would lose detail that ViT backbones use.
DEFAULT_IMAGE_SIZE = 128
SHUFFLE_SEED = 20_240_611  # fixes the within-class order (MD issue #54: Traffic Signs was unshuffled)
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


class _IndexCache:
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
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as f:
                    np.savez(f, version=np.int64(_INDEX_VERSION), pattern=np.str_(self.pattern), **arrays)
                os.replace(tmp, path)
                return
            except OSError as e:
                log.debug("cannot write index %s (%s); trying the next location", path, e)
                tmp.unlink(missing_ok=True)
        log.warning("could not cache the record index of %s anywhere; it will be rebuilt next time", self.folder)


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
        raise TFRecordError(f"{where} holds an image that cannot be decoded ({e}); "
                            "re-convert this class or remove the record.") from None


def _image_bytes(payload: bytes, where: str) -> bytes:
    from tfrecord import example_pb2  # the pinned tfrecord package: Example protobuf without TensorFlow

    try:
        example = example_pb2.Example.FromString(payload)
        values = example.features.feature["image"].bytes_list.value
    except Exception as e:  # protobuf's DecodeError has no stable import path
        raise TFRecordError(f"{where} is not a tf.train.Example ({e}); re-convert this class.") from None
    if len(values) != 1:
        raise TFRecordError(f'{where} has no single "image" bytes feature; is this Meta-Dataset data?')
    return values[0]


class MetaDatasetTFRecords(Source):
    """A Meta-Dataset source folder (``dataset_spec.json`` + one ``.tfrecords`` file per class).

    Args:
        root: the source folder, or a data root holding ``<name>/``.
        name: registry name written into episodes; default the spec's name.
        domain: "id" or "ood"; default from ``MD_SOURCES`` ("ood" for unknown sources).
        verify_crc: check both CRCs of every record read (cheap next to decoding).
        image_size: square side every image is resized to (MD stores arbitrary sizes).
        shuffle: permute each class's records with a fixed seed (index i -> a fixed record).
        index_dir: where the offset index is cached when the source folder is not writable;
            default ``cache_dir() / "tfrecord-index"``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        name: str | None = None,
        domain: str | None = None,
        verify_crc: bool = True,
        image_size: int = DEFAULT_IMAGE_SIZE,
        shuffle: bool = True,
        index_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.folder = _source_folder(Path(root), name)
        spec = read_md_spec(self.folder / "dataset_spec.json")
        if "{}" not in spec.file_pattern or spec.file_pattern.count("{}") != 1:
            raise SpecError(f'{self.folder / "dataset_spec.json"}: file_pattern "{spec.file_pattern}" is not '
                            'supported; only one file per class ("{}.tfrecords") is.')
        self.spec = spec
        self.name = name or spec.name
        self.domain = domain or MD_SOURCES.get(self.name, MD_SOURCES.get(spec.name, "ood"))
        if image_size < 1:
            raise ValueError(f'Source "{self.name}": image_size={image_size} must be a positive integer.')
        self.image_size = int(image_size)
        self.verify_crc = verify_crc
        self.shuffle = shuffle
        cache = _IndexCache(self.folder, spec.file_pattern, index_dir)
        sizes, starts, offsets, self.scanned = cache.load_or_build(spec.num_classes, verify_crc)
        self._check_counts(starts)
        self._sizes = sizes
        self._build_order(starts, offsets)

    # -- index -------------------------------------------------------------------------------
    def class_file(self, class_id: int) -> Path:
        """Path of the TFRecord file holding ``class_id``."""
        return self.folder / self.spec.file_pattern.format(class_id)

    def _check_counts(self, starts: np.ndarray) -> None:
        for c in range(self.spec.num_classes):
            found, listed = int(starts[c + 1] - starts[c]), self.spec.images_per_class[c]
            if found != listed:
                raise SpecError(
                    f'Source "{self.name}" class {c} ("{self.spec.class_name(c)}"): dataset_spec.json lists '
                    f"{listed} images but {self.class_file(c)} holds {found} records; fix the spec or re-convert."
                )

    def _build_order(self, starts: np.ndarray, offsets: np.ndarray) -> None:
        """Image index i of class c -> (record number, byte offset, byte end), permuted once per class."""
        ends = np.empty_like(offsets)
        ends[:-1] = offsets[1:]
        counts = np.diff(starts)
        ends[starts[1:][counts > 0] - 1] = self._sizes[counts > 0]  # a class's last record ends at its EOF
        gather = np.concatenate([int(starts[c]) + self._permutation(c, int(counts[c]))
                                 for c in range(len(counts))] or [np.zeros(0, np.int64)])
        self._starts = starts
        self._offsets = offsets[gather]
        self._ends = ends[gather]
        self._recno = gather - np.repeat(starts[:-1], counts)

    def _permutation(self, class_id: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([SHUFFLE_SEED, zlib.crc32(self.spec.name.encode()), class_id]).permutation(n)

    def record_numbers(self, class_id: int) -> np.ndarray:
        """Position in the class file of each image index (the fixed within-class order)."""
        a, b = int(self._starts[class_id]), int(self._starts[class_id + 1])
        return self._recno[a:b].copy()

    # -- reading -----------------------------------------------------------------------------
    @property
    def native_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        idx = self._check_read(class_id, indices)
        out = np.empty((len(idx), self.image_size, self.image_size, 3), dtype=np.uint8)
        path = self.class_file(class_id)
        for rows, recno, payload in self._payloads(class_id, idx):
            where = f"{path} record {recno}"
            out[rows] = decode_image(_image_bytes(payload, where), self.image_size, where)
        return out

    def read_encoded(self, class_id: int, indices: Sequence[int]) -> list[bytes]:
        """The stored (encoded) image bytes of ``indices``, for caches that keep them as they are."""
        idx = self._check_read(class_id, indices)
        out: list[bytes] = [b""] * len(idx)
        path = self.class_file(class_id)
        for rows, recno, payload in self._payloads(class_id, idx):
            data = _image_bytes(payload, f"{path} record {recno}")
            for r in rows:
                out[r] = data
        return out

    def _payloads(self, class_id: int, idx: np.ndarray) -> Any:
        """Yield (output rows, record number, verified Example bytes), reading in file order.

        Records close together are fetched with one ``pread``; the file is opened once per call.
        """
        base = int(self._starts[class_id])
        unique, inverse = np.unique(idx, return_inverse=True)
        pos = base + unique
        order = np.argsort(self._offsets[pos], kind="stable")
        path = self.class_file(class_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f'{path} (class {class_id} of source "{self.name}") has disappeared; '
                                    "restore it or create the source again.") from None
        try:
            size = os.fstat(fd).st_size
            if size != int(self._sizes[class_id]):
                raise TFRecordError(f"{path} changed size since it was indexed ({int(self._sizes[class_id])} -> "
                                    f"{size} bytes); create the source again to re-index it.")
            for span in _spans(self._offsets[pos[order]], self._ends[pos[order]]):
                first, last = order[span[0]], order[span[-1]]
                start, stop = int(self._offsets[pos[first]]), int(self._ends[pos[last]])
                buf = os.pread(fd, stop - start, start)
                for k in span:
                    u = order[k]
                    off, end = int(self._offsets[pos[u]]), int(self._ends[pos[u]])
                    payload = self._unframe(buf, off - start, end - start, path, off)
                    yield np.flatnonzero(inverse == u), int(self._recno[pos[u]]), payload
        finally:
            os.close(fd)

    def _unframe(self, buf: bytes, a: int, b: int, path: Path, offset: int) -> bytes:
        if b > len(buf):
            raise TFRecordError(f"{path} is truncated at byte {offset}; re-copy or re-convert the file.")
        (length,) = struct.unpack_from("<Q", buf, a)
        if a + _HEADER + length + _FOOTER != b:
            raise TFRecordError(f"{path}: the record at byte {offset} has a corrupt length field; "
                                "re-copy or re-convert the file.")
        view = memoryview(buf)
        data = view[a + _HEADER : b - _FOOTER]
        if self.verify_crc:
            (len_crc,) = struct.unpack_from("<I", buf, a + 8)
            (data_crc,) = struct.unpack_from("<I", buf, b - _FOOTER)
            if len_crc != masked_crc32c(view[a : a + 8]) or data_crc != masked_crc32c(data):
                raise TFRecordError(f"{path}: CRC mismatch in the record at byte {offset}; the file is corrupt, "
                                    "re-copy or re-convert it.")
        return bytes(data)


def _spans(offsets: np.ndarray, ends: np.ndarray) -> list[list[int]]:
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


def read_md_spec(path: Path) -> DatasetSpec:
    """Read ``dataset_spec.json``; MD's BiLevel specs (Omniglot) omit classes_per_split, derived here."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return DatasetSpec.from_json(path)  # raises its one-sentence error
    if isinstance(data, dict) and "classes_per_split" not in data and "split_subgraphs" in data:
        from episodes.hierarchy import spec_from_md_hierarchical  # ILSVRC's HierarchicalDatasetSpecification

        return spec_from_md_hierarchical(data)
    if isinstance(data, dict) and "classes_per_split" not in data and "classes_per_superclass" in data:
        try:
            per_split = {parse_split(k): int(v) for k, v in data["superclasses_per_split"].items()}
            sizes = {int(k): int(v) for k, v in data["classes_per_superclass"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SpecError(f"{path}: cannot read the superclass counts ({e}).") from None
        counts, first = {}, 0
        for split in Split:
            ids = range(first, first + per_split.get(split, 0))
            counts[split.name] = sum(sizes.get(s, 0) for s in ids)
            first = ids.stop
        data = {**data, "classes_per_split": counts}
    return DatasetSpec.from_dict(data, origin=str(path))


def _source_folder(root: Path, name: str | None) -> Path:
    """The folder with ``dataset_spec.json``: ``root`` itself or ``root/name``."""
    if not root.is_dir():
        raise FileNotFoundError(f"Meta-Dataset folder {root} does not exist; set data.root to the folder holding "
                                "the converted records (one subfolder per source).")
    if (root / "dataset_spec.json").is_file():
        return root
    if name and (root / name / "dataset_spec.json").is_file():
        return root / name
    where = root / name if name else root
    raise FileNotFoundError(f"{where / 'dataset_spec.json'} does not exist; point the source at a converted "
                            "Meta-Dataset folder (dataset_spec.json plus one .tfrecords file per class).")


# -- registry factories ---------------------------------------------------------------------------
def md_tfrecords(root: str | None = None, *, path: str | None = None, **options: Any) -> MetaDatasetTFRecords:
    """Any Meta-Dataset-format folder: ``path`` (absolute or under ``root``), or ``root`` itself."""
    folder = Path(root or "") / path if path else (Path(root) if root else None)
    if folder is None:
        raise ValueError('Source "md_tfrecords" needs path=... (or data.root=...) pointing at a folder with '
                         "dataset_spec.json and per-class .tfrecords files.")
    return MetaDatasetTFRecords(folder, **options)


def open_md_source(name: str, root: str | None = None, *, format: str = "auto", **options: Any) -> Source:
    """Meta-Dataset source ``name`` under ``root``: the packed cache ``<root>/<name>.h5`` when it exists
    (``format="auto"``), else the TFRecords in ``<root>/<name>/``; ``format`` forces one."""
    if root is None:
        raise ValueError(f'Source "{name}" needs data.root=... pointing at the Meta-Dataset records '
                         f"(a folder holding {name}/dataset_spec.json).")
    if format not in ("auto", "tfrecord", "h5"):
        raise ValueError(f'Source "{name}": format="{format}" is unknown; use "auto", "tfrecord" or "h5".')
    cache = Path(root) / f"{name}.h5"
    if format == "h5" or (format == "auto" and cache.is_file()):
        from episodes.readers.hdf5 import PackedHDF5, cache_matches_records

        if format == "h5" or cache_matches_records(cache, Path(root) / name, options.get("image_size")):
            log.info('Source "%s": reading the packed cache %s', name, cache)
            return PackedHDF5(cache, name=name, domain=options.get("domain"))
    return MetaDatasetTFRecords(root, name=name, **options)


def _factory(name: str) -> Callable[..., Source]:
    def factory(root: str | None = None, **options: Any) -> Source:
        return open_md_source(name, root, **options)

    factory.__name__ = name
    factory.__doc__ = (f"Meta-Dataset {name} ({'in-domain' if MD_SOURCES[name] == 'id' else 'held-out'}): "
                       f"<root>/{name}.h5 when converted, else TFRecords in <root>/{name}/.")
    return factory


ilsvrc_2012 = _factory("ilsvrc_2012")
omniglot = _factory("omniglot")
aircraft = _factory("aircraft")
cu_birds = _factory("cu_birds")
dtd = _factory("dtd")
quickdraw = _factory("quickdraw")
fungi = _factory("fungi")
vgg_flower = _factory("vgg_flower")
traffic_sign = _factory("traffic_sign")
mscoco = _factory("mscoco")
