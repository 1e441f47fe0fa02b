"""The model bundle: one directory that scoring and serving load, with no pickle in it.

    config.json             BundleConfig: fusion network, image size, detector, version
    model.safetensors       weights
    genres.json             the GenreVocabulary the logits are ordered by
    metadata_encoder.json   the MetadataEncoder fitted on the training split
    thresholds.json         per-genre decision thresholds tuned on validation (calibrated probabilities)
    calibration.json        the Calibration: logit adjustment + per-genre Platt scaling fitted on validation
    metrics.json            training history and best validation metrics
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from posterfusion.errors import UserFileNotFound
from posterfusion.features.objects import DetectorConfig
from posterfusion.models.fusion import FusionConfig

FILES = ("config.json", "model.safetensors", "genres.json", "metadata_encoder.json",
         "thresholds.json", "calibration.json", "metrics.json")
VERSIONED = ("config.json", "model.safetensors", "thresholds.json", "calibration.json")


class BundleConfig(BaseModel):
    """Everything needed to rebuild the network and its inputs exactly."""

    model: FusionConfig
    image_size: int = Field(description="EvalPreset size the network was trained at")
    detector: DetectorConfig | None = Field(None, description="None: no object features")
    detector_id: str | None = None
    recipe: str | None = Field(None, description="the named recipe the run used, if any")
    train: dict = Field(default_factory=dict, description="the resolved TrainConfig of the run")
    catalogue: dict = Field(default_factory=dict, description="the training catalogue's path, fingerprint, rows")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    posterfusion_version: str = ""


def model_version(bundle: str | Path) -> str:
    """Content hash of the weights and config: what scoring records as ``model_version``."""
    digest = hashlib.sha256()
    for name in VERSIONED:
        digest.update((Path(bundle) / name).read_bytes())
    return digest.hexdigest()[:16]


def save_bundle(out: str | Path, *, config: BundleConfig, state_dict: dict, vocabulary, encoder,
                thresholds: dict[str, float], calibration, metrics: dict) -> Path:
    """Write a bundle directory; weights are made contiguous for safetensors."""
    from safetensors.torch import save_file

    from posterfusion import __version__

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(update={"posterfusion_version": __version__})
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(out / "model.safetensors"))
    vocabulary.save(out / "genres.json")
    encoder.save(out / "metadata_encoder.json")
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2))
    (out / "calibration.json").write_text(calibration.model_dump_json(indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return out


def read_config(bundle: str | Path) -> BundleConfig:
    missing = [name for name in FILES if not (Path(bundle) / name).is_file()]
    if missing:
        raise UserFileNotFound(f"{bundle} is not a model bundle: missing {', '.join(missing)}")
    return BundleConfig.model_validate_json((Path(bundle) / "config.json").read_text())
