"""The model bundle: one directory that scoring, evaluation and serving load, with no pickle in it.

    config.json             BundleConfig: the network (image size included), detector, training settings
    model.safetensors       weights
    genres.json             the GenreVocabulary the logits are ordered by
    metadata_encoder.json   the MetadataEncoder fitted on the training split
    thresholds.json         per-genre decision thresholds tuned on validation (calibrated probabilities)
    calibration.json        the Calibration: logit adjustment + per-genre Platt scaling fitted on validation
    metrics.json            training history and best validation metrics

This module owns the format: :func:`save_bundle` writes it and :func:`load_bundle` is the one
reader (the Predictor, evaluate, compare, embed, score and the service all use it), so a file
is named in one place. ``config.json`` carries a ``format_version``; a bundle written by an
older version is upgraded as it is read, so every bundle ever written keeps loading.

A bundle lives at a local path or a URI (``s3://bucket/models/<version>``). It is written whole or
not at all (staged locally, then published: renamed into place, or every file PUT and the
``_PUBLISHED`` manifest last), and a URI bundle is read from a local copy downloaded once per
machine (keyed by the URI and its manifest): every reader — a Ray actor, a Serve replica — is given
the URI and loads the bundle itself.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, model_validator

from posterfusion import __version__
from posterfusion.errors import UserFileNotFound
from posterfusion.features.metadata import MetadataEncoder
from posterfusion.features.objects import DetectorConfig
from posterfusion.features.vocab import GenreVocabulary
from posterfusion.locations import PUBLISHED, Location
from posterfusion.models.calibration import Calibration
from posterfusion.models.fusion import FusionConfig

FILES = ("config.json", "model.safetensors", "genres.json", "metadata_encoder.json",
         "thresholds.json", "calibration.json", "metrics.json")
VERSIONED = ("config.json", "model.safetensors", "thresholds.json", "calibration.json")
# 1: the image size beside the network config (until 2026-12-03); 2: inside it, training settings nested
FORMAT_VERSION = 2


class BundleConfig(BaseModel):
    """Everything needed to rebuild the network and its inputs exactly."""

    format_version: int = Field(FORMAT_VERSION, description="the bundle format it was written in")
    model: FusionConfig
    detector: DetectorConfig | None = Field(None, description="None: no object features")
    detector_id: str | None = None
    recipe: str | None = Field(None, description="the named recipe the run used, if any")
    train: dict = Field(default_factory=dict, description="the resolved training configuration of the run")
    catalogue: dict = Field(default_factory=dict, description="the training catalogue's path, fingerprint, rows")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    posterfusion_version: str = ""

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data):
        """Format 1 kept ``image_size`` beside ``model``: move it in (the version it was written in stays)."""
        if isinstance(data, dict) and data.get("format_version", 1) == 1 and "image_size" in data:
            data = {k: v for k, v in data.items() if k != "image_size"} | {
                "format_version": 1, "model": {**data["model"], "image_size": data["image_size"]}}
        return data


@dataclass(frozen=True)
class Bundle:
    """A bundle as read: its config and every small file, the weights read on demand.

    ``path`` is the local folder read (a URI bundle's cached copy); ``location`` is where it lives.
    """

    path: Path
    config: BundleConfig
    vocabulary: GenreVocabulary
    encoder: MetadataEncoder
    calibration: Calibration
    thresholds: np.ndarray  # (G,) float32, in the vocabulary's order
    version: str
    location: Location

    @property
    def genres(self) -> list[str]:
        return self.vocabulary.genres

    def state_dict(self) -> dict:
        from safetensors.torch import load_file  # torch: only where the weights are needed

        return load_file(str(self.path / "model.safetensors"))

    def network_state(self, member: int = 0) -> dict:
        """One network's state dict, as a :class:`~posterfusion.models.fusion.FusionNet` holds it: member
        ``member`` of an ensemble (stored whole as ``members.{i}.…``), else the bundle's one network."""
        if self.config.model.routing is not None:
            raise ValueError(f"{self.location} routes posters between two networks: name one of its sources")
        state = self.state_dict()
        if self.config.model.members == 1:
            return state
        if not 0 <= member < self.config.model.members:
            raise ValueError(f"{self.location} has {self.config.model.members} networks, no member {member}")
        prefix = f"members.{member}."
        return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}

    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())


def load_bundle(path: str | Path | Location) -> Bundle:
    """Read a bundle (not its weights) from a folder or a URI; what is no bundle is one clear error."""
    location = Location.parse(path)
    path = _local_copy(location)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise UserFileNotFound(f"{location} is not a model bundle: missing {', '.join(missing)}")
    vocabulary = GenreVocabulary.model_validate_json((path / "genres.json").read_text())
    thresholds = json.loads((path / "thresholds.json").read_text())
    return Bundle(path=path, config=BundleConfig.model_validate_json((path / "config.json").read_text()),
                  vocabulary=vocabulary,
                  encoder=MetadataEncoder.model_validate_json((path / "metadata_encoder.json").read_text()),
                  calibration=Calibration.model_validate_json((path / "calibration.json").read_text()),
                  thresholds=np.array([thresholds[g] for g in vocabulary.genres], dtype=np.float32),
                  version=model_version(path), location=location)


def _local_copy(location: Location) -> Path:
    """The bundle's local folder: itself, or a URI bundle's copy, downloaded once (published bundles only)."""
    if location.is_local:
        return location.local_path
    try:
        return location.cached_dir()
    except UserFileNotFound as error:
        raise UserFileNotFound(f"{location} is not a model bundle: {str(error).split(': ', 1)[-1]}") from None


def bundle_exists(path: str | Path | Location) -> bool:
    """Whether a bundle was written there (published whole: its weights locally, its manifest on a store)."""
    location = Location.parse(path)
    return (location / ("model.safetensors" if location.is_local else PUBLISHED)).is_file()


def model_version(bundle: str | Path) -> str:
    """Content hash of the weights and config: what scoring records as ``model_version``."""
    digest = hashlib.sha256()
    for name in VERSIONED:
        digest.update((Path(bundle) / name).read_bytes())
    return digest.hexdigest()[:16]


def save_bundle(out: str | Path | Location, *, config: BundleConfig, state_dict: dict, vocabulary: GenreVocabulary,
                encoder: MetadataEncoder, thresholds: dict[str, float], calibration: Calibration,
                metrics: dict) -> Location:
    """Write a bundle whole or not at all: staged in a local folder, then published to ``out``.

    Locally it is renamed into place (an older bundle moved aside first); on an object store every
    file is PUT and the ``_PUBLISHED`` manifest last, so a failure midway leaves no bundle a reader takes.
    """
    from safetensors.torch import save_file

    out = Location.parse(out)
    with tempfile.TemporaryDirectory(prefix="posterfusion-bundle-") as folder:
        staging = Path(folder)
        config = config.model_copy(update={"format_version": FORMAT_VERSION, "posterfusion_version": __version__})
        (staging / "config.json").write_text(config.model_dump_json(indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(staging / "model.safetensors"))
        (staging / "genres.json").write_text(vocabulary.model_dump_json(indent=2))
        (staging / "metadata_encoder.json").write_text(encoder.model_dump_json(indent=2))
        (staging / "thresholds.json").write_text(json.dumps(thresholds, indent=2))
        (staging / "calibration.json").write_text(calibration.model_dump_json(indent=2))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        out.publish_dir(staging)
    return out
