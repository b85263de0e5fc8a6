"""The layering of the project, checked on its import graph: every ``import`` of every module of the four
packages, at module level or inside a function (docs/architecture.md draws the same picture).

* models/ imports no other layer: only torch, torchrec and the standard library;
* data_pipeline/ imports none of models/, sharding/, trainer/;
* sharding/ never imports trainer/;
* deploy/ (serving) imports none of data_pipeline/, sharding/, trainer/ and no training library (torchrec,
  fbgemm, deepspeed): models/ only;
* no module imports itself back through others (no import cycle anywhere).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "data_pipeline", "sharding", "trainer", "deploy")
FORBIDDEN = {
    "models": {"data_pipeline", "sharding", "trainer", "bench"},
    "data_pipeline": {"models", "sharding", "trainer", "bench"},
    "sharding": {"trainer", "bench"},
    "trainer": {"bench"},
    "deploy": {"data_pipeline", "sharding", "trainer", "bench"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules that the module ``name`` imports, anywhere in its code (``from a import b``
    counts as importing ``a.b`` when that is a module, else ``a``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "a.b.c" of a module "a.b": the module is what counts
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_whole() -> None:
    graph = import_graph()
    assert len(graph) > 60 and "trainer.train" in graph and "models.fmrl.model" in graph
    # imports inside functions count: export.py imports the data set reader inside a function
    assert "data_pipeline.loader" in graph["trainer.export"]
    assert "trainer.tasks.fmrl" not in graph["trainer.tasks"]  # the registry imports by name, lazily


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_forbidden_arrow(layer: str) -> None:
    bad = sorted(
        f"{name} -> {target}"
        for name, targets in import_graph().items()
        if name.split(".")[0] == layer
        for target in targets
        if target.split(".")[0] in FORBIDDEN[layer]
    )
    assert not bad, bad


def test_models_import_only_torch_torchrec_and_the_standard_library() -> None:
    import sys

    allowed = {"torch", "torchrec", "models", "__future__"} | set(sys.stdlib_module_names)
    bad = []
    for path in sorted((REPO / "models").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bad += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] not in allowed]
    assert not bad, bad


def test_deploy_imports_no_training_library() -> None:
    forbidden = {"torchrec", "fbgemm_gpu", "deepspeed", "transformers", "webdataset", "s3fs"}
    bad = []
    files = sorted((REPO / "deploy").rglob("*.py"))
    assert len(files) >= 5
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bad += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in forbidden]
            # of models/, only the fMRL trunk's pure modules (models.dlrm needs torchrec)
            bad += [f"{path.relative_to(REPO)}: {n}" for n in names if n.startswith("models.dlrm")]
    assert not bad, bad


def test_the_checks_see_a_cycle_and_a_forbidden_arrow() -> None:
    # the checker itself: a planted cycle and a planted arrow are found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = {"sharding.x": {"trainer.y"}, "trainer.y": set()}
    assert any(t.split(".")[0] in FORBIDDEN["sharding"] for t in graph["sharding.x"])
