"""The bundle format: one reader for every caller, and bundles written by older versions keep loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from posterfusion.models.bundle import FORMAT_VERSION, load_bundle, model_version
from posterfusion.models.predictor import Predictor

from support import jpeg_bytes

pytestmark = pytest.mark.slow


def _as_format_1(bundle, target):
    """The bundle as format 1 wrote it: the image size beside the network's config, training settings flat."""
    shutil.copytree(bundle, target)
    config = json.loads((target / "config.json").read_text())
    config.pop("format_version")
    config["image_size"] = config["model"].pop("image_size")
    config["train"] = {"variant": config["model"]["variant"], "epochs": 1, "backbone": config["model"]["backbone"]}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def test_a_format_1_bundle_still_loads_predicts_and_keeps_its_version(small_fused, tmp_path):
    old = _as_format_1(small_fused / "bundle", tmp_path / "old")
    loaded = load_bundle(old)
    assert loaded.config.format_version == 1 < FORMAT_VERSION
    assert loaded.config.model.image_size == load_bundle(small_fused / "bundle").config.model.image_size
    assert loaded.version == model_version(old)  # the bytes it was scored under: still its version
    posters = [jpeg_bytes((200, 30, 30)), jpeg_bytes((30, 200, 30))]
    new, then = Predictor(small_fused / "bundle"), Predictor(old)
    np.testing.assert_allclose(then.score(posters).probabilities, new.score(posters).probabilities, atol=1e-6)


def test_compare_finds_a_format_1_bundle_stale_and_says_why(small_fused, tmp_path):
    from posterfusion.jobs.compare import stale_reason
    from posterfusion.jobs.train.recipes import resolve

    old = load_bundle(_as_format_1(small_fused / "bundle", tmp_path / "old"))
    train = resolve("quick", {"data": {"catalogue": str(small_fused / "catalogue")}}, check_weights=False)
    assert stale_reason(old, train) == f"written in bundle format 1 (now {FORMAT_VERSION})"


def test_a_path_that_is_no_bundle_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"is not a model bundle: missing model\.safetensors"):
        load_bundle(tmp_path)
