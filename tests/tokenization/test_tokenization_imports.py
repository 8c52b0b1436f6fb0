"""Layering: the tokenizers sit below the data pipeline, and the libraries hold no command lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MOM = Path(__file__).resolve().parents[2] / "mom"


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((MOM / "tokenization").glob("*.py")), ids=lambda p: p.name)
def test_tokenization_imports_only_utils_of_mom(path: Path) -> None:
    upward = sorted(m for m in _imported_modules(path) if m.startswith("mom.") and not
                    m.startswith(("mom.tokenization", "mom.utils")))  # fmt: skip
    assert not upward, f"{path.name} imports {upward}"


@pytest.mark.parametrize("path", sorted([*(MOM / "tokenization").glob("*.py"), *(MOM / "data").glob("*.py")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")  # fmt: skip
def test_libraries_hold_no_command_line(path: Path) -> None:
    assert "argparse" not in _imported_modules(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert not [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
