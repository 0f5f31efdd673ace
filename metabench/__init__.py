"""metabench: a benchmark suite for few-shot transfer of vision foundation models.

``metabench.load_run`` and ``metabench.evaluate`` (``metabench.api``) mirror ``metabench eval --run``; they are
imported on first use, so ``import metabench`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LoadedRun", "evaluate", "load_run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from metabench import api

        return getattr(api, name)
    raise AttributeError(f"module 'metabench' has no attribute {name!r}")
