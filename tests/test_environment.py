"""The environment every Ray process inherits from a local start."""

from __future__ import annotations

import os


def test_a_relative_weights_folder_is_made_absolute_for_workers_in_other_directories(monkeypatch, tmp_path):
    from posterfusion.cluster import prepare_environment

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POSTERFUSION_WEIGHTS", "../shared/weights")
    prepare_environment()
    assert os.environ["POSTERFUSION_WEIGHTS"] == os.path.abspath(tmp_path / "../shared/weights")
