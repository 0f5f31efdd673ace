"""Descriptions of what is registered, for ``metabench ls``."""

from __future__ import annotations

import inspect

__all__ = ["catalog"]


def _first_line(obj: object) -> str:
    """The docstring's first sentence or paragraph, joined onto one line."""
    doc = (inspect.getdoc(obj) or "").split("\n\n")[0]
    return " ".join(doc.split())


def _presets(cls: object) -> str:
    """The ``learner.*`` values a learner sets under each run preset (SMAT's "paper" = the upstream recipe)."""
    presets = getattr(cls, "presets", {}) or {}
    return "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in options.items())
                     for name, options in presets.items()) or "-"


def catalog(what: str) -> list[dict[str, str]]:
    """One dict per registered learner, backbone or source."""
    if what == "learners":
        from metabench.learners import LEARNERS

        return [{"name": n, "description": _first_line(LEARNERS.get(n)),
                 "options per preset": _presets(LEARNERS.get(n))}
                for n in LEARNERS.names()]
    if what == "backbones":
        from metabench.backbones import BACKBONES

        out = []
        for n in BACKBONES.names():
            spec = BACKBONES.get(n)
            timm_name = f"{spec.timm_name}.{spec.tag}" if spec.tag else spec.timm_name
            out.append({"name": n, "timm": timm_name, "weights": spec.weights, "description": spec.description})
        return out
    if what == "sources":
        from episodes.readers import SOURCES

        return [{"name": n, "description": _first_line(SOURCES.get(n))} for n in SOURCES.names()]
    raise ValueError(f'Cannot list "{what}"; choose learners, backbones or sources.')
