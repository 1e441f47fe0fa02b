"""Shared fixtures. Tests read as the specification; see each module's docstring."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POSTERFUSION_SHARED", REPO.parent / "shared"))

os.environ.setdefault("POSTERFUSION_HOME", str(REPO / ".state"))
# Every Ray the tests start (the session's, the multi-node cluster's, the CLI's) keeps its auth
# token under the project's Ray HOME; the test process must present it to all of them, and
# Ray reads these once, at import, so they are set before anything imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN_PATH", os.path.join(os.environ["POSTERFUSION_HOME"], "ray-home", ".ray",
                                                          "auth_token"))
from posterfusion.cluster import prepare_environment  # noqa: E402

prepare_environment()  # before ray is imported anywhere in the session


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (a start costs seconds)."""
    from posterfusion.cluster import ClusterConfig, ray_cluster

    with ray_cluster(ClusterConfig(num_cpus=2)) as info:
        yield info


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real posters beside the checkout. Missing data is an error, not a skip."""
    data = SHARED / "data"
    if not (data / "multilabel-posters" / "train.csv").is_file():
        pytest.fail(f"real data not found at {data}: clone with ../shared beside the repo "
                    "or set POSTERFUSION_SHARED")
    return data


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
