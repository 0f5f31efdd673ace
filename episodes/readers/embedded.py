"""Embedded sources: few-shot data that installs with the project, so every command runs offline.

``noto`` is an Omniglot-like character set rendered from the Noto fonts that install from PyPI
(scripts are the superclasses, as alphabets are in Omniglot); ``digits`` is scikit-learn's
bundled 8x8 digits, an out-of-distribution test-only source like CNAPs' MNIST.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from episodes.atomic import atomic_path
from episodes.readers import glyphs
from episodes.readers.base import Source, cache_dir
from episodes.readers.glyphs import NOTO_SCRIPTS
from episodes.spec import DatasetSpec
from episodes.split import Split

__all__ = ["NOTO_SCRIPTS", "SCRIPT_CLASS_SPLIT", "NotoGlyphs", "NotoScript", "SklearnDigits"]

log = logging.getLogger(__name__)


def _atomic_save(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary file renamed onto ``path`` (``episodes.atomic``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


class NotoGlyphs(Source):
    """Omniglot-like characters rendered from the Noto fonts: classes are (script, letter), scripts are superclasses.

    Each class has ``instances`` images (20, like Omniglot's 20 drawers) that vary font family,
    weight and width axes, italics, and a small rotation/scale/shift. Rendering takes a few
    seconds once; the result is cached under ``$METABENCH_CACHE/embedded`` and memory-mapped.

    Args:
        root: unused (the data installs with the project); accepted like every source factory.
        scripts: a subset of ``NOTO_SCRIPTS`` (tests use this); default all nine.
        instances: images per class.
        cache: cache directory; default ``cache_dir() / "embedded"``.
    """

    name = "noto"
    domain = "id"
    render_seconds: float = 0.0  # time of the first render (kept in the cache metadata)

    def __init__(
        self,
        root: str | None = None,
        *,
        scripts: Sequence[str] | None = None,
        instances: int = 20,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        unknown = sorted(set(scripts or ()) - set(NOTO_SCRIPTS))
        if unknown:
            raise ValueError(f'noto: unknown script "{unknown[0]}"; choose from {", ".join(NOTO_SCRIPTS)}.')
        if instances < 2:
            raise ValueError(f"noto: instances={instances}; a few-shot class needs at least 2 images.")
        self.scripts = [s for s in NOTO_SCRIPTS if scripts is None or s in scripts]
        self.instances = instances
        self._params = glyphs.RenderParams()
        key_data = {"version": glyphs.VERSION, "scripts": self.scripts, "instances": instances,
                    "render": dataclasses.asdict(self._params), "libs": glyphs.library_versions()}
        key = hashlib.sha1(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:12]
        folder = Path(cache) if cache is not None else cache_dir() / "embedded"
        self._npy = folder / f"noto-{key}.npy"
        self._meta = folder / f"noto-{key}.json"
        self._images: np.ndarray | None = None
        self.classes = self._load_or_render(key_data)
        self.spec = self._build_spec()

    def _load_or_render(self, key_data: dict[str, Any]) -> list[tuple[str, int]]:
        if self._meta.exists() and self._npy.exists():
            try:
                meta = json.loads(self._meta.read_text(encoding="utf-8"))
                classes = [(str(s), int(cp)) for s, cp in meta["classes"]]
                images = np.load(self._npy, mmap_mode="r")
                expected = (len(classes) * self.instances, self._params.size, self._params.size)
                if images.shape != expected or images.dtype != np.uint8:
                    raise ValueError(f"array {images.shape} {images.dtype}, expected {expected} uint8")
                self._images = images
                self.render_seconds = float(meta.get("render_seconds", 0.0))
                return classes
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("noto: cache %s is unusable (%s); rendering again", self._npy, e)
        return self._render(key_data)

    def _render(self, key_data: dict[str, Any]) -> list[tuple[str, int]]:
        start = time.perf_counter()
        with glyphs.RENDER_LOCK:
            classes = glyphs.select_classes(self.scripts, self._params)
            images = glyphs.render_all(classes, self.instances, self._params)
        self.render_seconds = time.perf_counter() - start
        log.info("noto: rendered %d classes x %d instances in %.1f s", len(classes), self.instances,
                 self.render_seconds)
        self._npy.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(self._npy, lambda f: np.save(f, images))
        meta = dict(key_data, classes=classes, render_seconds=round(self.render_seconds, 3))
        _atomic_save(self._meta, lambda f: f.write(json.dumps(meta, indent=1).encode()))  # written last: the marker
        self._images = images
        return classes

    def _build_spec(self) -> DatasetSpec:
        per_script = {s: sum(1 for c in self.classes if c[0] == s) for s in self.scripts}
        split_counts = {split: 0 for split in Split}
        super_counts = {split: 0 for split in Split}
        for s in self.scripts:
            split_counts[NOTO_SCRIPTS[s].split] += per_script[s]
            super_counts[NOTO_SCRIPTS[s].split] += 1
        return DatasetSpec(
            name=self.name,
            classes_per_split=split_counts,
            images_per_class={i: self.instances for i in range(len(self.classes))},
            class_names={i: glyphs.class_name(s, cp) for i, (s, cp) in enumerate(self.classes)},
            superclasses_per_split=super_counts,
            classes_per_superclass={i: per_script[s] for i, s in enumerate(self.scripts)},
        )

    @property
    def native_size(self) -> tuple[int, int]:
        return (self._params.size, self._params.size)

    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        idx = self._check_read(class_id, indices)
        if self._images is None:  # after unpickling in a worker process
            self._images = np.load(self._npy, mmap_mode="r")
        grey = self._images[class_id * self.instances + idx]
        return np.repeat(grey[..., None], 3, axis=-1)

    def __getstate__(self) -> dict[str, Any]:
        # Workers reopen the memory map instead of receiving a pickled copy of every glyph.
        state = self.__dict__.copy()
        state["_images"] = None
        return state


class SklearnDigits(Source):
    """scikit-learn's 1,797 bundled 8x8 digits, 10 classes all in TEST, upsampled to 84 px.

    Grey levels 0..16 are scaled to 0..255 (white digits on black, as stored). An
    out-of-distribution source: tiny, blurry and unlike any training domain.

    Args:
        root: unused (the data ships with scikit-learn).
        size: native side length after bilinear upsampling.
    """

    name = "digits"
    domain = "ood"

    def __init__(self, root: str | None = None, *, size: int = 84) -> None:
        import torch
        from sklearn.datasets import load_digits
        from torch.nn import functional as F

        digits = load_digits()
        order = np.concatenate([
            np.random.default_rng([glyphs.SEED, c]).permutation(np.flatnonzero(digits.target == c)) for c in range(10)
        ])
        counts = np.bincount(digits.target, minlength=10)
        low = torch.from_numpy(digits.images[order].astype(np.float32) * (255.0 / 16.0))[:, None]
        high = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        self._images = high[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._size = size
        self.spec = DatasetSpec(
            name=self.name,
            classes_per_split={Split.TRAIN: 0, Split.VALID: 0, Split.TEST: 10},
            images_per_class={c: int(counts[c]) for c in range(10)},
            class_names={c: str(c) for c in range(10)},
        )

    @property
    def native_size(self) -> tuple[int, int]:
        return (self._size, self._size)

    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        idx = self._check_read(class_id, indices)
        grey = self._images[self._offsets[class_id] + idx]
        return np.repeat(grey[..., None], 3, axis=-1)


#: Class shares (train, valid, test) of a training script split by class in ``NotoScript``.
SCRIPT_CLASS_SPLIT: tuple[float, float, float] = (0.6, 0.15, 0.25)


class NotoScript(Source):
    """One Noto script as a source of its own (``noto_<script>``), for multi-domain meta-training.

    ``noto`` splits by script, as Omniglot by alphabet; here each script is a domain. A training script
    of ``noto`` splits its classes (seeded, ``SCRIPT_CLASS_SPLIT``): meta-training draws from the train
    classes, and its held-out test classes are in-domain. Every other script (Telugu, Greek, Khmer, Tamil)
    keeps all its classes in the test split and is out of domain: unseen scripts near the training ones.
    The glyphs are ``NotoGlyphs``' (one render and cache for all scripts).

    Args:
        root: unused (the data installs with the project).
        script: a key of ``NOTO_SCRIPTS``.
        cache: cache directory of the rendered glyphs; default ``cache_dir() / "embedded"``.
    """

    def __init__(self, root: str | None = None, *, script: str = "latin",
                 cache: str | os.PathLike[str] | None = None) -> None:
        if script not in NOTO_SCRIPTS:
            raise ValueError(f'noto: unknown script "{script}"; choose from {", ".join(NOTO_SCRIPTS)}.')
        self.name = f"noto_{script}"
        self.glyphs = NotoGlyphs(cache=cache)
        own = [i for i, (s, _) in enumerate(self.glyphs.classes) if s == script]
        if NOTO_SCRIPTS[script].split == Split.TRAIN:
            self.domain = "id"
            order = np.random.default_rng([glyphs.SEED, len(own), list(NOTO_SCRIPTS).index(script)]).permutation(own)
            n_train, n_valid = (round(share * len(own)) for share in SCRIPT_CLASS_SPLIT[:2])
            counts = {Split.TRAIN: n_train, Split.VALID: n_valid, Split.TEST: len(own) - n_train - n_valid}
            self._classes = [int(c) for c in order]  # train, then valid, then test: MD's global id order
        else:
            self.domain = "ood"
            counts = {Split.TRAIN: 0, Split.VALID: 0, Split.TEST: len(own)}
            self._classes = own
        self.spec = DatasetSpec(
            name=self.name, classes_per_split=counts,
            images_per_class={i: self.glyphs.instances for i in range(len(self._classes))},
            class_names={i: self.glyphs.spec.class_names[c] for i, c in enumerate(self._classes)})

    @property
    def native_size(self) -> tuple[int, int]:
        return self.glyphs.native_size

    def read(self, class_id: int, indices: Sequence[int]) -> np.ndarray:
        idx = self._check_read(class_id, indices)
        return self.glyphs.read(self._classes[class_id], idx)


def _script_source(script: str) -> Any:
    def make(root: str | None = None, **options: Any) -> NotoScript:
        return NotoScript(root, script=script, **options)
    make.__doc__ = f"Noto's {script.capitalize()} script as a source of its own (see ``NotoScript``)."
    return make


noto_latin, noto_cyrillic, noto_arabic, noto_devanagari, noto_thai, noto_telugu, noto_greek, noto_khmer, noto_tamil = (
    _script_source(s) for s in NOTO_SCRIPTS)
