"""Repository layout: packages import from this checkout, models/ stays free of trainer-side imports, and
pyproject.toml lists every package."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_PACKAGES = ("models", "trainer", "sharding", "data_pipeline", "deploy")
FORBIDDEN_IN_MODELS = {"trainer", "sharding", "data_pipeline", "bench"}


@pytest.mark.parametrize("name", TOP_PACKAGES)
def test_package_imports_from_this_repository(name: str) -> None:
    module = importlib.import_module(name)
    path = Path(module.__file__).resolve()
    assert path.is_relative_to(REPO), f"{name} imported from {path}, not from {REPO}"
    assert path == REPO / name / "__init__.py"


def _imported_top_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


MODEL_FILES = sorted((REPO / "models").rglob("*.py"))


def test_models_has_python_files() -> None:
    # guards the parametrized test below against silently checking nothing
    assert len(MODEL_FILES) >= 8
    assert REPO / "models" / "fmrl" / "model.py" in MODEL_FILES


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_models_never_import_trainer_side_packages(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = _imported_top_names(tree) & FORBIDDEN_IN_MODELS
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_import_checker_detects_forbidden_imports() -> None:
    # the checker itself must see every import form (plain, dotted, from-import, nested in a function)
    source = "import trainer.optim\nfrom sharding import world\ndef f():\n    import data_pipeline as d\n"
    assert _imported_top_names(ast.parse(source)) >= {"trainer", "sharding", "data_pipeline"}


def test_pyproject_lists_every_package() -> None:
    with open(REPO / "pyproject.toml", "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    on_disk = set()
    for top in TOP_PACKAGES:
        for init in (REPO / top).rglob("__init__.py"):
            if ".venv" in init.parts or "__pycache__" in init.parts:
                continue
            on_disk.add(".".join(init.parent.relative_to(REPO).parts))
    assert set(TOP_PACKAGES) <= on_disk
    missing = on_disk - listed
    assert not missing, f"packages missing from [tool.setuptools] packages: {sorted(missing)}"
