"""DatasetSpec: which classes a source has, in which split, and how many images each holds.

The sampler needs only these counts, never the images, so episodes can be planned (and frozen
suites hashed) without touching the data. The JSON form reads and writes Meta-Dataset's
``dataset_spec.json`` so converted MD sources need no separate metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from episodes.atomic import atomic_write
from episodes.split import Split

__all__ = ["DatasetSpec", "SpecError", "parse_split"]

_SPLIT_ORDER = (Split.TRAIN, Split.VALID, Split.TEST)
_KNOWN_KEYS = {
    "name",
    "classes_per_split",
    "images_per_class",
    "class_names",
    "superclasses_per_split",
    "classes_per_superclass",
    "path",
    "file_pattern",
    "__class__",
}


class SpecError(ValueError):
    """A dataset spec that contradicts itself; the message names the problem in one sentence."""


def parse_split(key: Split | str) -> Split:
    """Read a split written as ``Split.TRAIN``, ``"TRAIN"``, ``"Split.TRAIN"`` or ``"train"``."""
    if isinstance(key, Split):
        return key
    text = str(key).rsplit(".", 1)[-1].strip().lower()
    for split in Split:
        if text in (split.value, split.name.lower()):
            return split
    raise SpecError(f'Unknown split "{key}"; use one of TRAIN, VALID, TEST.')


def _int_keys(mapping: Mapping[Any, Any], what: str, name: str) -> dict[int, Any]:
    try:
        return {int(k): v for k, v in mapping.items()}
    except (TypeError, ValueError) as e:
        raise SpecError(f'Spec "{name}": {what} has a key that is not an integer class id ({e}).') from None


@dataclass(frozen=True)
class DatasetSpec:
    """Class splits and per-class image counts of one source, Meta-Dataset style.

    Class ids are global and contiguous by split in Meta-Dataset order: the TRAIN classes are
    ``0..n_train-1``, then VALID, then TEST. Superclasses (Omniglot alphabets) follow the same
    rule, and the classes of superclass ``s`` are contiguous and follow those of ``s-1``.
    """

    name: str
    classes_per_split: dict[Split, int]
    images_per_class: dict[int, int]
    class_names: dict[int, str] = field(default_factory=dict)
    superclasses_per_split: dict[Split, int] | None = None
    classes_per_superclass: dict[int, int] | None = None
    path: str | None = None
    file_pattern: str = "{}.tfrecords"
    extra: dict[str, Any] = field(default_factory=dict)  # unknown MD keys, kept for round trips

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes_per_split", {s: int(self.classes_per_split.get(s, 0)) for s in _SPLIT_ORDER})
        if self.superclasses_per_split is not None:
            sps = {s: int(self.superclasses_per_split.get(s, 0)) for s in _SPLIT_ORDER}
            object.__setattr__(self, "superclasses_per_split", sps)
        self._validate()

    # -- validation --------------------------------------------------------------------------
    def _validate(self) -> None:
        n = self.name
        for split, count in self.classes_per_split.items():
            if count < 0:
                raise SpecError(f'Spec "{n}": split {split.name} has a negative class count ({count}).')
        total = sum(self.classes_per_split.values())
        if sorted(self.images_per_class) != list(range(total)):
            raise SpecError(
                f'Spec "{n}": classes_per_split adds up to {total} classes but images_per_class lists '
                f"{len(self.images_per_class)} class ids (they must be exactly 0..{total - 1})."
            )
        bad = [c for c, k in self.images_per_class.items() if int(k) < 0]
        if bad:
            raise SpecError(f'Spec "{n}": class {bad[0]} has a negative image count.')
        stray = sorted(set(self.class_names) - set(self.images_per_class))
        if stray:
            raise SpecError(f'Spec "{n}": class_names names class {stray[0]}, which is not in images_per_class.')
        if (self.superclasses_per_split is None) != (self.classes_per_superclass is None):
            raise SpecError(
                f'Spec "{n}": give both superclasses_per_split and classes_per_superclass, or neither.'
            )
        if self.classes_per_superclass is not None:
            self._validate_superclasses()

    def _validate_superclasses(self) -> None:
        assert self.superclasses_per_split is not None and self.classes_per_superclass is not None
        n_super = sum(self.superclasses_per_split.values())
        if sorted(self.classes_per_superclass) != list(range(n_super)):
            raise SpecError(
                f'Spec "{self.name}": superclasses_per_split adds up to {n_super} superclasses but '
                f"classes_per_superclass lists {len(self.classes_per_superclass)} (ids must be 0..{n_super - 1})."
            )
        for split in _SPLIT_ORDER:
            listed = sum(self.classes_per_superclass[s] for s in self.superclass_ids(split))
            if listed != self.classes_per_split[split]:
                raise SpecError(
                    f'Spec "{self.name}": split {split.name} has {self.classes_per_split[split]} classes in '
                    f"classes_per_split but its superclasses list {listed}."
                )

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_split.values())

    @property
    def has_superclasses(self) -> bool:
        return self.classes_per_superclass is not None

    def _offset(self, counts: Mapping[Split, int], split: Split) -> int:
        return sum(counts[s] for s in _SPLIT_ORDER[: _SPLIT_ORDER.index(split)])

    def class_ids(self, split: Split | str) -> list[int]:
        """Global class ids of ``split``, in order."""
        split = parse_split(split)
        start = self._offset(self.classes_per_split, split)
        return list(range(start, start + self.classes_per_split[split]))

    def superclass_ids(self, split: Split | str) -> list[int]:
        """Global superclass ids of ``split`` (empty when the spec has no superclasses)."""
        if self.superclasses_per_split is None:
            return []
        split = parse_split(split)
        start = self._offset(self.superclasses_per_split, split)
        return list(range(start, start + self.superclasses_per_split[split]))

    def classes_of_superclass(self, superclass: int) -> list[int]:
        """Global class ids belonging to ``superclass``."""
        if self.classes_per_superclass is None or superclass not in self.classes_per_superclass:
            raise SpecError(f'Spec "{self.name}" has no superclass {superclass}.')
        start = sum(self.classes_per_superclass[s] for s in range(superclass))
        return list(range(start, start + self.classes_per_superclass[superclass]))

    def split_of(self, class_id: int) -> Split:
        """The split a global class id belongs to."""
        for split in _SPLIT_ORDER:
            start = self._offset(self.classes_per_split, split)
            if start <= class_id < start + self.classes_per_split[split]:
                return split
        raise SpecError(f'Spec "{self.name}" has no class {class_id}.')

    def class_name(self, class_id: int) -> str:
        """Human-readable name of a class (its id when the spec names none)."""
        return self.class_names.get(class_id, str(class_id))

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Meta-Dataset ``dataset_spec.json`` layout (string keys, split names TRAIN/VALID/TEST)."""
        out: dict[str, Any] = {
            "name": self.name,
            "classes_per_split": {s.name: c for s, c in self.classes_per_split.items()},
            "images_per_class": {str(c): int(k) for c, k in sorted(self.images_per_class.items())},
            "class_names": {str(c): v for c, v in sorted(self.class_names.items())},
            "path": self.path,
            "file_pattern": self.file_pattern,
        }
        if self.superclasses_per_split is not None and self.classes_per_superclass is not None:
            out["superclasses_per_split"] = {s.name: c for s, c in self.superclasses_per_split.items()}
            out["classes_per_superclass"] = {str(s): int(c) for s, c in sorted(self.classes_per_superclass.items())}
        out.update(self.extra)
        return out

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Return the JSON text; with ``path``, also write it there atomically."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        if path is not None:
            atomic_write(path, text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "spec") -> DatasetSpec:
        """Build a spec from a Meta-Dataset-style dict (either spelling of the split keys)."""
        missing = [k for k in ("name", "classes_per_split", "images_per_class") if k not in data]
        if missing:
            raise SpecError(f'{origin}: missing key "{missing[0]}"; a dataset spec needs name, '
                            "classes_per_split and images_per_class.")
        name = str(data["name"])
        sps_raw = data.get("superclasses_per_split")
        cps_raw = data.get("classes_per_superclass")
        images = _int_keys(data["images_per_class"], "images_per_class", name)
        names = _int_keys(data.get("class_names") or {}, "class_names", name)
        return cls(
            name=name,
            classes_per_split={parse_split(k): int(v) for k, v in data["classes_per_split"].items()},
            images_per_class={c: int(k) for c, k in images.items()},
            class_names={c: str(v) for c, v in names.items()},
            superclasses_per_split=None if sps_raw is None else {parse_split(k): int(v) for k, v in sps_raw.items()},
            classes_per_superclass=None if cps_raw is None else {
                s: int(c) for s, c in _int_keys(cps_raw, "classes_per_superclass", name).items()
            },
            path=data.get("path"),
            file_pattern=str(data.get("file_pattern") or "{}.tfrecords"),
            extra={k: v for k, v in data.items() if k not in _KNOWN_KEYS},
        )

    @classmethod
    def from_json(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> DatasetSpec:
        """Read a spec from a ``dataset_spec.json`` path or an already-parsed dict."""
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        path = Path(source)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpecError(f"{path}: no such dataset spec file; check the source's root directory.") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        if not isinstance(data, Mapping):
            raise SpecError(f"{path}: a dataset spec must be a JSON object.")
        return cls.from_dict(data, origin=str(path))
