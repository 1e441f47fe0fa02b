"""``Predictor``: the one class that turns posters (+ optional metadata) into genres.

Batch scoring (Ray Data actors) and the online service (Ray Serve replicas) both hold one
``Predictor`` loaded from a bundle, so the two paths cannot drift apart: same decode, same
preset, same detector, same thresholds.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from posterfusion.models.bundle import read_config


class PosterError(ValueError):
    """A poster that cannot be used, with its position in the batch and the reason."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"poster {index}: {reason}")
        self.index, self.reason = index, reason


class Prediction(BaseModel):
    probabilities: dict[str, float]
    top3: list[tuple[str, float]]
    genres: list[str]
    detections: list[dict]


class Predictor:
    """Loads a bundle once; predicts batches on CPU or GPU."""

    def __init__(self, bundle: str | Path, device: str | None = None, detect: bool = True):
        import torch
        from safetensors.torch import load_file

        from posterfusion.features.metadata import MetadataEncoder
        from posterfusion.features.presets import EvalPreset
        from posterfusion.features.vocab import GenreVocabulary
        from posterfusion.models.bundle import model_version
        from posterfusion.models.fusion import build_model

        self.bundle = Path(bundle)
        self.config = read_config(bundle)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vocabulary = GenreVocabulary.load(self.bundle / "genres.json")
        self.encoder = MetadataEncoder.load(self.bundle / "metadata_encoder.json")
        thresholds = json.loads((self.bundle / "thresholds.json").read_text())
        self.thresholds = np.array([thresholds[g] for g in self.vocabulary.genres], dtype=np.float32)
        self.preset = EvalPreset(size=self.config.image_size)
        self.model = build_model(self.config.model)
        self.model.load_state_dict(load_file(str(self.bundle / "model.safetensors")))
        self.model.to(self.device).eval()
        self.version = model_version(self.bundle)
        self.detector = self._load_detector(detect)

    def _load_detector(self, detect: bool):
        """The detector is required when the network reads objects; a failure is an error."""
        needed = self.model.uses_objects
        if self.config.detector is None or not (detect or needed):
            if needed:
                raise ValueError("bundle reads object features but names no detector")
            return None
        from posterfusion.features.objects import Detector

        return Detector(self.config.detector)

    @property
    def genres(self) -> list[str]:
        return self.vocabulary.genres

    def decode(self, posters: list[bytes]):
        """Bytes → RGB images, raising PosterError for the first unusable poster."""
        from posterfusion.features.catalogue import decode_rgb

        images = []
        for index, data in enumerate(posters):
            try:
                images.append(decode_rgb(data))
            except ValueError as exc:
                raise PosterError(index, str(exc)) from None
        return images

    def probabilities(self, images: list, metadata=None, objects=None) -> tuple[np.ndarray, list]:
        """RGB images (+ metadata, + precomputed object vectors) → (N, G) probabilities.

        ``metadata`` is a list of records (online requests, ``None`` = unknown) or a frame of
        catalogue rows (batch scoring). ``objects`` is an ``(N, D)`` array, or a list whose
        ``None`` entries are posters without cached features: the detector runs on exactly
        those (batch scoring reuses the features job's output and detects only what is new).
        Returns the probabilities and the fresh detections (empty for cached posters).
        """
        import torch

        from posterfusion.features.presets import image_to_tensor

        objects, detections = self.object_vectors(images, objects)
        batch = torch.stack([image_to_tensor(image, self.config.image_size) for image in images])
        meta = self._encode_metadata(metadata, len(images))
        with torch.inference_mode():
            logits = self.model(
                self.preset(batch.to(self.device)),
                torch.as_tensor(objects, device=self.device) if self.model.uses_objects else None,
                torch.as_tensor(meta, device=self.device) if self.model.uses_metadata else None,
            )
        return torch.sigmoid(logits.float()).cpu().numpy(), detections

    def object_vectors(self, images: list, objects=None) -> tuple[np.ndarray | None, list]:
        """Object vectors for a batch: given ones kept, missing ones detected (if a detector is loaded)."""
        from posterfusion.features.objects import object_vector

        detections: list = [[] for _ in images]
        if self.detector is None:
            return (None if objects is None else np.stack(objects)), detections
        vectors = [None] * len(images) if objects is None else list(objects)
        todo = [i for i, v in enumerate(vectors) if v is None]
        if todo:
            for i, found in zip(todo, self.detector.detect([images[i] for i in todo]), strict=True):
                detections[i], vectors[i] = found, object_vector(found, len(self.detector.names))
        return np.stack(vectors).astype(np.float32), detections

    def _encode_metadata(self, metadata, n: int) -> np.ndarray:
        import pandas as pd

        if isinstance(metadata, pd.DataFrame):
            return self.encoder.transform(metadata)
        return self.encoder.transform_records(metadata if metadata is not None else [None] * n)

    def predict(self, posters: list[bytes], metadata: list[dict | None] | None = None) -> list[Prediction]:
        """Poster bytes → one Prediction each (top-3, thresholded genres, detections)."""
        probs, detections = self.probabilities(self.decode(posters), metadata)
        return [self._prediction(p, d) for p, d in zip(probs, detections, strict=True)]

    def _prediction(self, probs: np.ndarray, detections: list) -> Prediction:
        order = np.argsort(-probs)
        return Prediction(
            probabilities={g: round(float(p), 6) for g, p in zip(self.genres, probs, strict=True)},
            top3=[(self.genres[i], round(float(probs[i]), 6)) for i in order[:3]],
            genres=[g for g, p, t in zip(self.genres, probs, self.thresholds, strict=True) if p >= t],
            detections=[asdict(d) for d in detections],
        )

    def embeddings(self, images: list, metadata=None, objects: np.ndarray | None = None) -> np.ndarray:
        """RGB images (+ metadata, + object vectors) → L2-normalised penultimate features ``(N, hidden)``.

        Same inputs as :meth:`probabilities`, so a poster embedded for similarity search sees exactly
        the network inputs it is scored with. Unit length turns cosine similarity into a dot product.
        """
        return self.embed_and_score(images, metadata, objects)[0]

    def embed_and_score(self, images: list, metadata=None,
                        objects: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(L2-normalised embeddings, (N, G) probabilities) from one forward pass.

        The embeddings job stores both; running :meth:`probabilities` beside :meth:`embeddings` would
        pay for the backbone twice. The detector runs only when the network reads objects (no
        detections are returned here). An all-zero feature vector stays zero (similar to nothing).
        """
        import torch

        from posterfusion.features.presets import image_to_tensor

        if self.model.uses_objects:
            objects = self.object_vectors(images, objects)[0]
        batch = torch.stack([image_to_tensor(image, self.config.image_size) for image in images])
        meta = self._encode_metadata(metadata, len(images))
        with torch.inference_mode():
            hidden = self.model.embed(
                self.preset(batch.to(self.device)),
                torch.as_tensor(objects, device=self.device) if self.model.uses_objects else None,
                torch.as_tensor(meta, device=self.device) if self.model.uses_metadata else None,
            )
            logits = self.model.classifier(hidden).float()  # forward() minus dropout, an identity in eval
            unit = torch.nn.functional.normalize(hidden.float(), dim=1)
        return unit.cpu().numpy(), torch.sigmoid(logits).cpu().numpy()
