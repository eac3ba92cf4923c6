"""The package's layering (pyproject.toml's import-linter contract) holds, and a module that
reaches up a layer breaks it; no module uses another module's private names."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
SOURCES = sorted([*(ROOT / "sbtrain").rglob("*.py"), *(ROOT / "cli").glob("*.py")])


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports over the packages of `tree` (its own pyproject.toml), no cache."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """sbtrain/, cli/ and pyproject.toml copied, to break on purpose."""
    root = tmp_path_factory.mktemp("tree")
    for name in ("sbtrain", "cli"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contract_holds_for_the_tree_as_it_is(tree_copy):
    result = lint_imports(tree_copy)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, line",
    [
        # config reaching up to the tasks, inside a function (as config.py once did)
        ("sbtrain/config.py", "def _late():\n    from sbtrain.tasks import TASKS\n"),
        ("sbtrain/datasets.py", "from sbtrain.model import TransformerLM\n"),  # data knows model
        ("sbtrain/evaluate.py", "from sbtrain import trainer\n"),  # two commands' halves
        ("sbtrain/dropin.py", "from sbtrain import evaluate\n"),  # back into the command
        ("sbtrain/attention/reference.py", "import sbtrain.tokenizer\n"),  # siblings below
    ],
)
def test_an_upward_or_sideways_import_breaks_the_contract(tree_copy, module, line):
    path = tree_copy / module
    original = path.read_text()
    try:
        path.write_text(original + "\n\n" + line)
        result = lint_imports(tree_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and module.removesuffix(".py").replace("/", ".") in (
        result.stdout
    )


def imported_modules(tree: ast.Module) -> dict[str, str]:
    """Local name -> sbtrain/cli module, for `import sbtrain.x as y` and `from sbtrain import x`."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("sbtrain", "cli"):
                    names[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
            "sbtrain",
            "cli",
        ):
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")  # __version__ is public


def private_uses(path: Path) -> list[str]:
    """`from sbtrain.x import _y` and `x._y` on an imported sbtrain module, in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("sbtrain", "cli")):
            found += [f"{node.module}.{a.name}" for a in node.names if is_private(a.name)]
    modules = imported_modules(tree)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and is_private(node.attr)
        ):
            found.append(f"{modules[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = {str(p.relative_to(ROOT)): private_uses(p) for p in SOURCES}
    assert {p: names for p, names in found.items() if names} == {}


def test_the_private_name_check_sees_both_spellings(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "from sbtrain.binarize import _lines\nfrom sbtrain import staging\nstaging._x\n"
    )
    assert private_uses(path) == ["sbtrain.binarize._lines", "sbtrain.staging._x"]
