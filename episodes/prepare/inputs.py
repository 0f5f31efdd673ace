"""The raw downloads of a source as one read-only tree of files, whatever form they come in.

A source's download is a few archives (``images_background.zip`` + ``images_evaluation.zip``), an unpacked folder,
or loose files (``imagelabels.mat``). ``InputTree`` mounts them side by side: an archive's members keep their stored
paths, a folder appears under its own name and a loose file at the top, so a converter finds ``images_background/``
or ``data/images_box.txt`` wherever the user unpacked it. Zip files and plain tars are read in place (random
access); a compressed tar cannot be, so its files are streamed once into a staging folder that ``close`` removes.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["InputNotFound", "InputTree", "PrepareError"]

log = logging.getLogger(__name__)

_COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_SKIPPED_TOPS = ("__MACOSX",)  # resource forks macOS adds to archives: never data


class PrepareError(ValueError):
    """Raw inputs that cannot be prepared; the message names the file or class and what to do, in one sentence."""


class InputNotFound(PrepareError, FileNotFoundError):
    """An input path, archive member or folder that is not there."""


class _Files:
    """Loose files and folders on disk: the key is the file's path."""

    def read(self, key: Any) -> bytes:
        return Path(key).read_bytes()

    def head(self, key: Any, n: int) -> bytes:
        with open(key, "rb") as f:
            return f.read(n)

    def local(self, key: Any) -> Path | None:
        return Path(key)

    def close(self) -> None:
        pass


class _Zip:
    """A zip file, opened lazily once per process (a forked worker must not share the parent's handle)."""

    def __init__(self, path: Path) -> None:
        self.path, self._zf, self._pid = path, None, -1

    def _handle(self) -> zipfile.ZipFile:
        if self._zf is None or self._pid != os.getpid():
            self._zf, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zf

    def read(self, key: Any) -> bytes:
        return self._handle().read(key)

    def head(self, key: Any, n: int) -> bytes:
        with self._handle().open(key) as f:
            return f.read(n)

    def local(self, key: Any) -> Path | None:
        return None

    def close(self) -> None:
        if self._zf is not None and self._pid == os.getpid():
            self._zf.close()
        self._zf = None


class _Tar:
    """An uncompressed tar read in place: the key is a member's (offset, size) in the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, key: Any) -> bytes:
        offset, size = key
        with open(self.path, "rb") as f:  # no handle kept: thousands of per-class tars never exhaust ulimit -n
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise PrepareError(f"{self.path} ends inside a member at byte {offset}; the archive is truncated, "
                               "download it again.")
        return data

    def head(self, key: Any, n: int) -> bytes:
        offset, size = key
        return self.read((offset, min(n, size)))

    def local(self, key: Any) -> Path | None:
        return None

    def close(self) -> None:
        pass


class _Window(io.RawIOBase):
    """Bytes ``start..start+size`` of an open file, seekable, so a tar inside a tar is read without copying."""

    def __init__(self, f: IO[bytes], start: int, size: int) -> None:
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, min(self.size, base + offset))
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _clean(name: str) -> str | None:
    """A member path as a relative POSIX path, or None for entries never read (unsafe paths, macOS forks)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts or parts[0] in _SKIPPED_TOPS:
        return None
    return "/".join(parts)


