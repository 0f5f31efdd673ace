"""Meta-Dataset TFRecord sources, read without TensorFlow.

Meta-Dataset stores one TFRecord file per class (``{class_id}.tfrecords``), each record a
serialized ``tf.train.Example`` holding an encoded ``image`` and an int64 ``label``. Records
are found through a per-class offset index built once by scanning only the framing (never
decoding an image) and cached beside the data, so a read is: open, seek, read, verify CRCs,
parse, decode, close. No file handle outlives a ``read`` call, so thousands of classes never
exhaust ``ulimit -n`` and memory does not grow with the number of classes. The byte-level
work (framing, CRCs, the offset index, decoding) lives in ``tfrecord_format``.

Meta-Dataset's conversion already left out the ImageNet-train images that duplicate test
images of other sources (its ``ImageNet_{CUBirds,Caltech101,Caltech256}_duplicates.txt``), so
these records need no exclusion list; image folders take one (``ImageFolderSource(exclude=...)``).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from episodes.readers.base import Source
from episodes.readers.tfrecord_format import (  # re-exported: this module was their home
    IndexCache,
    TFRecordError,
    decode_image,
    group_spans,
    image_bytes,
    masked_crc32c,
    scan_records,
    unframe,
)
from episodes.spec import DatasetSpec, SpecError, parse_split
from episodes.split import Split

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "MD_SOURCES",
    "MetaDatasetTFRecords",
    "TFRecordError",
    "decode_image",
    "masked_crc32c",
    "md_tfrecords",
    "open_md_source",
    "read_md_spec",
    "record_order",
    "scan_records",
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


def record_order(source: str, class_id: int, n: int) -> np.ndarray:
    """The fixed within-class order of a Meta-Dataset source's records (``shuffle=True``): a seeded permutation
    keyed by source name and class, so a cache prepared from the raw downloads yields the same episodes."""
    return np.random.default_rng([SHUFFLE_SEED, zlib.crc32(source.encode()), class_id]).permutation(n)


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
        cache = IndexCache(self.folder, spec.file_pattern, index_dir)
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
        return record_order(self.spec.name, class_id, n) if self.shuffle else np.arange(n, dtype=np.int64)

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
            out[rows] = decode_image(image_bytes(payload, where), self.image_size, where)
        return out

    def read_encoded(self, class_id: int, indices: Sequence[int]) -> list[bytes]:
        """The stored (encoded) image bytes of ``indices``, for caches that keep them as they are."""
        idx = self._check_read(class_id, indices)
        out: list[bytes] = [b""] * len(idx)
        path = self.class_file(class_id)
        for rows, recno, payload in self._payloads(class_id, idx):
            data = image_bytes(payload, f"{path} record {recno}")
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
            for span in group_spans(self._offsets[pos[order]], self._ends[pos[order]]):
                first, last = order[span[0]], order[span[-1]]
                start, stop = int(self._offsets[pos[first]]), int(self._ends[pos[last]])
                buf = os.pread(fd, stop - start, start)
                for k in span:
                    u = order[k]
                    off, end = int(self._offsets[pos[u]]), int(self._ends[pos[u]])
                    payload = unframe(buf, off - start, end - start, path, off, self.verify_crc)
                    yield np.flatnonzero(inverse == u), int(self._recno[pos[u]]), payload
        finally:
            os.close(fd)


def read_md_spec(path: Path) -> DatasetSpec:
    """Read ``dataset_spec.json``; MD's BiLevel specs (Omniglot) omit classes_per_split, derived here."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        return DatasetSpec.from_json(path)  # raises its one-sentence error
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix it or convert the source "
                        "again.") from None
    try:
        return _spec_from_md_dict(data, path)
    except SpecError as e:
        if str(path) in str(e):
            raise
        raise SpecError(f"{path} contradicts itself: {e} Fix the spec or convert the source again.") from None


def _spec_from_md_dict(data: Any, path: Path) -> DatasetSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a dataset spec must be a JSON object; fix it or convert the source again.")
    if "classes_per_split" not in data and "split_subgraphs" in data:
        from episodes.hierarchy import spec_from_md_hierarchical  # ILSVRC's HierarchicalDatasetSpecification

        return spec_from_md_hierarchical(data)
    if "classes_per_split" not in data and "classes_per_superclass" in data:
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


def _has_records(root: Path, name: str) -> bool:
    return (root / "dataset_spec.json").is_file() or (root / name / "dataset_spec.json").is_file()


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

        # Without records beside it the cache is the source: a broken one is an error, not a warning.
        if (format == "h5" or not _has_records(Path(root), name)
                or cache_matches_records(cache, Path(root) / name, options.get("image_size"))):
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
