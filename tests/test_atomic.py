"""The one write-to-temp-then-rename helper: old or new content, never half, nothing left behind."""

from __future__ import annotations

import os

import pytest

from episodes.atomic import atomic_path, atomic_write


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "sub" / "file.json"
    atomic_write(target, "old")
    atomic_write(target, b"new", fsync=True)
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["file.json"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # usual permissions, not mkstemp's


def test_a_failed_write_keeps_the_old_file(tmp_path) -> None:
    target = tmp_path / "file.txt"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["file.txt"]
