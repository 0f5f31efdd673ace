"""Meta-Dataset's dumped episodes (``data/dump_episodes.py`` upstream), read without TensorFlow.

A dump folder holds ``episode-NNNN-train.tfrecords`` (the support set) and ``episode-NNNN-test.tfrecords`` (the
query set) per episode, each record a ``tf.train.Example`` with an encoded ``image`` and a ``label`` 0..way-1.
The images themselves are the episode, not references into a source, so importing writes both: a packed
source whose classes are the (episode, label) pairs (``<out>/<name>.h5``, support images first, then query) and
a frozen suite ``<name>`` whose plans point into it. Evaluate it with ``data.sources.<name>={kind: h5, path:
<out>/<name>.h5}``, ``data.eval_sources=[<name>]`` and ``eval.suite=<name>``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from episodes.readers.base import Source
from episodes.readers.tfrecord_format import TFRecordError, decode_image, image_bytes, scan_records, unframe
from episodes.spec import DatasetSpec
from episodes.split import Split
from episodes.suite_format import SuiteError

__all__ = ["DumpedEpisodes", "read_dump_files"]

_NAME = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)-(?P<role>train|test)\.tfrecords$")


def read_dump_files(folder: Path) -> list[tuple[Path, Path]]:
    """The (support, query) record files of every episode in ``folder``, in episode order."""
    if not folder.is_dir():
        raise SuiteError(f"Dumped-episode folder {folder} does not exist; pass the folder dump_episodes wrote.")
    found: dict[int, dict[str, Path]] = {}
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.setdefault(int(match["index"]), {})[match["role"]] = path
    if not found:
        raise SuiteError(f"{folder} holds no episode-NNNN-train/test.tfrecords files; is it a dump of "
                         "Meta-Dataset episodes?")
    for index, roles in sorted(found.items()):
        missing = {"train", "test"} - set(roles)
        if missing:
            role = "support (train)" if "train" in missing else "query (test)"
            raise SuiteError(f"{folder}: episode {index} has no {role} records; the dump is incomplete.")
    return [(roles["train"], roles["test"]) for _, roles in sorted(found.items())]


def _label(payload: bytes, where: str) -> int:
    from tfrecord import example_pb2

    values = example_pb2.Example.FromString(payload).features.feature["label"].int64_list.value
    if len(values) != 1:
        raise TFRecordError(f'{where} has no single "label" int64 feature; is this a Meta-Dataset dump?')
    return int(values[0])


class DumpedEpisodes(Source):
    """The images of a dump as a source: class ``k`` is one (episode, label) pair, support images before query."""

    def __init__(self, folder: str | os.PathLike[str], *, name: str, image_size: int = 84) -> None:
        self.name, self.domain, self.image_size = name, "ood", int(image_size)
        self.episodes: list[tuple[list[int], list[int]]] = []  # per episode, the class id of each label...
        self.shots: list[list[int]] = []  # ...and its support count per label
        self._records: list[list[tuple[Path, int, int]]] = []  # per class: (file, start, end) of each image
        for support_path, query_path in read_dump_files(Path(folder)):
            self._add_episode(support_path, query_path)
        counts = {c: len(r) for c, r in enumerate(self._records)}
        self.spec = DatasetSpec(name=name, classes_per_split={Split.TRAIN: 0, Split.VALID: 0, Split.TEST: len(counts)},
                                images_per_class=counts)

    def _labelled(self, path: Path) -> list[tuple[int, int, int]]:
        offsets = scan_records(path)
        ends = [*offsets[1:].tolist(), path.stat().st_size]
        buf = path.read_bytes()
        return [(_label(unframe(buf, int(a), int(b), path, int(a), True), f"{path} record {k}"), int(a), int(b))
                for k, (a, b) in enumerate(zip(offsets.tolist(), ends))]

    def _add_episode(self, support_path: Path, query_path: Path) -> None:
        support, query = self._labelled(support_path), self._labelled(query_path)
        way = len({label for label, *_ in support})
        if sorted({label for label, *_ in support}) != list(range(way)) or {q for q, *_ in query} - set(range(way)):
            raise SuiteError(f"{support_path}: labels are not 0..way-1 in support and query alike.")
        first = len(self._records)
        for label in range(way):
            self._records.append([(support_path, a, b) for lab, a, b in support if lab == label]
                                 + [(query_path, a, b) for lab, a, b in query if lab == label])
        self.shots.append([sum(lab == label for lab, *_ in support) for label in range(way)])
        self.episodes.append((list(range(first, first + way)), [sum(q == label for q, *_ in query)
                                                               for label in range(way)]))

    @property
    def native_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        idx = self._check_read(class_id, indices)
        out = np.empty((len(idx), self.image_size, self.image_size, 3), dtype=np.uint8)
        for k, i in enumerate(idx.tolist()):
            path, a, b = self._records[class_id][i]
            with open(path, "rb") as f:
                f.seek(a)
                payload = unframe(f.read(b - a), 0, b - a, path, a, True)
            out[k] = decode_image(image_bytes(payload, f"{path} at byte {a}"), self.image_size, f"{path} at byte {a}")
        return out
