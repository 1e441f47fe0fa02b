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
