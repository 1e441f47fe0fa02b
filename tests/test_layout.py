"""The card's top-level folders are the ``posterfusion.*`` packages, and only those.

``models/``, ``jobs/``, … install as ``posterfusion.models``, ``posterfusion.jobs``, …; if the
repository root were on ``sys.path`` (a ``tests/__init__.py``, ``python -m pytest`` from the
root), ``import models`` would load a second copy beside ``posterfusion.models`` — a second
backbone registry, a second ``Predictor`` class that ``isinstance`` checks do not recognise.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

STAGES = ["cluster", "features", "jobs", "models", "serving"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_folder_is_not_importable_under_its_bare_name(stage):
    spec = importlib.util.find_spec(stage)
    assert spec is None, f"`import {stage}` would load {spec.origin}: a second copy of posterfusion.{stage}"


def test_each_stage_is_loaded_once_as_a_posterfusion_package():
    import posterfusion.models.backbones as backbones

    from support import REPO

    assert not set(STAGES) & set(sys.modules)
    assert backbones.__file__ == str(REPO / "models" / "backbones.py")


def _modules(*folders: str):
    import ast

    from support import REPO

    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path.relative_to(REPO), ast.parse(path.read_text(), str(path))


def _imports(tree) -> list[str]:
    import ast

    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


# docs/architecture.md draws this: jobs → serving → models → features; models and jobs → cluster; every stage
# → the shared base (posterfusion.errors, .weights, .locations). Nothing else, in either direction.
ALLOWED = {"cluster": set(), "features": set(), "models": {"cluster", "features"},
           "serving": {"models", "features"}, "jobs": {"cluster", "features", "models", "serving"}}
BASE = {"errors", "weights", "locations", "__version__"}


def test_dependencies_point_one_way_as_the_architecture_draws_them():
    offenders = []
    for stage, allowed in ALLOWED.items():
        for path, tree in _modules(stage):
            for name in _imports(tree):
                parts = name.split(".")
                if parts[0] != "posterfusion" or len(parts) < 2 or parts[1] == stage:
                    continue
                if parts[1] not in allowed | BASE:
                    offenders.append(f"{path}: {name}")
    assert not offenders, offenders
    base = [f"{path}: {name}" for path, tree in _modules("posterfusion") if path.name != "__main__.py"
            for name in _imports(tree) if name.split(".")[:2][-1] in ALLOWED]
    assert not base, base  # the shared base imports no stage (the entry point aside)


def test_no_module_uses_another_modules_private_names():
    """``from posterfusion.x import _name`` or ``alias._name`` on something imported from posterfusion."""
    import ast

    offenders = []
    for path, tree in _modules("cluster", "features", "models", "serving", "jobs", "benchmarks"):
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("posterfusion"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{path}: from {node.module} import {alias.name}")
                    imported.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                imported |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("posterfusion")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offenders.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offenders, offenders


def _module_name(path) -> str:
    parts = list(path.with_suffix("").parts)
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(["posterfusion", *parts]) if parts[0] != "posterfusion" else ".".join(parts)


def test_no_two_modules_import_each_other_even_lazily():
    """An import circle (top-level or inside a function) means two modules that are really one, or a
    piece in the wrong one: ``fusion``/``ensemble`` share ``network``, ``app``/``deployments`` share
    ``config`` and ``requests``."""
    import graphlib

    graph = {}
    for path, tree in _modules("cluster", "features", "models", "serving", "jobs", "posterfusion"):
        graph[_module_name(path)] = set()
        for name in _imports(tree):
            graph[_module_name(path)].add(name)
    modules = set(graph)
    edges = {m: {n for n in imports if n in modules and n != m} for m, imports in graph.items()}
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as cycle:
        pytest.fail(f"import circle: {' -> '.join(cycle.args[1])}")
