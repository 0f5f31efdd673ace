"""Episodes defined elsewhere, imported as a frozen suite (``metabench episodes import FILE --name NAME``).

An imported suite is a frozen suite like any other (hashed, fingerprinted against its sources, joined per
episode), so a published list of test episodes is scored exactly, by every learner. The input names, per
episode, a source and its support and query images with their labels, in JSON or CSV:

JSON::

    {"split": "test",
     "episodes": [
       {"source": "alphabets",
        "support": [{"file": "Futurama/character01/0.png", "label": 0}, {"class": "Futurama/character02",
                     "index": 4, "label": 1}],
        "query": [["Futurama/character01/7.png", 0], ["Futurama/character02", 9, 1]]}]}

An image is a file of a folder source (relative to its root, or absolute) or a (class, index) pair of any
source (class by name or id; index in the source's own order, as ``Source.read`` takes it); lists
``[file, label]`` and ``[class, index, label]`` are short forms. CSV: one row per image with the columns
``episode, source, set, label`` and either ``file`` or ``class`` and ``index`` (set is support or query).

Labels are 0..way-1, each on one class; every query label has support images.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from episodes.loader import EpisodePlan
from episodes.readers.base import Source
from episodes.sampler import EpisodeDescription, SamplerConfig
from episodes.spec import parse_split
from episodes.split import Split
from episodes.suite_format import SuiteError, plan_to_json
from episodes.suites import SUITES_DIR, Suite, _canonical_hash, _encode, _header, _write, load_suite, spec_fingerprint

__all__ = ["import_md_dump", "import_suite", "read_episode_file", "referenced_sources"]

Item = tuple[int, int, int]  # class id, image index, label


def read_episode_file(path: Path) -> tuple[Split, list[dict[str, Any]]]:
    """The episodes of a JSON or CSV file, as ``{"source", "support": [...], "query": [...]}`` dicts."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError(f"Episode file {path} cannot be read ({e}); check the path.") from None
    if path.suffix.lower() == ".csv":
        return Split.TEST, _from_csv(path, text)
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SuiteError(f"Episode file {path} is not valid JSON ({e}); see episodes/suite_import.py.") from None
    episodes = doc.get("episodes") if isinstance(doc, dict) else None
    if not isinstance(episodes, list) or not episodes:
        raise SuiteError(f'Episode file {path} has no "episodes" list; it needs {{"episodes": [{{"source": ..., '
                         '"support": [...], "query": [...]}}]}}.')
    return parse_split(doc.get("split", "test")), episodes


