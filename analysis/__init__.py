"""analysis: tables, figures and the report, from run folders only (pandas, matplotlib, scipy).

Never imports torch. Public entry point: ``write_report(run_dirs, out)``; the pieces live in ``load``, ``stats``,
``tables``/``render``, ``compare``, ``experts``, ``figures`` and ``report``. Imports are lazy so that
``import analysis`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_runs", "results_table", "write_report"]

_LAZY = {"load_runs": "analysis.load", "results_table": "analysis.tables", "write_report": "analysis.report"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
