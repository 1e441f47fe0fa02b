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


def test_dependencies_point_one_way_no_stage_below_the_jobs_imports_a_job():
    """cluster ← features ← models ← serving / jobs: only jobs (and the CLI among them) import jobs."""
    offenders = [f"{path}: {name}" for path, tree in _modules("cluster", "features", "models", "serving")
                 for name in _imports(tree) if name.startswith("posterfusion.jobs")]
    assert not offenders, offenders


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
