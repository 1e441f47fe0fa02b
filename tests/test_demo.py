"""``posterfusion demo`` as a newcomer sees it: a short, quiet console that ends with what to do next."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from support import SHARED

pytestmark = pytest.mark.slow

NOISE = re.compile(r"ERROR|Traceback|[Dd]eprecat|\d\d:\d\d:\d\d,\d{3} E \d+|Warning:")


def test_the_demo_prints_stage_lines_the_table_and_next_steps_and_nothing_alarming(ray_session, tmp_path):
    """On a tiny sample, attached to the test session's Ray (the CLI itself, in a subprocess)."""
    env = os.environ | {"RAY_ADDRESS": ray_session.address, "POSTERFUSION_WEIGHTS": str(SHARED / "weights")}
    env.pop("POSTERFUSION_VERBOSE", None)
    run = subprocess.run([sys.executable, "-m", "posterfusion", "demo", "--n", "60", "--work", str(tmp_path / "demo"),
                          "--detector", str(SHARED / "weights" / "yolov8n_int8.tflite")],
                         capture_output=True, text=True, env=env, timeout=900)
    lines = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 0, "\n".join(lines[-40:])
    alarming = [i for i, line in enumerate(lines) if NOISE.search(line)]
    assert not alarming, "\n".join(lines[max(0, alarming[0] - 5):alarming[0] + 30])
    assert len(lines) <= 80, len(lines)
    stages = [line.split("]")[0] + "]" for line in lines if line.startswith("[")]
    for stage in ("[sample]", "[ingest]", "[features]", "[train]", "[predict]", "[evaluate]", "[score]"):
        assert stage in stages, stage
    tail = "\n".join(lines[-20:])
    assert "Evaluation" in tail and "| hit@3 |" in tail and "label_prior" in tail
    assert "Predictions for every catalogue poster" in tail
    assert "posterfusion serve --model" in tail and "http://127.0.0.1:8000/" in tail and "posterfusion compare" in tail
