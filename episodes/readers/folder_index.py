"""Listing image folders: the three layouts, exclusion lists, and the JSON index cache.

A folder source's class list (names, sorted files, super-categories) is built by scanning
``root/<class>/``, ``root/<superclass>/<class>/`` (Omniglot's released layout: alphabets, then characters)
or reading Meta-Album's ``labels.csv``, then cached as JSON under
``cache_dir()/index`` and checked against the folders' modification times, so a large folder is
listed once, not every run. The cache helpers are shared with the tfds reader.

An exclusion list leaves files out before the index is written, the way Meta-Dataset's ILSVRC
conversion drops ImageNet-train images that duplicate test images of other sources
(``ImageNet_CUBirds_duplicates.txt`` and the Caltech lists): a model meta-trained on a folder
must not have seen the images it is later tested on. That file format is read as is: one
relative path or file name per line, ``#`` starting a comment.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from episodes.atomic import atomic_write
from episodes.readers.base import cache_dir

__all__ = ["IMAGE_EXTENSIONS", "INDEX_VERSION", "LAYOUTS", "ClassFiles", "Exclusion", "FolderSourceError",
           "detect_layout", "index_path", "load_or_scan", "read_exclusion", "write_index"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
INDEX_VERSION = 1
LAYOUTS = ("auto", "folders", "nested", "meta_album")
_reported: set[tuple[str, int, tuple[str, ...]]] = set()  # exclusion outcomes already logged by this process


class FolderSourceError(ValueError):
    """Bad or missing data in a folder source; the message names the path and what to do."""


# -- index cache (shared with the tfds reader) ---------------------------------------------------
def index_path(kind: str, key: str) -> Path:
    """Where the index of one folder or dataset is cached (one file per location, refreshed in place)."""
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
    return cache_dir() / "index" / f"{kind}-{digest}.json"


def write_index(path: Path, stamp: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
    """Write an index atomically (temp file, then rename); a failure only costs a rescan next time."""
    try:
        atomic_write(path, json.dumps({"stamp": stamp, **payload}))
    except OSError as e:
        log.warning("Could not cache the index at %s (%s); the data will be listed again next time.", path, e)


# -- exclusion lists -----------------------------------------------------------------------------
class Exclusion:
    """Files to leave out of a folder source, matched against each image's path.

    An entry with a ``/`` is a path relative to the folder holding the class folders (``images/``
    for Meta-Album) or to the source root; an entry without one is a file name, matched in every
    class (as Meta-Dataset's conversion matches its duplicate lists).
    """

    def __init__(self, entries: Iterable[str], origin: str) -> None:
        self.entries = tuple(sorted(set(entries)))
        self.origin = origin
        # the content hash keys the index cache: a changed list is a different file list
        self.digest = hashlib.sha1("\n".join(self.entries).encode("utf-8")).hexdigest()[:16]
        self._names = frozenset(e for e in self.entries if "/" not in e)
        self._paths = frozenset(e for e in self.entries if "/" in e)

    def matches(self, rel: str, prefix: str) -> list[str]:
        """The entries that exclude ``rel`` (relative to the image folder, itself ``prefix`` under the root)."""
        found = [rel.rsplit("/", 1)[-1]] if rel.rsplit("/", 1)[-1] in self._names else []
        found += [p for p in {rel, posixpath.join(prefix, rel) if prefix else rel} if p in self._paths]
        return found

    def unmatched(self, excluded: Iterable[str], prefix: str) -> list[str]:
        """The entries that match none of the ``excluded`` files."""
        hit = {e for rel in excluded for e in self.matches(rel, prefix)}
        return [e for e in self.entries if e not in hit]


def _entry(line: str) -> str:
    """One list line without its comment, with ``/`` separators and no leading ``./``."""
    text = line.split("#", 1)[0].strip().replace("\\", "/")
    return posixpath.normpath(text) if text else ""


def read_exclusion(exclude: str | os.PathLike[str] | Sequence[str] | None, root: Path) -> Exclusion | None:
    """The exclusion list given as a text file (found as given, else under ``root``) or a list of entries.

    None, an empty list and a file of only comments all mean "exclude nothing".
    """
    if exclude is None:
        return None
    if isinstance(exclude, (str, os.PathLike)):
        path = Path(exclude).expanduser()
        if not path.is_absolute() and not path.exists() and (root / path).exists():
            path = root / path
        try:
            lines, origin = path.read_text(encoding="utf-8").splitlines(), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise FolderSourceError(f"Exclusion list {path} cannot be read ({e}); check the path "
                                    "(a text file with one file name or relative path per line).") from None
    elif isinstance(exclude, Iterable):
        lines, origin = [str(x) for x in exclude], "exclude=[...]"
    else:
        raise FolderSourceError(f"exclude must be a text file or a list of file names, not {type(exclude).__name__}.")
    entries = [e for e in map(_entry, lines) if e and e != "."]
    return Exclusion(entries, origin) if entries else None


def _prefix(base: Path, root: Path) -> str:
    """Where the image folder is under the root, as a ``/`` path ("" for the root itself)."""
    rel = Path(os.path.relpath(base, root)).as_posix()
    return "" if rel == "." else rel


def _keep(files: Iterable[str], exclusion: Exclusion | None, prefix: str, dropped: list[str]) -> list[str]:
    if exclusion is None:
        return list(files)
    kept = []
    for rel in files:
        (dropped if exclusion.matches(rel, prefix) else kept).append(rel)
    return kept


# -- scanning ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassFiles:
    """One class of a folder source."""

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


def _scan_folders(root: Path, exclusion: Exclusion | None, dropped: list[str]) -> tuple[Path, list[ClassFiles]]:
    base = _find_class_root(root)
    prefix = _prefix(base, root)
    classes = []
    for d in _subdirs(base):
        files = sorted(f"{d.name}/{e.name}" for e in os.scandir(d) if e.is_file() and _is_image(e.name))
        if not files:
            raise FolderSourceError(
                f"Class folder {d} has no images (.jpg, .png, ...); add images or remove the folder."
            )
        kept = _keep(files, exclusion, prefix, dropped)
        if not kept:
            raise FolderSourceError(f"The exclusion list excludes every image of class folder {d}; "
                                    "remove the folder or shorten the list.")
        classes.append(ClassFiles(d.name, tuple(kept)))
    return base, classes


def _scan_nested(root: Path, exclusion: Exclusion | None, dropped: list[str]) -> tuple[Path, list[ClassFiles]]:
    """``root/<superclass>/<class>/*``: a class is named ``<superclass>/<class>`` (Omniglot's ``character01`` recurs
    in every alphabet), its superclass is the folder above it."""
    classes = []
    for sup in _subdirs(root):
        if _has_images(sup):
            raise FolderSourceError(f"Folder {sup} holds images beside its class folders; the nested layout needs "
                                    f"{root}/<superclass>/<class>/<images> (move them into a class folder).")
        for d in _subdirs(sup):
            files = sorted(f"{sup.name}/{d.name}/{e.name}" for e in os.scandir(d) if e.is_file() and _is_image(e.name))
            if not files:
                raise FolderSourceError(f"Class folder {d} has no images (.jpg, .png, ...); add images or remove it.")
            kept = _keep(files, exclusion, "", dropped)
            if not kept:
                raise FolderSourceError(f"The exclusion list excludes every image of class folder {d}; "
                                        "remove the folder or shorten the list.")
            classes.append(ClassFiles(f"{sup.name}/{d.name}", tuple(kept), sup.name))
    if not classes:
        raise FolderSourceError(f"Folder {root} has no <superclass>/<class>/ folders with images; "
                                "use layout=folders for one folder per class.")
    return root, classes


def _scan_meta_album(root: Path, exclusion: Exclusion | None, dropped: list[str]) -> tuple[Path, list[ClassFiles]]:
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
    if exclusion is not None:  # before the presence check: an excluded file may already be deleted
        keep = set(_keep((name for name, _, _ in rows), exclusion, "images", dropped))
        emptied = sorted({cat for _, cat, _ in rows} - {cat for name, cat, _ in rows if name in keep})
        if emptied:
            raise FolderSourceError(f'The exclusion list excludes every image of category "{emptied[0]}" in '
                                    f"{labels}; delete its rows or shorten the list.")
        rows = [row for row in rows if row[0] in keep]
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
    classes = [ClassFiles(c, tuple(sorted(files[c])), supers[c]) for c in sorted(files)]
    return base, classes


def _looks_nested(root: Path) -> bool:
    """No images one level down, and two or more folders whose own sub-folders hold images."""
    subdirs = _subdirs(root)
    if any(_has_images(d) for d in subdirs):
        return False
    return sum(any(_has_images(c) for c in _subdirs(d)[:1]) for d in subdirs) >= 2


def detect_layout(root: Path, layout: str) -> str:
    """``layout``, or for ``"auto"`` the one ``root`` is in: a labels.csv means Meta-Album, class folders grouped
    in two or more superclass folders mean ``nested``, else class folders."""
    if layout not in LAYOUTS:
        raise ValueError(f'Folder layout "{layout}" is unknown; use one of {", ".join(LAYOUTS)}.')
    if layout != "auto":
        return layout
    if (root / "labels.csv").is_file():
        return "meta_album"
    return "nested" if _looks_nested(root) else "folders"


def _stamp(root: Path, layout: str, watched: Sequence[str], exclusion: Exclusion | None) -> dict[str, Any]:
    """What the cached index depends on: the folders' (and labels.csv's) modification times."""
    times = {rel: os.stat(root / rel).st_mtime_ns for rel in watched}
    stamp = {"version": INDEX_VERSION, "root": str(root), "layout": layout, "mtimes": times,
             "extensions": sorted(IMAGE_EXTENSIONS)}
    if exclusion is not None:  # absent without a list, so indexes written before exclusion existed stay valid
        stamp["exclude"] = exclusion.digest
    return stamp


def _watched(root: Path, base: Path, layout: str, classes: Sequence[ClassFiles]) -> list[str]:
    if layout == "meta_album":
        return [".", "labels.csv", "images"]
    if layout == "nested":
        return [".", *dict.fromkeys(str(c.superclass) for c in classes), *(c.name for c in classes)]
    prefix = os.path.relpath(base, root)
    parts = [] if prefix == "." else Path(prefix).parts
    between = [os.path.join(*parts[: k + 1]) for k in range(len(parts))]  # every folder down to the classes
    return [".", *between, *(os.path.normpath(os.path.join(prefix, c.name)) for c in classes)]


def load_or_scan(root: Path, layout: str,
                 exclusion: Exclusion | None = None) -> tuple[Path, list[ClassFiles], int, str]:
    """(image base folder, classes, files excluded, layout) of ``root``, from the cached index when nothing has
    changed since it was written. The exclusion list's hash is part of the cache key. ``layout="auto"`` is
    resolved on a scan (``detect_layout``) and remembered in the index, so a valid index costs no listing."""
    if layout == "auto" and (root / "labels.csv").is_file():
        layout = "meta_album"
    key = f"{root}|{layout}" if exclusion is None else f"{root}|{layout}|exclude={exclusion.digest}"
    path = index_path("folder", key)
    try:  # only stat() calls here: a valid index costs no directory listing
        cached = json.loads(path.read_text(encoding="utf-8"))
        fresh = cached["stamp"] == _stamp(root, layout, list(cached["stamp"]["mtimes"]), exclusion)
    except (OSError, ValueError, KeyError, TypeError):
        fresh = False
    if fresh:
        classes = [ClassFiles(c["name"], tuple(c["files"]), c.get("superclass")) for c in cached["classes"]]
        log.debug("Folder %s: %d classes from the cached index %s", root, len(classes), path)
        base, excluded, unmatched = root / cached["base"], int(cached.get("excluded", 0)), cached.get("unmatched", [])
        found = cached.get("layout", layout)
    else:
        dropped: list[str] = []
        found = detect_layout(root, layout)
        scan = {"meta_album": _scan_meta_album, "nested": _scan_nested}.get(found, _scan_folders)
        base, classes = scan(root, exclusion, dropped)
        excluded, unmatched = len(dropped), []
        if exclusion is not None:
            unmatched = exclusion.unmatched(dropped, _prefix(base, root))
        payload = {"base": os.path.relpath(base, root), "excluded": excluded, "unmatched": unmatched, "layout": found,
                   "classes": [{"name": c.name, "files": list(c.files), "superclass": c.superclass} for c in classes]}
        write_index(path, _stamp(root, layout, _watched(root, base, found, classes), exclusion), payload)
        log.info("Folder %s: indexed %d classes, %d images", root, len(classes), sum(len(c.files) for c in classes))
    if exclusion is not None:
        _report(root, exclusion, excluded, unmatched)
    return base, classes, excluded, found


def _report(root: Path, exclusion: Exclusion, excluded: int, unmatched: Sequence[str]) -> None:
    """Log the exclusion outcome once per process (sources are opened again by workers and tools)."""
    key = (f"{root}|{exclusion.digest}", excluded, tuple(unmatched))
    if key in _reported:
        return
    _reported.add(key)
    log.info("Folder %s: excluded %d file(s) listed in %s", root, excluded, exclusion.origin)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (", ..." if len(unmatched) > 5 else "")
        log.warning("Folder %s: %d of %d exclusion entries in %s match no image (%s); they were ignored, "
                    "check them for typos or a different folder layout.",
                    root, len(unmatched), len(exclusion.entries), exclusion.origin, shown)
