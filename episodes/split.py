"""The class split of a source (train / valid / test), in a module of its own so that reading configs, specs and
samplers never imports torch."""

from __future__ import annotations

from enum import Enum

__all__ = ["Split"]


class Split(str, Enum):
    """Class split of a source, as in Meta-Dataset's ``dataset_spec.json``."""

    TRAIN = "train"
    VALID = "valid"
    TEST = "test"
