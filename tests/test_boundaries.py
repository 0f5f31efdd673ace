"""Package boundaries that DESIGN.md states: the data layer (``episodes/``) imports nothing from the core."""

from __future__ import annotations

import ast
from pathlib import Path

import episodes

EPISODES = Path(episodes.__file__).parent


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import statement and every ``import_module("...")`` / ``__import__("...")``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_the_data_layer_imports_nothing_from_the_core() -> None:
    files = sorted(EPISODES.rglob("*.py"))
    assert len(files) > 20  # the walk found the package, not an empty folder
    reaching_up = [
        f"{path.relative_to(EPISODES.parent)}:{line} imports {module}"
        for path in files
        for line, module in _imported_modules(ast.parse(path.read_text(), filename=str(path)))
        if module == "metabench" or module.startswith("metabench.")
    ]
    assert not reaching_up, "; ".join(reaching_up)


def test_the_import_finder_sees_every_form() -> None:
    source = "import metabench\nfrom metabench.x import y\nimportlib.import_module('metabench.z')\nfrom . import w\n"
    assert sorted(m for _, m in _imported_modules(ast.parse(source))) == ["metabench", "metabench.x", "metabench.z"]
