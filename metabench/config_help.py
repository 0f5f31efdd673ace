"""``metabench config --list``: every config key with its type, default and help.

The help of a key is the comment written beside its field in the dataclass (``episodes: int = 40  # per
source``), read from the source with ``tokenize``, so the comment stays the only place a key is explained.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from functools import lru_cache
from typing import Any

__all__ = ["config_keys"]


@lru_cache(maxsize=None)
def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line (and the comment lines right above it) in ``cls``'s source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    pending: list[str] = []
    line_field: dict[int, str] = {}
    for line_no, line in enumerate(source.splitlines(), start=1):
        head = line.strip().split(":", 1)[0]
        if line.startswith("    ") and not line.startswith("     ") and head.isidentifier() and ":" in line:
            line_field[line_no] = head
    last: str | None = None  # the field whose comment a deeper-indented comment line continues
    continued: set[int] = set()  # lines that continue a field's comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#").strip()
        name = line_field.get(tok.start[0])
        if name is not None:  # a comment beside a field
            comments[name] = " ".join([*pending, text]).strip()
            pending, last = [], name
        elif tok.start[1] > 4 and last is not None and tok.start[0] - 1 in (*line_field, *continued):
            comments[last] += " " + text  # the beside-comment goes on under the field
            continued.add(tok.start[0])
        else:  # a comment above the next field
            pending.append(text)
            last = None
            nxt = line_field.get(tok.start[0] + 1)
            if nxt is not None:
                comments[nxt] = " ".join(pending)
                pending = []
    return comments


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:  # a choice: its values say more than "Literal"
        return " | ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def config_keys(obj: Any, prefix: str = "") -> list[dict[str, str]]:
    """One row per leaf key of the dataclass instance ``obj`` (nested dataclasses flattened with dots)."""
    rows: list[dict[str, str]] = []
    hints = typing.get_type_hints(type(obj))
    help_of = {}
    for cls in reversed(type(obj).__mro__):
        if dataclasses.is_dataclass(cls):
            help_of.update(_field_comments(cls))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows += config_keys(value, key + ".")
            continue
        rows.append({"key": key, "type": _type_name(hints.get(f.name, f.type)), "default": repr(value),
                     "help": help_of.get(f.name, "")})
    return rows
