"""Descriptions of what is registered, for ``metabench ls``.

Learners that are not imported yet are described from their source code (``ast``: the class docstring and its
literal ``presets``, following base classes through the module's imports), so listing them imports no torch.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from pathlib import Path
from typing import Any

__all__ = ["catalog"]


def _class_node(module: str, name: str) -> tuple[ast.ClassDef, ast.Module] | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    found = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    return (found, tree) if found is not None else None


def _static_presets(module: str, name: str, depth: int = 4) -> dict[str, Any]:
    """``presets`` of class ``module:name`` as written in its source, else inherited from a base it imports."""
    node = _class_node(module, name)
    if node is None or depth == 0:
        return {}
    cls, tree = node
    for stmt in cls.body:
        target = stmt.target if isinstance(stmt, ast.AnnAssign) else (stmt.targets[0] if isinstance(stmt, ast.Assign)
                                                                       else None)
        if isinstance(target, ast.Name) and target.id == "presets" and stmt.value is not None:
            return ast.literal_eval(stmt.value)
    imported = {a.asname or a.name: n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module
                for a in n.names}
    for base in cls.bases:
        if isinstance(base, ast.Name):
            where = imported.get(base.id, module)
            found = _static_presets(where, base.id, depth - 1)
            if found:
                return found
    return {}


def _describe_learner(registry: Any, name: str) -> tuple[str, dict[str, Any]]:
    """(first docstring paragraph, presets) of a learner, without importing it while it is still lazy."""
    target = registry.lazy_target(name)
    if target is not None:
        module, _, attr = target.partition(":")
        node = _class_node(module, attr)
        if node is not None:
            doc = (ast.get_docstring(node[0]) or "").split("\n\n")[0]
            return " ".join(doc.split()), _static_presets(module, attr)
    cls = registry.get(name)
    return _first_line(cls), getattr(cls, "presets", {}) or {}


def _first_line(obj: object) -> str:
    """The docstring's first sentence or paragraph, joined onto one line."""
    doc = (inspect.getdoc(obj) or "").split("\n\n")[0]
    return " ".join(doc.split())


def _presets(presets: dict[str, Any]) -> str:
    """The ``learner.*`` values a learner sets under each run preset (SMAT's "paper" = the upstream recipe)."""
    return "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in options.items())
                     for name, options in presets.items()) or "-"


def catalog(what: str) -> list[dict[str, str]]:
    """One dict per registered learner, backbone or source."""
    if what == "learners":
        from metabench.learners import LEARNERS

        rows = []
        for n in LEARNERS.names():
            description, presets = _describe_learner(LEARNERS, n)
            rows.append({"name": n, "description": description, "options per preset": _presets(presets)})
        return rows
    if what == "backbones":
        from metabench.backbone_specs import BACKBONES

        return [{"name": n, "timm": BACKBONES.get(n).timm_id, "weights": BACKBONES.get(n).weights,
                 "description": BACKBONES.get(n).description} for n in BACKBONES.names()]
    if what == "sources":
        from episodes.readers import SOURCES

        return [{"name": n, "description": _first_line(SOURCES.get(n))} for n in SOURCES.names()]
    raise ValueError(f'Cannot list "{what}"; choose learners, backbones or sources.')
