"""Name -> object registries with lazy ``"module:attr"`` targets and did-you-mean errors.

Lazy targets keep ``import metabench`` fast (baselines that import peft load only when used),
and a Python entry-point group lets a separately installed package add entries. It lives in the
data layer, which imports nothing from the core, so that sources (``episodes.readers.SOURCES``) and
the core's learners and backbones share one implementation.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "RegistryError", "load_plugins", "suggest"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name; the message is one sentence meant for a person."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


def suggest(name: str, choices: list[str]) -> str:
    """Return ' Did you mean "x"?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f' Did you mean "{close[0]}"?' if close else ""


def _same_definition(a: object, b: object) -> bool:
    """True when ``b`` is ``a`` or a re-import of the same definition (a module loaded again)."""
    if a is b:
        return True
    key = lambda o: (getattr(o, "__module__", None), getattr(o, "__qualname__", None))  # noqa: E731
    return key(a)[1] is not None and key(a) == key(b)


class Registry(Generic[T]):
    """A named collection of objects (classes, factories, specs).

    Args:
        kind: what the entries are ("learner", "backbone", "source"), used in error messages.
        entry_point_group: optional ``importlib.metadata`` group scanned once on first lookup.
        check: called on every entry when it is first loaded; it returns a sentence saying what is wrong with
            it (e.g. not a ``Learner`` subclass), or None.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None,
                 check: Callable[[Any], str | None] | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.check = check
        self.frozen = False
        self._objects: dict[str, T] = {}
        self._lazy: dict[str, str] = {}
        self._scanned = entry_point_group is None

    def freeze(self) -> None:
        """Refuse any further registration (a harness that must compare a fixed set of entries)."""
        self.frozen = True

    def _accept(self, name: str, obj: T) -> T:
        problem = self.check(obj) if self.check is not None else None
        if problem:
            raise RegistryError(f'{self.kind} "{name}" cannot be used: {problem}')
        return obj

    def register(self, name: str, target: str | T | None = None) -> Callable[[T], T] | None:
        """Register ``target`` under ``name``; without a target, return a decorator.

        A string target ``"package.module:attr"`` is imported on first use.
        """
        if self.frozen:
            raise RegistryError(f'The {self.kind} registry is frozen; "{name}" cannot be registered.')
        if target is not None and (
            name in self._lazy or (name in self._objects and not _same_definition(self._objects[name], target))
        ):
            raise RegistryError(f'{self.kind} "{name}" is registered twice; pick another name.')
        if target is None:

            def decorator(obj: T) -> T:
                if name in self._objects and not _same_definition(self._objects[name], obj):
                    raise RegistryError(f'{self.kind} "{name}" is registered twice; pick another name.')
                # A decorator may run while its own lazy entry is being resolved: that is no clash.
                self._lazy.pop(name, None)
                self._objects[name] = self._accept(name, obj)
                return obj

            return decorator
        if isinstance(target, str):
            self._lazy[name] = target
        else:
            self._objects[name] = self._accept(name, target)
        return None

    def _scan_entry_points(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        for ep in entry_points(group=self.entry_point_group or ""):
            if ep.name in self._objects or ep.name in self._lazy:
                log.warning("Ignoring entry point %s: %s %r already exists", ep.value, self.kind, ep.name)
                continue
            self._lazy[ep.name] = ep.value

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._scan_entry_points()
        return sorted({*self._objects, *self._lazy})

    def get(self, name: str) -> T:
        """Return the object for ``name``, importing a lazy target if needed."""
        self._scan_entry_points()
        if name in self._objects:
            return self._objects[name]
        if name not in self._lazy:
            raise RegistryError(
                f'Unknown {self.kind} "{name}".{suggest(name, self.names())} '
                f"Known: {', '.join(self.names())}."
            )
        module_name, _, attr = self._lazy[name].partition(":")
        module = importlib.import_module(module_name)
        # Importing the module may itself have registered the name through the decorator.
        obj = self._accept(name, self._objects.get(name) or getattr(module, attr))
        self._objects[name] = obj
        self._lazy.pop(name, None)
        return obj

    def lazy_target(self, name: str) -> str | None:
        """The ``"module:attr"`` a name will import on first ``get``, or None once it is loaded (or not lazy)."""
        self._scan_entry_points()
        return self._lazy.get(name)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's temporary entry); an unknown name is a ``RegistryError``."""
        if name not in self._objects and name not in self._lazy:
            raise RegistryError(f'{self.kind} "{name}" is not registered.')
        self._objects.pop(name, None)
        self._lazy.pop(name, None)

    def __contains__(self, name: object) -> bool:
        self._scan_entry_points()
        return name in self._objects or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def load_plugins(plugins: list[str]) -> None:
    """Import each plugin (a ``.py`` file or a module name) so that its registry decorators run."""
    for plugin in plugins:
        if plugin.endswith(".py"):
            path = Path(plugin)
            if not path.is_file():
                raise FileNotFoundError(f"Plugin file {plugin} does not exist; pass the path of a .py file.")
            module_name = f"metabench_plugin_{path.stem}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(plugin)
