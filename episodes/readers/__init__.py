"""Readers: every data source behind one interface, found by name in ``SOURCES``.

Entries are factories ``(root: str | None = None, **options) -> Source``. They are registered
lazily so that listing sources imports no reader (and no font or TFRecord library).
"""

from __future__ import annotations

from collections.abc import Callable

from metabench.registry import Registry

from episodes.readers.base import Source, cache_dir

__all__ = ["SOURCES", "Source", "cache_dir"]

SOURCES: Registry[Callable[..., Source]] = Registry("source", entry_point_group="metabench.sources")

# Embedded sources: built from data that installs with the project, so they work offline.
SOURCES.register("noto", "episodes.readers.embedded:NotoGlyphs")
SOURCES.register("digits", "episodes.readers.embedded:SklearnDigits")
