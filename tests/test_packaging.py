"""The GPU install recipe's requirements file lists exactly pyproject's dependencies but torch and torchvision."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_requirements_on_torch_match_pyproject_without_torch() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = [d for d in deps if not d.startswith(("torch==", "torchvision=="))]
    lines = (ROOT / "requirements-on-torch.txt").read_text().splitlines()
    assert [x for x in lines if x and not x.startswith("#")] == expected
    assert len(expected) == len(deps) - 2
