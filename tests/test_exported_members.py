"""Every module's `__all__` is honest: it names only what exists, and every public
function, class and constant the module defines is in it (or starts with `_`).

A name missing from `__all__` is a name a newcomer cannot tell is meant to be
used; a stale one breaks `from module import *` and the docs."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import sentiment

PACKAGE_DIR = Path(sentiment.__file__).parent
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="sentiment.")
    if not info.ispkg or info.name == "sentiment"
) + ["sentiment"]


def _is_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A typer command (`@app.command()`): reached through the CLI app, not imported."""
    return any(
        isinstance(d, ast.Call)
        and isinstance(d.func, ast.Attribute)
        and d.func.attr in {"command", "callback"}
        for d in node.decorator_list
    )


def _defined_public_names(module_name: str) -> set[str]:
    """Names bound at the top level of the module's source, not starting with `_`:
    functions (but CLI commands), classes, and constants (UPPER_CASE). Imports are
    not definitions."""
    module = importlib.import_module(module_name)
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if not _is_command(node):
                names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper())
    return {name for name in names if not name.startswith("_")}


@pytest.mark.parametrize("module_name", MODULES)
def test_all_names_only_what_exists(module_name):
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", [])
    assert len(exported) == len(set(exported)), f"{module_name}.__all__ repeats a name"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names what the module lacks: {missing}"


@pytest.mark.parametrize("module_name", [m for m in MODULES if m != "sentiment"])
def test_every_public_definition_is_exported(module_name):
    module = importlib.import_module(module_name)
    exported = set(getattr(module, "__all__", []))
    unlisted = sorted(_defined_public_names(module_name) - exported)
    assert not unlisted, (
        f"{module_name} defines public names missing from __all__: {unlisted} "
        "(export them, or give them a leading underscore)"
    )
