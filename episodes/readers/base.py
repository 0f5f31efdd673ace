"""The Source interface: one image collection with a DatasetSpec, read by class and index.

Readers differ (TFRecords, HDF5, folders, embedded arrays), but the loader only ever asks
"these images of this class", so every reader returns the same uint8 HWC arrays.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from episodes.spec import DatasetSpec

__all__ = ["Source", "cache_dir"]


def cache_dir() -> Path:
    """Where derived data (rendered glyphs, indexes) is kept: ``$METABENCH_CACHE`` or ``~/.cache/metabench``."""
    root = os.environ.get("METABENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "metabench")
    return Path(root)


class Source(ABC):
    """One data source: its name, default role and spec, and a reader for its images.

    Attributes:
        name: registry name, also written into every episode and results row.
        domain: "id" when the source is meant for meta-training (its test split is in-domain),
            "ood" when it is held out entirely; a run may override the role.
        spec: the class splits and per-class image counts the sampler works from.
    """

    name: str
    domain: str
    spec: DatasetSpec

    @abstractmethod
    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        """Images ``indices`` (0..n_c-1) of global class ``class_id`` as uint8 ``[k, H, W, 3]``, in that order."""

    @property
    @abstractmethod
    def native_size(self) -> tuple[int, int]:
        """(H, W) of the arrays ``read`` returns, before any resizing by the loader."""

    def _check_read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        """Validate a read request and return the indices as an int array (for subclasses)."""
        if class_id not in self.spec.images_per_class:
            raise IndexError(f'Source "{self.name}" has no class {class_id} (it has {self.spec.num_classes}).')
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.spec.images_per_class[class_id]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx.max() if idx.max() >= n else idx.min()
            raise IndexError(f'Source "{self.name}" class {class_id} has {n} images; index {bad} is out of range.')
        return idx

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, domain={self.domain!r}, classes={self.spec.num_classes})"
