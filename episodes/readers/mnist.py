"""MNIST and Fashion-MNIST as out-of-distribution test sources, following CNAPs' extra datasets.

CNAPs (which Meta-Dataset's README points to for MNIST) uses the 10,000-image test set, puts all
10 classes in the TEST split and upsamples 28 px to 84 px with LANCZOS. The data comes from
packages, never the network: MNIST's idx test files ship with metabench (``episodes/data/mnist``),
Fashion-MNIST's in Debian's ``dataset-fashion-mnist``. Upsampled pixels are cached once and memory-mapped, like noto's.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from episodes.readers.base import Source, cache_dir
from episodes.readers.embedded import _atomic_save
from episodes.readers.glyphs import SEED
from episodes.spec import DatasetSpec
from episodes.split import Split

__all__ = ["MNIST", "FashionMNIST", "IdxTestSet", "read_idx"]

log = logging.getLogger(__name__)

VERSION = "idx-test-1"  # bump when the pixels change: it is part of the cache key
IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a (gzipped) idx file, the MNIST format: 2 zero bytes, a type code, a rank, then big-endian dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read this idx file ({e}); reinstall the package that provides it.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (bad magic number); reinstall it.")
    rank = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    start = 4 + 4 * rank
    if len(raw) - start != int(np.prod(dims)):
        raise ValueError(f"{path}: holds {len(raw) - start} bytes of data but its header says {dims}; reinstall it.")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


class IdxTestSet(Source):
    """An MNIST-format test set as a test-only, out-of-distribution source (subclasses name the data).

    Args:
        root: a folder holding ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``;
            default: where the subclass's package installs them.
        size: native side length after LANCZOS upsampling (84, as CNAPs).
        cache: cache directory; default ``cache_dir() / "embedded"``.
    """

    domain = "ood"
    class_labels: tuple[str, ...] = ()
    install_hint: str = ""

    def __init__(self, root: str | None = None, *, size: int = 84, cache: str | os.PathLike[str] | None = None) -> None:
        if size < 1:
            raise ValueError(f"{self.name}: size={size} must be a positive number of pixels.")
        folder = self.locate(root)
        self._size = size
        files = [folder / IMAGES, folder / LABELS]
        from PIL import __version__ as pil_version

        key_data = {"version": VERSION, "name": self.name, "size": size, "files": _file_digest(files),
                    "pillow": pil_version}
        key = hashlib.sha1(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:12]
        where = Path(cache) if cache is not None else cache_dir() / "embedded"
        self._npy, self._meta = where / f"{self.name}-{key}.npy", where / f"{self.name}-{key}.json"
        self._images: np.ndarray | None = None
        counts = self._load_cached() or self._decode(files, key_data)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.spec = DatasetSpec(
            name=self.name,
            classes_per_split={Split.TRAIN: 0, Split.VALID: 0, Split.TEST: len(counts)},
            images_per_class={c: int(n) for c, n in enumerate(counts)},
            class_names=dict(enumerate(self.class_labels)),
        )

    @classmethod
    def default_root(cls) -> Path | None:
        """Where the providing package installs the idx files (None when it is not installed)."""
        raise NotImplementedError

    @classmethod
    def locate(cls, root: str | os.PathLike[str] | None = None) -> Path:
        """The folder with the idx test files; FileNotFoundError (one sentence saying what to install) if absent."""
        folder = Path(root) if root is not None else cls.default_root()
        if folder is None or not all((folder / f).is_file() for f in (IMAGES, LABELS)):
            where = f"{folder} lacks {IMAGES} or {LABELS}" if folder is not None else "its data is not installed"
            raise FileNotFoundError(
                f"{cls.name}: {where}; {cls.install_hint} (or pass root= a folder holding the idx test files)."
            )
        return folder

    def _load_cached(self) -> list[int] | None:
        if not (self._meta.exists() and self._npy.exists()):
            return None
        try:
            counts = [int(n) for n in json.loads(self._meta.read_text(encoding="utf-8"))["counts"]]
            images = np.load(self._npy, mmap_mode="r")
            if images.shape != (sum(counts), self._size, self._size) or images.dtype != np.uint8:
                raise ValueError(f"array {images.shape} {images.dtype} does not match the counts")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: cache %s is unusable (%s); decoding again", self.name, self._npy, e)
            return None
        self._images = images
        return counts

    def _decode(self, files: Sequence[Path], key_data: dict[str, Any]) -> list[int]:
        from PIL import Image

        images, labels = read_idx(files[0]), read_idx(files[1])
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"{files[0].parent}: images {images.shape} and labels {labels.shape} do not match.")
        n_classes = len(self.class_labels)
        # Each class in a fixed shuffled order (never the file's order), as every embedded source.
        order = np.concatenate([
            np.random.default_rng([SEED, c]).permutation(np.flatnonzero(labels == c)) for c in range(n_classes)
        ])
        size = (self._size, self._size)
        out = np.stack([np.asarray(Image.fromarray(images[i]).resize(size, Image.LANCZOS)) for i in order])
        counts = np.bincount(labels, minlength=n_classes).tolist()
        self._npy.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(self._npy, lambda f: np.save(f, out))
        meta = dict(key_data, counts=counts)
        _atomic_save(self._meta, lambda f: f.write(json.dumps(meta, indent=1).encode()))  # written last: the marker
        log.info("%s: decoded and upsampled %d test images to %d px", self.name, len(out), self._size)
        self._images = out
        return counts

    @property
    def native_size(self) -> tuple[int, int]:
        return (self._size, self._size)

    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        idx = self._check_read(class_id, indices)
        if self._images is None:  # after unpickling in a worker process
            self._images = np.load(self._npy, mmap_mode="r")
        grey = self._images[self._offsets[class_id] + idx]
        return np.repeat(grey[..., None], 3, axis=-1)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # workers reopen the memory map instead of receiving the pixels
        state["_images"] = None
        return state


class MNIST(IdxTestSet):
    """MNIST's 10,000 test digits (white on black), 10 TEST classes, 84 px: CNAPs' extra dataset."""

    name = "mnist"
    class_labels = tuple(str(d) for d in range(10))
    install_hint = "they ship with metabench in episodes/data/mnist: reinstall it with `pip install -e .`"

    @classmethod
    def default_root(cls) -> Path | None:
        folder = Path(__file__).resolve().parent.parent / "data" / "mnist"  # package data of ``episodes``
        return folder if folder.is_dir() else None


class FashionMNIST(IdxTestSet):
    """Fashion-MNIST's 10,000 test images of clothing, 10 TEST classes, 84 px, set up like MNIST."""

    name = "fashion_mnist"
    class_labels = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")
    install_hint = "install Debian's package with `apt-get install dataset-fashion-mnist`"

    @classmethod
    def default_root(cls) -> Path | None:
        folder = Path("/usr/share/datasets/fashion-mnist")
        return folder if folder.is_dir() else None
