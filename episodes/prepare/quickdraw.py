"""QuickDraw: one ``<class>.npy`` of 28 x 28 bitmaps per class (Google's ``numpy_bitmap`` files).

Upstream keeps every drawing of a class (no subsampling), in file order, and does not invert them (white strokes
on black); a boolean array is scaled to 0/255. The class name is the file name up to its first dot. A class's file
is memory-mapped when it lies on disk, so a 300,000-drawing class is never read whole.
"""

from __future__ import annotations

import ast
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from episodes.prepare.inputs import InputNotFound, InputTree, PrepareError
from episodes.prepare.md_splits import SPLIT_ORDER, select, split_lists
from episodes.prepare.source import Plan, PreparedClass

__all__ = ["quickdraw"]

_HEADER = 4096  # a .npy header is at most this long (format versions 1-3)


class _Rows(Sequence[tuple[str, int]]):
    """The items of one class, (file, row), without a tuple per drawing (QuickDraw has 50 million)."""

    def __init__(self, path: str, n: int) -> None:
        self.path, self.n = path, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [(self.path, r) for r in range(self.n)[i]]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return (self.path, int(i) % self.n)


def _shape(tree: InputTree, path: str) -> tuple[int, ...]:
    """The array shape in a .npy header, read without loading the data."""
    head = tree.read_head(path, _HEADER)
    try:
        if not head.startswith(b"\x93NUMPY"):
            raise ValueError("no .npy magic")
        major = head[6]
        length = int.from_bytes(head[8:10] if major == 1 else head[8:12], "little")
        start = 10 if major == 1 else 12
        header = ast.literal_eval(head[start : start + length].decode("latin1"))
        return tuple(int(n) for n in header["shape"])
    except (ValueError, SyntaxError, KeyError, IndexError, TypeError) as e:
        raise PrepareError(f'"{path}" of {tree.origin(path)} is not a NumPy .npy file ({e}); download it '
                           "again.") from None


class _Loader:
    """Rows of the class file being converted; the file is opened once per class, as classes are read in turn."""

    def __init__(self, tree: InputTree) -> None:
        self.tree = tree
        self.path: str | None = None
        self.array: np.ndarray | None = None

    def _array(self, path: str) -> np.ndarray:
        if self.path != path or self.array is None:
            local = self.tree.local_path(path)
            try:
                if local is not None:
                    self.array = np.load(local, mmap_mode="r", allow_pickle=False)
                else:
                    self.array = np.load(io.BytesIO(self.tree.read(path)), allow_pickle=False)
            except (ValueError, OSError) as e:
                raise PrepareError(f'"{path}" of {self.tree.origin(path)} cannot be read as a .npy array ({e}); '
                                   "download it again.") from None
            self.path = path
        return self.array

    def __call__(self, item: tuple[str, int], size: int) -> np.ndarray:
        path, row = item
        pixels = np.asarray(self._array(path)[row]).reshape(-1)
        side = math.isqrt(pixels.size)
        if pixels.dtype == np.bool_:
            pixels = pixels.astype(np.uint8) * 255  # upstream: 0-1 bitmaps become 0-255
        return pixels.reshape(side, side).astype(np.uint8, copy=False)


def quickdraw(tree: InputTree, *, allow_missing: bool = False) -> Plan:
    """QuickDraw's ``numpy_bitmap`` files (a folder, or an archive, of ``<class>.npy``)."""
    files: dict[str, str] = {}
    for path in tree:
        base = path.rpartition("/")[2]
        if base.endswith(".npy"):
            name = base[: base.find(".")]
            if name in files:
                raise PrepareError(f'Both "{files[name]}" and "{path}" hold QuickDraw class "{name}"; pass one '
                                   "folder of .npy files.")
            files[name] = path
    if not files:
        raise InputNotFound(f"The inputs ({tree.describe()}) hold no .npy files; pass the folder of QuickDraw's "
                            "numpy_bitmap files (<class>.npy).")
    chosen, missing = select("quickdraw", split_lists("quickdraw"), files, allow_missing=allow_missing)
    classes, side = [], None
    for split in SPLIT_ORDER:
        for name, path in chosen[split]:
            shape = _shape(tree, path)
            pixels = int(np.prod(shape[1:])) if len(shape) > 1 else 0
            if len(shape) < 2 or math.isqrt(pixels) ** 2 != pixels:
                raise PrepareError(f'"{path}" holds an array of shape {shape}, not one square bitmap per row; '
                                   "pass QuickDraw's numpy_bitmap files.")
            side = side or math.isqrt(pixels)
            classes.append(PreparedClass(name, split, _Rows(path, shape[0])))
    return Plan(classes, _Loader(tree), native=side, missing=missing)