class InputTree:
    """The files of ``inputs`` (archives, folders, loose files) under one namespace of POSIX paths.

    Args:
        inputs: the downloads; an archive's members keep their paths, a folder ``X`` appears as ``X/...``, a file
            as its name.
        work_dir: where compressed tars are staged (created on demand, removed by ``close``).
        expand_tars: also open ``.tar`` files found inside the inputs (ImageNet's train tar holds one tar per
            class); their files appear under the tar's name without ``.tar``.
        progress: show a progress bar while a compressed tar is staged.
    """

    def __init__(self, inputs: Sequence[str | os.PathLike[str]], *, work_dir: str | os.PathLike[str],
                 expand_tars: bool = False, progress: bool = False) -> None:
        if not inputs:
            raise InputNotFound("No inputs were given; pass the downloaded archives or their unpacked folders.")
        self.inputs = [Path(p).expanduser() for p in inputs]
        self.work_dir = Path(work_dir)
        self.progress = progress
        self._boxes: list[Any] = [_Files()]
        self.members: dict[str, tuple[int, Any]] = {}
        self._origin: dict[str, Path] = {}
        self._dirs: dict[str, tuple[set[str], list[str]]] | None = None
        self._staged = 0
        try:
            for path in self.inputs:
                self._mount(path)
            if expand_tars:
                self._expand_tars()
        except BaseException:
            self.close()
            raise

    # -- mounting ------------------------------------------------------------------------------------------
    def _add(self, name: str, box: int, key: Any, origin: Path) -> None:
        clean = _clean(name)
        if clean is None:
            return
        if clean in self.members:
            raise PrepareError(f'Both {self._origin[clean]} and {origin} hold "{clean}"; pass each download once.')
        self.members[clean] = (box, key)
        self._origin[clean] = origin

    def _mount(self, path: Path) -> None:
        if not path.exists():
            raise InputNotFound(f"{path} does not exist; pass the downloaded archive or its unpacked folder.")
        lower = path.name.lower()
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
                dirnames.sort()
                rel = Path(dirpath).relative_to(path.parent)
                for f in filenames:
                    self._add(f"{rel.as_posix()}/{f}", 0, str(Path(dirpath) / f), path)
        elif lower.endswith(".zip"):
            self._mount_zip(path)
        elif lower.endswith(_COMPRESSED_TARS):
            self._stage_tar(path)
        elif lower.endswith(".tar"):
            self._mount_tar(path)
        else:
            self._add(path.name, 0, str(path), path)

    def _mount_zip(self, path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError) as e:
            raise PrepareError(f"{path} is not a readable zip file ({e}); download it again.") from None
        self._boxes.append(_Zip(path))
        for info in infos:
            self._add(info.filename, len(self._boxes) - 1, info.filename, path)

    def _mount_tar(self, path: Path, prefix: str = "", window: tuple[int, int] | None = None) -> None:
        """Index an uncompressed tar (or a tar stored inside one, at ``window``) for reads in place."""
        try:
            with open(path, "rb") as f:
                fileobj: IO[bytes] = f if window is None else io.BufferedReader(_Window(f, *window))
                base = 0 if window is None else window[0]
                with tarfile.open(fileobj=fileobj, mode="r:") as tf:
                    found = [(m.name, base + m.offset_data, m.size) for m in tf if m.isfile()]
        except (tarfile.TarError, OSError) as e:
            raise PrepareError(f"{path} is not a readable tar file ({e}); download it again.") from None
        box = next((i for i, b in enumerate(self._boxes) if isinstance(b, _Tar) and b.path == path), None)
        if box is None:
            self._boxes.append(_Tar(path))
            box = len(self._boxes) - 1
        for name, offset, size in found:
            self._add(prefix + name, box, (offset, size), path)

    def _stage_tar(self, path: Path) -> None:
        """Stream a compressed tar once into the staging folder (random reads into it would decompress it again)."""
        self._staged += 1
        target = self.work_dir / f"staged-{self._staged}-{path.name}"
        target.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "rb") as raw, self._bar(path) as bar:
                counted = _Counting(raw, bar)
                with tarfile.open(fileobj=counted, mode="r|*") as tf:
                    for member in tf:
                        clean = _clean(member.name)
                        if not member.isfile() or clean is None:
                            continue
                        dest = target / clean
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        source = tf.extractfile(member)
                        assert source is not None
                        with open(dest, "wb") as out:
                            shutil.copyfileobj(source, out, 1 << 20)
                        self._add(clean, 0, str(dest), path)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise PrepareError(f"{path} is not a readable compressed tar ({e}); download it again.") from None

    def _bar(self, path: Path) -> Any:
        from contextlib import nullcontext

        if not self.progress:
            return nullcontext(None)
        from tqdm.auto import tqdm

        return tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"unpack {path.name}")

    def _expand_tars(self) -> None:
        for name in sorted(n for n in self.members if n.lower().endswith(".tar")):
            box, key = self.members.pop(name)
            origin = self._origin.pop(name)
            prefix = name[: -len(".tar")] + "/"
            local = self._boxes[box].local(key)
            if local is not None:
                self._mount_tar(Path(local), prefix)
            else:
                offset, size = key
                self._mount_tar(self._boxes[box].path, prefix, window=(offset, size))
            log.debug("expanded %s from %s", name, origin)
        self._dirs = None

    # -- queries -------------------------------------------------------------------------------------------
    def _index(self) -> dict[str, tuple[set[str], list[str]]]:
        if self._dirs is None:
            dirs: dict[str, tuple[set[str], list[str]]] = {"": (set(), [])}
            for name in self.members:
                parent, _, leaf = name.rpartition("/")
                dirs.setdefault(parent, (set(), []))[1].append(leaf)
                while parent:
                    up, _, child = parent.rpartition("/")
                    entry = dirs.setdefault(up, (set(), []))
                    if child in entry[0]:
                        break
                    entry[0].add(child)
                    parent = up
            self._dirs = dirs
        return self._dirs

    def is_dir(self, path: str) -> bool:
        return path in self._index()

    def subdirs(self, path: str) -> list[str]:
        """Names of the folders directly in ``path`` ("" is the top), sorted."""
        return sorted(self._index().get(path, (set(), []))[0])

    def files(self, path: str) -> list[str]:
        """Names of the files directly in ``path``, sorted (as ``sorted(os.listdir)`` lists them)."""
        return sorted(self._index().get(path, (set(), []))[1])

    def find_dirs(self, name: str, where: Callable[[str], bool] | None = None) -> list[str]:
        """Folders whose path ends with ``name`` (which may hold slashes), shallowest first, filtered by ``where``."""
        hits = [d for d in self._index() if d == name or d.endswith("/" + name)]
        hits = [d for d in hits if where is None or where(d)]
        return sorted(hits, key=lambda d: (d.count("/"), d))

    def find_files(self, name: str) -> list[str]:
        """Files whose path ends with ``name``, shallowest first."""
        hits = [m for m in self.members if m == name or m.endswith("/" + name)]
        return sorted(hits, key=lambda m: (m.count("/"), m))

    def exists(self, path: str) -> bool:
        return path in self.members

    def read(self, path: str) -> bytes:
        """The bytes of file ``path``."""
        try:
            box, key = self.members[path]
        except KeyError:
            raise InputNotFound(f'"{path}" is not in the inputs ({self.describe()}); pass the complete '
                                "download.") from None
        try:
            return self._boxes[box].read(key)
        except (OSError, zipfile.BadZipFile) as e:
            raise PrepareError(f'"{path}" cannot be read from {self._origin[path]} ({e}); download it '
                               "again.") from None

    def read_head(self, path: str, n: int) -> bytes:
        """The first ``n`` bytes of file ``path`` (a .npy header) without reading the rest."""
        if path not in self.members:
            self.read(path)  # raises the one-sentence error
        box, key = self.members[path]
        return self._boxes[box].head(key, n)

    def local_path(self, path: str) -> Path | None:
        """The file on disk behind ``path`` when there is one (a folder's or a staged file), else None."""
        box, key = self.members[path]
        return self._boxes[box].local(key)

    def origin(self, path: str) -> Path:
        """The input (archive or folder) that holds ``path``."""
        return self._origin[path]

    def describe(self) -> str:
        return ", ".join(str(p) for p in self.inputs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.members)

    def close(self) -> None:
        """Close archives and remove the staging folder."""
        for box in self._boxes:
            box.close()
        staged = [p for p in self.work_dir.glob("staged-*")] if self.work_dir.is_dir() else []
        for p in staged:
            shutil.rmtree(p, ignore_errors=True)
        if self.work_dir.is_dir() and not any(self.work_dir.iterdir()):
            self.work_dir.rmdir()

    def __enter__(self) -> InputTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Counting(io.RawIOBase):
    """A read-only stream that advances a progress bar by the bytes read from it."""

    def __init__(self, f: IO[bytes], bar: Any) -> None:
        self.f, self.bar = f, bar

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.f.read(len(buffer))
        buffer[: len(data)] = data
        if self.bar is not None:
            self.bar.update(len(data))
        return len(data)
