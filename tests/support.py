"""Helpers the tests share: where the repository and ../shared are, small images, the sample pipeline.

Importable as ``support`` (pytest puts ``tests/`` on ``sys.path``; the repository root is never
on it, so ``import models`` cannot load a second copy of ``posterfusion.models``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POSTERFUSION_SHARED", REPO.parent / "shared"))


def jpeg_bytes(color=(200, 30, 30), size=(60, 90), quality=90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def noisy_jpeg_bytes(seed: int, size=(60, 90)) -> bytes:
    """A JPEG large enough that cutting it short really truncates image data."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


QUICK = {"model": {"backbone": "keras_cnn", "image_size": 48},  # the quick_bundles fixture's small network
         "optim": {"epochs": 4, "batch_size": 16, "lr": 3e-3, "backbone_lr": 3e-3}}


def sample_catalogue(root: Path, n: int, unlabelled: int = 0, seed: int = 0, features: bool = False) -> Path:
    """sample → catalogue (→ object features with the shared TFLite YOLO) under ``root``.

    Shared by the module fixtures of the training, evaluation and similarity tests.
    """
    from posterfusion.jobs.ingest import IngestConfig, run_ingest
    from posterfusion.jobs.sample import SampleConfig, write_sample

    sample = write_sample(SampleConfig(out=root / "sample", n=n, unlabelled=unlabelled, seed=seed))
    run_ingest(IngestConfig(sources=[f"multilabel:{root / 'sample'}"], metadata=[sample["metadata"]],
                            out=root / "catalogue"))
    if features:
        from posterfusion.jobs.features import FeaturesConfig, run_features

        run_features(FeaturesConfig(catalogue=root / "catalogue", out=root / "features", detector=detector()))
    return root


def detector():
    """The real COCO YOLOv8n (int8 TFLite, run by LiteRT) in ../shared."""
    from posterfusion.features.objects import DetectorConfig

    return DetectorConfig(weights=str(SHARED / "weights" / "yolov8n_int8.tflite"))


def cli_main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """``posterfusion ARGS`` through the console script's ``main`` in this process: (exit status, stdout,
    stderr), as a shell would see them; no Ray address (the cases that use it fail before Ray would start)."""
    import sys

    import pytest

    from posterfusion.jobs import cli

    monkeypatch.setattr(sys, "argv", ["posterfusion", *args])
    monkeypatch.setenv("RAY_ADDRESS", "")
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err
