"""tensorflow-datasets builders prepared locally in ArrayRecord format, read by random access without TensorFlow.

ArrayRecord shards are read by record index, so an episode reads exactly its images and needs
neither TensorFlow nor a shuffle buffer; tfds supplies the dataset info and the example decoding.
Nothing is ever downloaded: a dataset that is not prepared under the data root is an error saying
how to prepare it. Every class goes to the TEST split by default, CNAPs' convention for the
MNIST/CIFAR extras of Meta-Dataset.

Records are read by a small helper process per reading process (exec'd, importing only
array_record) rather than by ``tfds.data_source`` in-process: once array_record has decoded in a
process, reading in a child forked from it (a DataLoader worker) crashes with SIGSEGV in
riegeli's background cleaner thread, which the fork did not copy (array_record 0.8.6).

tensorflow-datasets is an optional extra (``pip install 'metabench[tfds]'``); it is imported only
when a source is built, so listing sources works without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from episodes.readers.base import Source
from episodes.readers.folder import RESIZE_MODES, decode_image, within_class_order
from episodes.readers.folder_index import index_path, write_index
from episodes.spec import DatasetSpec, parse_split
from episodes.split import Split

__all__ = ["TfdsSource", "TfdsSourceError", "cifar10", "cifar100", "import_tfds", "tfds", "tfds_mnist"]

log = logging.getLogger(__name__)

INDEX_VERSION = 1
_LABEL_CHUNK = 1024  # records per batched read while indexing labels


class TfdsSourceError(ValueError):
    """A tfds dataset that cannot be read as asked; the message names it and says what to do."""


def import_tfds() -> Any:
    """Import tensorflow_datasets, or fail with one sentence saying how to install it."""
    try:
        import tensorflow_datasets
    except ImportError:
        raise ImportError("tfds sources need tensorflow-datasets, an optional extra: "
                          "pip install 'metabench[tfds]' (it does not install TensorFlow).") from None
    return tensorflow_datasets


# Reads run in a helper process started with exec (never forked) that only imports array_record:
# length-prefixed pickles of [(shard file, [positions]), ...] in, lists of record bytes out.
_HELPER = """
import pickle, struct, sys
from array_record.python import array_record_module
readers, src, dst = {}, sys.stdin.buffer, sys.stdout.buffer
while len(head := src.read(8)) == 8:
    request = pickle.loads(src.read(struct.unpack("<Q", head)[0]))
    try:
        reply = []
        for filename, positions in request:
            if filename not in readers:
                readers[filename] = array_record_module.ArrayRecordReader(
                    filename, options="readahead_buffer_size:0", file_reader_buffer_size=32768)
            reply.append(readers[filename].read(positions))
    except Exception as e:
        reply = f"{type(e).__name__}: {e}"
    data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    dst.write(struct.pack("<Q", len(data)))
    dst.write(data)
    dst.flush()
