"""Sources defined in a config file (``data.sources.<name>``), not in code.

    data:
      sources:
        my_alphabets: {kind: folder, root: /data/omniglot, layout: nested, splits: splits.json, domain: id}
        md_omniglot: {kind: md_tfrecords, root: /data/records, path: omniglot, image_size: 84}
      train_sources: [my_alphabets]

``kind`` is a reader (folder, meta_album, md_tfrecords, h5, tfds) or any registered source name; the other keys
are that reader's settings. A setting that does not apply to the kind is one clear error, as is a missing root.
The configured name is the source's name in episodes, results and suites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from episodes.readers.base import Source

__all__ = ["KINDS", "SourceSettings", "SourceSettingsError", "build_sources", "describe", "open_configured"]


class SourceSettingsError(ValueError):
    """A ``data.sources`` entry that cannot be used; the message names the entry and what to change."""


@dataclass
class SourceSettings:
    """One ``data.sources.<name>`` entry; unset (None) keys take the reader's defaults."""

    kind: str = "folder"  # folder | meta_album | md_tfrecords | h5 | tfds | a registered source name
    root: str | None = None  # its folder (default: data.root); relative paths resolve from where the run starts
    path: str | None = None  # md_tfrecords / h5: the folder or file under root
    domain: str | None = None  # id | ood
    image_size: int | None = None  # folders / TFRecords: decode to this square size
    splits: Any = None  # folders: {train: [...], valid: [...], test: [...]} of class or superclass names, or JSON
    split: str | None = None  # folders: the split every class goes to when splits is unset (default test)
    superclasses: bool | None = None  # folders: superclasses for the bilevel sampler (default: on for nested)
    layout: str | None = None  # folder: auto | folders | nested | meta_album
    exclude: Any = None  # folders: a file listing images to leave out, or a list of them
    resize: str | None = None  # folders: squash | crop
    dataset: str | None = None  # tfds: the builder name
    options: dict[str, Any] = field(default_factory=dict)  # any other keyword the reader takes


_FOLDER = ("domain", "image_size", "splits", "split", "superclasses", "exclude", "resize")
#: reader kind -> the settings it takes (besides kind, root and options)
KINDS: dict[str, tuple[str, ...]] = {
    "folder": (*_FOLDER, "layout"),
    "meta_album": _FOLDER,
    "md_tfrecords": ("path", "domain", "image_size"),
    "h5": ("path", "domain"),
    "tfds": ("dataset", "domain"),
}
_REGISTERED = ("domain",)  # a registered source (ilsvrc_2012, noto, ...) under another name


def _given(settings: SourceSettings) -> dict[str, Any]:
    skip = {"kind", "root", "options"}
    return {f.name: getattr(settings, f.name) for f in fields(settings)
            if f.name not in skip and getattr(settings, f.name) is not None}


def open_configured(name: str, settings: SourceSettings, data_root: str | None) -> Source:
    """Build the source ``name`` from its settings; ``data_root`` stands in for an unset ``root``."""
    from episodes.readers import SOURCES

    where = f"data.sources.{name}"
    kind = settings.kind
    allowed = KINDS.get(kind, _REGISTERED)
    if kind not in KINDS and kind not in SOURCES:
        raise SourceSettingsError(f'{where}: kind "{kind}" is unknown; use one of {", ".join(KINDS)} or a source '
                                  "from `metabench ls sources`.")
    given = _given(settings)
    stray = [key for key in given if key not in allowed]
    if stray:
        raise SourceSettingsError(f'{where}: "{stray[0]}" does not apply to kind "{kind}" (it takes '
                                  f'{", ".join(allowed) or "no settings"} besides root and options); remove it.')
    root = settings.root if settings.root is not None else data_root
    if root is None and kind in ("folder", "meta_album", "md_tfrecords", "tfds"):
        raise SourceSettingsError(f"{where}: no root; set {where}.root=DIR (or data.root=DIR) to where its data is.")
    options = {**given, **settings.options}
    if kind in ("folder", "meta_album"):
        from episodes.readers.folder import ImageFolderSource

        if kind == "meta_album":
            options["layout"] = "meta_album"
        source: Source = ImageFolderSource(root, name=name, **options)
    else:
        domain = options.pop("domain", None)
        factory = SOURCES.get(kind)
        source = factory(root=root, **options)
        source.name = name
        if domain is not None:
            if domain not in ("id", "ood"):
                raise SourceSettingsError(f'{where}: domain "{domain}" is unknown; use "id" or "ood".')
            source.domain = domain
    return source


def build_sources(names: Sequence[str], root: str | None,
                  configured: Mapping[str, SourceSettings] | None = None) -> dict[str, Source]:
    """Instantiate sources by name: those defined in ``data.sources`` (``configured``) first, then the registry
    (unknown names raise a did-you-mean error)."""
    from episodes.readers import SOURCES

    configured = configured or {}
    return {name: open_configured(name, configured[name], root) if name in configured else SOURCES.get(name)(root=root)
            for name in dict.fromkeys(names)}


def describe(name: str, settings: SourceSettings) -> str:
    """One line for ``metabench ls sources``: the kind, where the data is, and the settings given."""
    given = ", ".join(f"{k}={v}" for k, v in {**_given(settings), **settings.options}.items())
    return f"configured: {settings.kind} at {settings.root or 'data.root'}" + (f" ({given})" if given else "")
