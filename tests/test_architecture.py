"""The package's import structure: the import-linter contracts of setup.cfg hold (layers, no circles), and no module
imports another module's private names.

Both checks read the source (no ppl_vae module is executed), so they are fast. They check the ``ppl_vae`` that
tests import: this checkout's, through PYTHONPATH or the editable install.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ppl_vae

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(ppl_vae.__file__).resolve().parent


def test_import_contracts_hold(capsys):
    """`lint-imports` with the contracts in setup.cfg: the layers, and no import circle between sibling modules."""
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the dev extras: pip install -e .[dev]")
    assert PACKAGE.parent == ROOT, f"the ppl_vae imported is {PACKAGE}, not this checkout's"
    code = cli.lint_imports(config_filename=str(ROOT / "setup.cfg"), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert code == 0, report
    assert "0 broken" in report and "3 kept" in report and "The training package reads top to bottom" in report, report


def _internal_module_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> ppl_vae module, for the modules this file imports as modules (``from . import train as t``)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module is None:
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ppl_vae"):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    return aliases


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_names_used_across_modules(package: Path) -> list[str]:
    """Every ``from .other import _name`` and ``other._name`` in the package's modules, as "file:line: what".

    A private name is its module's own business: a name another module needs is public (or moves to where both can
    import it). Importing a module under a private alias (``from . import cifar10 as _cifar10``) is not a private
    name of another module.
    """
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(package.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("ppl_vae")):
                found += [f"{where}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}"
                          for alias in node.names if _is_private(alias.name)]
        modules = _internal_module_names(tree)
        found += [f"{where}:{node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                  and _is_private(node.attr)]
    return found


def test_no_private_name_is_imported_across_modules():
    assert private_names_used_across_modules(PACKAGE) == []


def test_the_private_name_check_finds_them(tmp_path):
    """The check above is not vacuous: both forms are found, and a module imported under a private alias is not."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("def _helper():\n    return 1\n")
    (package / "b.py").write_text("from .a import _helper\nfrom . import a as _a\nfrom . import a\nx = a._helper()\n")
    assert private_names_used_across_modules(package) == [
        "pkg/b.py:1: from .a import _helper", "pkg/b.py:4: a._helper"]