"""
_FOREIGN_HELPERS: list[Any] = []  # a forked child's copies of its parent's helpers: never used, never closed


def _check_array_record() -> None:
    if importlib.util.find_spec("array_record") is None:
        raise ImportError("tfds sources need array_record to read ArrayRecord files: "
                          "pip install 'metabench[tfds]'.")


def _close_helper(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        proc.stdin.close()  # type: ignore[union-attr]  # the helper exits at end of input


class _Records:
    """Random access to the serialized records of one tfds split, through a per-process helper.

    Why a helper: once array_record has decoded in a process, its readers crash (SIGSEGV in
    riegeli's background cleaner) in children forked from it, such as DataLoader workers
    (array_record 0.8.6). A helper started with exec keeps every process that may fork clean.
    """

    def __init__(self, instructions: Sequence[tuple[str, int, int]]) -> None:
        self.instructions = [(str(f), int(skip), int(take)) for f, skip, take in instructions]
        self._ends = np.cumsum([take for _, _, take in self.instructions], dtype=np.int64)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _helper(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._pid != os.getpid():
            _FOREIGN_HELPERS.append(self._proc)
            self._proc = None
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-c", _HELPER], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE)
            self._pid = os.getpid()
            weakref.finalize(self, _close_helper, self._proc)
        return self._proc

    def _call(self, request: list[tuple[str, list[int]]]) -> list[list[bytes]]:
        data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            proc = self._helper()
            try:
                proc.stdin.write(struct.pack("<Q", len(data)) + data)  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                head = proc.stdout.read(8)  # type: ignore[union-attr]
                reply = pickle.loads(proc.stdout.read(struct.unpack("<Q", head)[0]))  # type: ignore[union-attr]
            except (OSError, struct.error, EOFError, pickle.UnpicklingError):
                raise TfdsSourceError(f"The ArrayRecord reader process stopped (exit code {proc.poll()}); "
                                      "its error is printed above.") from None
        if isinstance(reply, str):
            raise TfdsSourceError(f"Reading ArrayRecord shards failed ({reply}); prepare the dataset again.")
        return reply

    def read(self, keys: Sequence[int]) -> list[bytes]:
        """The records at global indices ``keys``, in that order."""
        keys_arr = np.asarray(keys, dtype=np.int64)
        shard = np.searchsorted(self._ends, keys_arr, side="right")
        groups = [(s, np.flatnonzero(shard == s)) for s in np.unique(shard).tolist()]
        request = []
        for s, where in groups:
            filename, skip, take = self.instructions[s]
            request.append((filename, (keys_arr[where] - (self._ends[s] - take) + skip).tolist()))
        out: list[bytes] = [b""] * len(keys_arr)
        for (_, where), records in zip(groups, self._call(request) if request else []):
            for k, record in zip(where.tolist(), records):
                out[k] = record
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {"instructions": self.instructions, "_ends": self._ends}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _proc=None, _pid=os.getpid(), _lock=threading.Lock())


def _read_index(path: Path, stamp: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cached index at ``path`` if it was written for exactly ``stamp``, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("stamp") != json.loads(json.dumps(stamp)):
        return None
    return data


def _how_to_prepare(dataset: str) -> str:
    return (f"prepare it on a machine with internet with `tfds build {dataset} --file_format=array_record "
            "--data_dir=DIR`, copy DIR here, then pass data.root=DIR")


def _open_builder(tfds_mod: Any, dataset: str, data_dir: str | None) -> Any:
    """The builder of a prepared ArrayRecord dataset under ``data_dir``; never downloads or prepares."""
    where = data_dir or "the default tfds data_dir"
    try:
        builder = tfds_mod.builder(dataset, data_dir=data_dir, try_gcs=False)
    except ValueError:  # DatasetNotFoundError: neither a builder in code nor prepared files
        raise TfdsSourceError(f'tfds dataset "{dataset}" is not known and not prepared under {where}; '
                              f"{_how_to_prepare(dataset)}.") from None
    if not builder.is_prepared():
        raise TfdsSourceError(f'tfds dataset "{dataset}" is not prepared in {builder.data_path}; '
                              f"{_how_to_prepare(dataset)}.")
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if str(file_format) != "array_record":
        raise TfdsSourceError(f'tfds dataset "{dataset}" in {builder.data_path} is stored as {file_format}, which '
                              f"has no random access; {_how_to_prepare(dataset)}.")
    return builder


class TfdsSource(Source):
    """A tensorflow-datasets dataset prepared locally as ArrayRecord; every class in TEST by default.

    Args:
        name: tfds dataset name, optionally with config/version (``"cifar10"``, ``"mnist:3.0.1"``).
        data_dir: the tfds data dir holding ``<name>/<version>/``; None uses tfds' default.
        split: the tfds split whose records are read (``"test"``, ``"train+test"``, ...).
        image_key, label_key: feature names of the image and the integer class label.
        domain: ``"ood"`` (held out) or ``"id"``.
        image_size: decode to ``image_size`` squares; None keeps the dataset's fixed native size.
        class_split: the metabench split every class goes to.
        source_name: name in episodes and results; default the dataset name without config/version.
        resize: ``"squash"`` (Meta-Dataset's direct resize) or ``"crop"``.
    """

    def __init__(
        self,
        name: str,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        split: str = "test",
        image_key: str = "image",
        label_key: str = "label",
        domain: str = "ood",
        image_size: int | None = None,
        class_split: Split | str = Split.TEST,
        source_name: str | None = None,
        resize: str = "squash",
    ) -> None:
        self.dataset = name
        self.name = source_name or name.split(":")[0].split("/")[0]
        if data_dir is not None and "://" in str(data_dir):
            raise TfdsSourceError(f"data_dir {data_dir} is remote; tfds sources read local folders only.")
        if domain not in ("id", "ood") or resize not in RESIZE_MODES or (image_size is not None and image_size < 1):
            raise ValueError(f'Source "{self.name}": need domain "id" or "ood", resize in {RESIZE_MODES} and '
                             "image_size >= 1 or None.")
        self.data_dir = None if data_dir is None else str(Path(data_dir).expanduser().resolve())
        self.split_name, self.image_key, self.label_key = split, image_key, label_key
        self.domain, self.image_size, self.resize = domain, image_size, resize
        tfds_mod = import_tfds()
        _check_array_record()
        builder = _open_builder(tfds_mod, name, self.data_dir)
        self._features = builder.info.features
        missing = [k for k in (image_key, label_key) if k not in self._features]
        if missing:
            raise TfdsSourceError(f'tfds dataset "{name}" has no feature "{missing[0]}" (it has '
                                  f"{', '.join(self._features)}); pass image_key=/label_key=.")
        self._decoders = {image_key: tfds_mod.decode.SkipDecoding()}  # images are decoded only when read
        self._split = _Records(self._file_instructions(builder))
        labels, records = self._index(builder)
        self._class_records = [np.asarray(r, dtype=np.int64)[within_class_order(str(lab), len(r))]
                               for lab, r in zip(labels, records)]
        self._native = self._native_size()
        names = getattr(self._features[label_key], "names", None)
        target = parse_split(class_split)
        self.spec = DatasetSpec(
            name=self.name,
            classes_per_split={s: (len(labels) if s is target else 0) for s in Split},
            images_per_class={c: len(r) for c, r in enumerate(records)},
            class_names={c: (names[lab] if names and 0 <= lab < len(names) else str(lab))
                         for c, lab in enumerate(labels)},
            path=str(builder.data_path),
            extra={"tfds": {"dataset": name, "split": split, "labels": labels}},
        )

    # -- opening -------------------------------------------------------------------------------
    def _file_instructions(self, builder: Any) -> list[tuple[str, int, int]]:
        """(shard file, first record, record count) of each piece of the split, e.g. "train[:10%]+test"."""
        try:
            pieces = builder.info.splits[self.split_name].file_instructions
        except (ValueError, KeyError, TypeError) as e:
            known = ", ".join(builder.info.splits)
            raise TfdsSourceError(f'tfds dataset "{self.dataset}" cannot read split "{self.split_name}" ({e}); '
                                  f"use one of {known}.") from None
        out = []
        for fi in pieces:
            take = fi.take if fi.take >= 0 else fi.examples_in_shard - fi.skip
            out.append((os.path.join(builder.data_path, fi.filename), fi.skip, take))
        return out

    def _records(self, keys: Sequence[int]) -> list[dict[str, Any]]:
        return [self._features.deserialize_example_np(raw, decoders=self._decoders) for raw in self._split.read(keys)]

    def _index(self, builder: Any) -> tuple[list[int], list[list[int]]]:
        """Sorted label values and the record indices of each, cached like a folder index."""
        info_file = Path(builder.data_path) / "dataset_info.json"
        stamp = {"version": INDEX_VERSION, "path": str(builder.data_path), "split": self.split_name,
                 "label_key": self.label_key, "mtime": info_file.stat().st_mtime_ns, "n": len(self._split)}
        path = index_path("tfds", f"{builder.data_path}|{self.split_name}|{self.label_key}")
        cached = _read_index(path, stamp)
        if cached is not None:
            return [int(v) for v in cached["labels"]], cached["records"]
        by_label: dict[int, list[int]] = {}
        n = len(self._split)
        for start in range(0, n, _LABEL_CHUNK):
            keys = list(range(start, min(start + _LABEL_CHUNK, n)))
            for key, record in zip(keys, self._records(keys)):
                by_label.setdefault(self._label(record, key), []).append(key)
        if not by_label:
            raise TfdsSourceError(f'tfds dataset "{self.dataset}" split "{self.split_name}" has no records.')
        labels = sorted(by_label)
        records = [by_label[v] for v in labels]
        write_index(path, stamp, {"labels": labels, "records": records})
        log.info('tfds "%s" %s: indexed %d records in %d classes', self.dataset, self.split_name,
                 n, len(labels))
        return labels, records

    def _label(self, record: dict[str, Any], key: int) -> int:
        value = np.asarray(record[self.label_key])
        if value.ndim != 0 or value.dtype.kind not in "iu":
            raise TfdsSourceError(f'tfds dataset "{self.dataset}" record {key}: "{self.label_key}" is not one '
                                  "integer class label; pass label_key= of a ClassLabel feature.")
        return int(value)

    def _native_size(self) -> tuple[int, int]:
        if self.image_size is not None:
            return (self.image_size, self.image_size)
        shape = tuple(getattr(self._features[self.image_key], "shape", ()) or ())
        if len(shape) < 2 or not all(isinstance(d, int) for d in shape[:2]):
            raise TfdsSourceError(f'tfds dataset "{self.dataset}" images have no fixed size; pass image_size=N.')
        return (int(shape[0]), int(shape[1]))

    # -- reading -------------------------------------------------------------------------------
    @property
    def native_size(self) -> tuple[int, int]:
        return self._native

    def record_index(self, class_id: int, index: int) -> int:
        """The record of image ``index`` of ``class_id`` in the tfds split (after the fixed shuffle)."""
        self._check_read(class_id, [index])
        return int(self._class_records[class_id][index])

    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        idx = self._check_read(class_id, indices)
        keys = self._class_records[class_id][idx].tolist()
        records = self._records(keys) if keys else []
        out = np.empty((len(keys), *self._native, 3), dtype=np.uint8)
        for k, (key, record) in enumerate(zip(keys, records)):
            out[k] = self._decode(record[self.image_key], key)
        return out

    def _decode(self, value: Any, key: int) -> np.ndarray:
        what = f'tfds dataset "{self.dataset}" record {key}'
        if isinstance(value, (bytes, np.bytes_)):
            image = decode_image(bytes(value), self.image_size, resize=self.resize, what=what)
        else:  # a raw array feature: greyscale or RGB uint8
            array = np.asarray(value, dtype=np.uint8)
            array = array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
            image = np.asarray(Image.fromarray(array).convert("RGB"))
            if self.image_size is not None and image.shape[:2] != self._native:
                image = np.asarray(Image.fromarray(image).resize((self.image_size,) * 2, Image.Resampling.BILINEAR))
        if image.shape[:2] != self._native:
            raise TfdsSourceError(f"{what} is {image.shape[1]}x{image.shape[0]}, not like the rest; pass image_size=N.")
        return image


def tfds(root: str | os.PathLike[str] | None = None, *, dataset: str | None = None, **options: Any) -> TfdsSource:
    """Any tensorflow-datasets dataset prepared as ArrayRecord under data.root (pass dataset=NAME)."""
    if not dataset:
        raise TfdsSourceError('Source "tfds" needs dataset=NAME (a tfds dataset prepared as ArrayRecord '
                              "under data.root).")
    return TfdsSource(dataset, data_dir=root, **options)


def cifar10(root: str | os.PathLike[str] | None = None, **options: Any) -> TfdsSource:
    """CIFAR-10 test set (10 classes, all TEST), from tfds "cifar10" prepared as ArrayRecord under data.root."""
    return TfdsSource("cifar10", data_dir=root, **options)


def cifar100(root: str | os.PathLike[str] | None = None, **options: Any) -> TfdsSource:
    """CIFAR-100 test set (100 classes, all TEST), from tfds "cifar100" prepared as ArrayRecord under data.root."""
    return TfdsSource("cifar100", data_dir=root, **options)


def tfds_mnist(root: str | os.PathLike[str] | None = None, **options: Any) -> TfdsSource:
    """MNIST test set (10 classes, all TEST), from tfds "mnist" prepared as ArrayRecord under data.root."""
    options.setdefault("source_name", "tfds_mnist")
    return TfdsSource("mnist", data_dir=root, **options)