def _from_csv(path: Path, text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(text.splitlines())
    columns = set(reader.fieldnames or [])
    missing = [c for c in ("episode", "source", "set", "label") if c not in columns]
    if missing or not ({"file"} <= columns or {"class", "index"} <= columns):
        raise SuiteError(f"{path}: a CSV episode file needs the columns episode, source, set, label and file (or "
                         f"class and index); {('it lacks ' + missing[0]) if missing else 'it has neither'}.")
    episodes: dict[str, dict[str, Any]] = {}
    for line, row in enumerate(reader, start=2):
        role = (row.get("set") or "").strip().lower()
        if role not in ("support", "query"):
            raise SuiteError(f'{path} line {line}: set is "{row.get("set")}"; use support or query.')
        episode = episodes.setdefault(row["episode"], {"source": row["source"], "support": [], "query": []})
        if episode["source"] != row["source"]:
            raise SuiteError(f"{path} line {line}: episode {row['episode']} names two sources; keep one per episode.")
        item = {"label": row["label"]}
        where = {"file": row["file"]} if row.get("file") else {"class": row.get("class"), "index": row.get("index")}
        item.update(where)
        episode[role].append(item)
    return list(episodes.values())


def referenced_sources(episodes: Sequence[Mapping[str, Any]]) -> list[str]:
    """The source names an episode file uses, in first-use order."""
    return list(dict.fromkeys(str(e.get("source")) for e in episodes))


def _file_table(source: Source) -> dict[str, tuple[int, int]]:
    """A folder source's images by path (relative to its root, and absolute) -> (class id, index)."""
    path_of = getattr(source, "path_of", None)
    if path_of is None:
        return {}
    table = {}
    root = Path(getattr(source, "root", "."))
    for class_id in range(source.spec.num_classes):
        for index in range(source.spec.images_per_class[class_id]):
            full = Path(path_of(class_id, index))
            table[Path(os.path.relpath(full, root)).as_posix()] = (class_id, index)
            table[str(full)] = (class_id, index)
    return table


class _Resolver:
    """Turns the items of one source into (class id, index) pairs, with one-sentence errors."""

    def __init__(self, source: Source, where: str) -> None:
        self.source, self.where = source, where
        self.by_name = {source.spec.class_name(c): c for c in range(source.spec.num_classes)}
        self._files: dict[str, tuple[int, int]] | None = None

    def __call__(self, item: Any, k: int) -> Item:
        if isinstance(item, (list, tuple)):
            item = dict(zip(("file", "label") if len(item) == 2 else ("class", "index", "label"), item))
        if not isinstance(item, Mapping) or "label" not in item:
            raise SuiteError(f"{self.where} image {k}: give {{file, label}} or {{class, index, label}}.")
        label = _int(item["label"], f"{self.where} image {k} label")
        if item.get("file"):
            if self._files is None:
                self._files = _file_table(self.source)
            name = str(item["file"]).replace("\\", "/")
            found = self._files.get(name) or self._files.get(str(Path(name).resolve()))
            if found is None:
                why = "paths are relative to its root" if self._files else "not a folder source: give class and index"
                raise SuiteError(f'{self.where} names image "{name}", which source "{self.source.name}" does not hold '
                                 f"({why}); fix the path or add the image.")
            return found[0], found[1], label
        cls = str(item.get("class"))
        class_id = self.by_name.get(cls, _int(cls, f"{self.where} image {k} class") if cls.isdigit() else None)
        if class_id is None or not 0 <= class_id < self.source.spec.num_classes:
            raise SuiteError(f'{self.where} image {k}: source "{self.source.name}" has no class "{cls}".')
        index = _int(item.get("index"), f"{self.where} image {k} index")
        if not 0 <= index < self.source.spec.images_per_class[class_id]:
            raise SuiteError(f'{self.where} image {k}: class "{cls}" of "{self.source.name}" has '
                             f"{self.source.spec.images_per_class[class_id]} images, so index {index} does not exist.")
        return class_id, index, label


def _int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SuiteError(f'{what} is "{value}", not an integer.') from None


def _plan(index: int, episode: Mapping[str, Any], source: Source, split: Split, where: str) -> EpisodePlan:
    resolve = _Resolver(source, where)
    support = [resolve(item, k) for k, item in enumerate(episode.get("support") or [])]
    query = [resolve(item, k) for k, item in enumerate(episode.get("query") or [])]
    if not support or not query:
        raise SuiteError(f"{where} has no {'support' if not support else 'query'} images; give both sets.")
    class_of: dict[int, int] = {}
    for class_id, _, label in support + query:
        if class_of.setdefault(label, class_id) != class_id:
            raise SuiteError(f"{where}: label {label} names two classes; one label is one class.")
    way = len(class_of)
    if sorted(class_of) != list(range(way)) or len(set(class_of.values())) != way:
        raise SuiteError(f"{where}: labels must be 0..{way - 1}, each on its own class (found {sorted(class_of)}).")
    if {lab for *_, lab in query} - {lab for *_, lab in support}:
        raise SuiteError(f"{where}: a query label has no support images; every class needs support images.")
    class_ids = tuple(class_of[label] for label in range(way))

    def by_label(items: list[Item]) -> tuple[tuple[int, int], ...]:  # plans group pairs by label, in label order
        return tuple((c, i) for lab in range(way) for c, i, item_label in items if item_label == lab)

    shots = tuple(sum(1 for *_, lab in support if lab == k) for k in range(way))
    n_query = min(sum(1 for *_, lab in query if lab == k) for k in range(way))
    desc = EpisodeDescription(class_ids, shots, n_query)
    return EpisodePlan(index, source.name, split, desc, class_ids, by_label(support), by_label(query))


def import_suite(path: str | os.PathLike[str], name: str, sources: Mapping[str, Source],
                 directory: str | os.PathLike[str] | None = None) -> Suite:
    """Read an episode file, check every image against ``sources``, and write it as the frozen suite ``name``."""
    _check_name(name)
    path = Path(path)
    split, episodes = read_episode_file(path)
    missing = [s for s in referenced_sources(episodes) if s not in sources]
    if missing:
        raise SuiteError(f'{path} uses source "{missing[0]}", which is not given; define it (data.sources) or '
                         "name a registered one.")
    plans = [_plan(i, e, sources[str(e["source"])], split, f"{path} episode {i}") for i, e in enumerate(episodes)]
    used = {s: sources[s] for s in referenced_sources(episodes)}
    return _write_suite(name, split, plans, used, path.name, directory)


def _write_suite(name: str, split: Split, plans: Sequence[EpisodePlan], used: Mapping[str, Source], origin: str,
                 directory: str | os.PathLike[str] | None) -> Suite:
    fingerprints = {s: spec_fingerprint(src.spec) for s, src in used.items()}
    counts = [sum(p.source == s for p in plans) for s in used]
    doc = _header(name, split, SamplerConfig(), 0, max(counts), None, fingerprints)
    doc["imported_from"] = origin
    doc["episodes"] = [plan_to_json(p) for p in plans]
    doc["content_hash"] = _canonical_hash(doc)
    target = _write(Path(directory) if directory is not None else SUITES_DIR, name, _encode(doc))
    return load_suite(target, used)


def import_md_dump(folder: str | os.PathLike[str], name: str, data_dir: str | os.PathLike[str], *,
                   image_size: int = 84, directory: str | os.PathLike[str] | None = None) -> tuple[Path, Suite]:
    """Meta-Dataset's dumped episodes (``episodes.md_dump``): their images to ``<data_dir>/<name>.h5`` and their
    composition to the frozen suite ``name``. Returns the packed file and the suite."""
    from episodes.convert import convert_source
    from episodes.md_dump import DumpedEpisodes
    from episodes.readers.hdf5 import PackedHDF5

    _check_name(name)
    dump = DumpedEpisodes(folder, name=name, image_size=image_size)
    h5 = convert_source(dump, Path(data_dir) / f"{name}.h5", progress=False)
    packed = PackedHDF5(h5, name=name, domain="ood")
    plans = []
    for i, ((class_ids, queries), shots) in enumerate(zip(dump.episodes, dump.shots)):
        support = tuple((c, j) for c, k in zip(class_ids, shots) for j in range(k))
        query = tuple((c, k + j) for c, k, q in zip(class_ids, shots, queries) for j in range(q))
        desc = EpisodeDescription(tuple(class_ids), tuple(shots), min(queries))
        plans.append(EpisodePlan(i, name, Split.TEST, desc, tuple(class_ids), support, query))
    return h5, _write_suite(name, Split.TEST, plans, {name: packed}, Path(folder).name, directory)


def _check_name(name: str) -> None:
    if not name or any(ch in name for ch in "/\\") or name.startswith("."):
        raise SuiteError(f'Suite name "{name}" must be a plain file name (letters, digits, "-" or "_").')
