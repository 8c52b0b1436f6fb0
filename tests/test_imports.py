"""Every name the tests import from `mom` exists. GPU-only tests import inside their bodies, and CPU runs skip those
bodies: a name moved or renamed in the package would otherwise go unnoticed until a GPU run (as one did)."""

import ast
import importlib
from pathlib import Path

TESTS = Path(__file__).parent


def _imports() -> list[tuple[str, int, str, str]]:
    """(file, line, module, name) of every ``from mom... import name`` in the tests, at any depth."""
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mom":
                found += [(path.name, node.lineno, node.module, alias.name) for alias in node.names]
    return found


def test_every_name_the_tests_import_from_mom_exists():
    imports = _imports()
    assert len(imports) > 100  # the walk found the tests' imports
    missing = []
    for file, line, module, name in imports:
        owner = importlib.import_module(module)
        if not hasattr(owner, name):
            try:
                importlib.import_module(f"{module}.{name}")  # a submodule not yet imported
            except ImportError:
                missing.append(f"{file}:{line}: from {module} import {name}")
    assert not missing, missing
