"""Write-to-temp-then-rename, the one implementation every writer of the project uses.

A reader (another process, a resumed run, a crash) sees the old file or the new one, never half of it, and an
error or Ctrl-C while writing leaves no temporary file behind. Torch-free and dependency-free, so the data layer,
the core and the analysis package share it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is renamed onto ``path``.

    The parent folder is created. ``fsync`` flushes the file to disk before the rename (results files, where a
    power cut must not leave an empty file under the final name).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, fsync: bool = False) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
