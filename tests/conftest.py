"""Test-wide settings: never touch the network, and keep rendered data in a per-session cache."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Rendered embedded data goes to a session folder, not the user's cache (unless METABENCH_TEST_CACHE is set)."""
    cache = os.environ.get("METABENCH_TEST_CACHE") or str(tmp_path_factory.mktemp("metabench-cache"))
    os.environ["METABENCH_CACHE"] = cache
