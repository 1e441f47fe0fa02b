"""``Predictor``: the one class that turns posters (+ optional metadata) into genres.

Batch scoring (Ray Data actors), evaluation, embedding, ``predict`` and the online service (Ray
Serve replicas) all hold one ``Predictor`` loaded from a bundle and call its public methods, so
the paths cannot drift apart: same decode, same preset, same detector, same calibration, same
thresholds, same top-k.

* :meth:`Predictor.score` — the batch method: poster bytes (+ metadata, + cached object
  vectors) → a :class:`Scored` batch of arrays. Every poster is isolated: one that cannot be
  decoded, whose metadata cannot be encoded, or that makes the detector raise gets an error
  reason in its row and the rest of the batch is scored.
* :meth:`Predictor.predict` / :meth:`Predictor.predict_one` — :class:`Prediction` objects
  (probabilities, top-3, thresholded genres, objects) for the CLI and the service.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from posterfusion.models.bundle import load_bundle
from posterfusion.models.hardware import Amp

TOP_K = 3


class PosterError(ValueError):
    """A poster that cannot be scored: a stable reason code (``not_an_image``, …) and a message."""

    def __init__(self, reason: str, index: int | None = None):
        super().__init__(reason if index is None else f"poster {index}: {reason}")
        self.reason, self.index = reason, index

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


class ObjectCount(BaseModel):
    name: str
    count: int
    max_confidence: float


class Prediction(BaseModel):
    probabilities: dict[str, float]
    top3: list[tuple[str, float]]
    genres: list[str]
    objects: list[ObjectCount]
    detections: list[dict]
    objects_source: str


@dataclass
class Scored:
    """A scored batch, aligned with the input posters; a row with an ``error`` has NaN probabilities."""

    probabilities: np.ndarray  # (N, G) float32, calibrated
    detections: list[list[dict]]  # detections found now, or the cached ones passed in
    objects_source: list[str]  # cache | detected | none
    errors: list[str | None]
    embeddings: np.ndarray | None = None  # (N, hidden) unit rows, when asked for

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def top_indices(probabilities: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """(N, k) genre indices, most probable first; ties keep vocabulary order (a stable sort)."""
    return np.argsort(-np.nan_to_num(np.asarray(probabilities), nan=-1.0), axis=-1, kind="stable")[..., :k]


def object_summary(detections: Sequence[dict]) -> list[dict]:
    """Detections → one entry per class: how many, and the best confidence; most frequent first."""
    from collections import Counter

    counts = Counter(d["name"] for d in detections)
    best: dict[str, float] = {}
    for d in detections:
        best[d["name"]] = max(best.get(d["name"], 0.0), float(d["confidence"]))
    return [{"name": name, "count": n, "max_confidence": best[name]} for name, n in counts.most_common()]


class Predictor:
    """Loads a bundle once; scores batches on CPU or GPU."""

    def __init__(self, bundle: str | Path, device: str | None = None, detect: bool = True, limits=None,
                 precision: Amp = "auto"):
        """``precision``: the autocast of the network's forward pass. ``auto`` is bf16 on GPUs and on
        CPUs with native bf16 — 3–4× the fp32 speed of MobileNetV2 here, the same validation macro AUC (0.7842 vs
        0.7839) and probabilities within 0.002 on average (docs/results.md) — else full precision.
        Training validates its fine-tuned epochs under the same autocast.
        """
        import torch

        from posterfusion.features.catalogue import DecodeLimits
        from posterfusion.models.network import build_model, input_preset

        loaded = load_bundle(bundle)
        self.bundle = loaded.path
        self.limits = limits or DecodeLimits()  # the service passes its stricter SERVING_LIMITS
        self.config = loaded.config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vocabulary, self.encoder, self.calibration = loaded.vocabulary, loaded.encoder, loaded.calibration
        self.thresholds = loaded.thresholds
        self.preset = input_preset(self.config.model)
        self.model = build_model(self.config.model, load_weights=False)  # every weight comes from the bundle
        self.model.load_state_dict(loaded.state_dict())
        # channels-last: oneDNN's (and cuDNN's) fast convolution layout, 1.6× here on its own
        self.model.to(self.device, memory_format=torch.channels_last).eval()
        self.precision = precision
        self.version = loaded.version
        if self.model.uses_objects and self.config.detector is None:
            raise ValueError("bundle reads object features but names no detector")
        self.detects = self.config.detector is not None and (detect or self.model.uses_objects)
        self._detector = None

    @property
    def detector(self):
        """The bundle's own detector (checked against its recorded id), loaded on first use.

        A batch job whose posters all have cached object features never loads it: no
        Ultralytics import, no weights, no warm-up in its actors. The service touches it at
        start, so no request pays for the load.
        """
        if self._detector is None and self.detects:
            from posterfusion.features.objects import load_detector

            self._detector = load_detector(self.config.detector, expected_id=self.config.detector_id)
        return self._detector

    @property
    def genres(self) -> list[str]:
        return self.vocabulary.genres

    # --- the batch method -------------------------------------------------------------------

    def score(self, posters: Sequence[bytes | None], metadata=None, objects: Sequence | None = None,
              detections: Sequence | None = None, embed: bool = False) -> Scored:
        """Poster bytes → calibrated probabilities, every poster isolated from the others.

        ``metadata``: a frame of catalogue rows, or one record (dict or None) per poster.
        ``objects``: per poster a cached object vector or None (then the detector runs on it);
        ``detections``: the cached boxes that go with them. ``embed`` also returns the
        L2-normalised penultimate features (one forward pass for both).
        """
        n = len(posters)
        errors: list[str | None] = [None] * n
        images = self._decode(posters, errors)
        meta = self._metadata(metadata, n, errors)
        vectors, found, sources = self._objects(images, objects, detections, errors)
        probabilities = np.full((n, len(self.genres)), np.nan, dtype=np.float32)
        embeddings = np.zeros((n, self.config.model.embedding_dim), np.float32) if embed else None
        good = [i for i in range(n) if errors[i] is None]
        if good:
            hidden, logits = self._forward([images[i] for i in good], meta[good],
                                           vectors[good] if vectors is not None else None, embed)
            probabilities[good] = self.calibration.probabilities(logits)
            if embed:
                embeddings[good] = hidden
        return Scored(probabilities=probabilities, detections=found,
                      objects_source=[s if e is None else "none" for s, e in zip(sources, errors, strict=True)],
                      errors=errors, embeddings=embeddings)

    def _decode(self, posters: Sequence[bytes | None], errors: list[str | None]) -> list:
        from posterfusion.features.catalogue import PosterDecodeError, decode_rgb

        images = []
        for i, data in enumerate(posters):
            try:
                images.append(decode_rgb(data, self.limits))
            except PosterDecodeError as exc:
                images.append(None)
                errors[i] = str(exc)
        return images

    def _metadata(self, metadata, n: int, errors: list[str | None]) -> np.ndarray:
        """Encoded metadata rows; a record that cannot be encoded is that poster's error, not the batch's."""
        import pandas as pd

        if isinstance(metadata, pd.DataFrame):
            return self.encoder.transform(metadata.reset_index(drop=True))
        records = list(metadata) if metadata is not None else [None] * n
        try:
            return self.encoder.transform_records(records)
        except (ValueError, TypeError, OverflowError):
            rows = []
            for i, record in enumerate(records):
                try:
                    rows.append(self.encoder.transform_records([record])[0])
                except (ValueError, TypeError, OverflowError) as exc:
                    rows.append(self.encoder.transform_records([None])[0])
                    errors[i] = errors[i] or f"invalid_metadata: {exc}"[:300]
            return np.stack(rows)

    def _objects(self, images: list, objects, detections, errors: list[str | None]):
        """(object vectors or None, detections per poster, source per poster); detects what is not cached."""
        from posterfusion.features.object_encoding import classes_of_bag, encode_objects

        n = len(images)
        encoding = self.config.model.object_encoding
        found: list[list[dict]] = [[] if detections is None or detections[i] is None else list(detections[i])
                                   for i in range(n)]
        if not self.detects:
            return None, found, ["none"] * n
        # only a variant that reads objects needs their vectors; the others detect for the answer alone
        vectors = np.zeros((n, self.config.model.object_dim), np.float32) if self.model.uses_objects else None
        sources = ["cache"] * n
        todo = []
        for i in range(n):
            cached = None if objects is None else objects[i]
            if cached is not None:
                if vectors is not None:  # the cache holds the bag; any other encoding comes from its detections
                    vectors[i] = (np.asarray(cached, np.float32) if encoding == "bag"
                                  else encode_objects(found[i], classes_of_bag(len(cached)), encoding))
            elif errors[i] is None:
                todo.append(i)
        if not todo:
            return vectors, found, sources
        classes = len(self.detector.names)
        for i, result in zip(todo, self.detector.detect_each([images[i] for i in todo]), strict=True):
            sources[i] = "detected"
            if isinstance(result, str):
                errors[i] = result
                continue
            found[i] = [asdict(d) for d in result]
            if vectors is not None:
                vectors[i] = encode_objects(result, classes, encoding)
        return vectors, found, sources

    def _forward(self, images: list, metadata: np.ndarray, objects: np.ndarray | None, embed: bool):
        """(unit-length hidden features or None, raw logits) for decoded images, in one batch.

        Without ``embed`` only the logits are computed: a routed network then runs one of its two
        networks per poster, where its embeddings need its cnn network on every poster."""
        import torch

        from posterfusion.features.presets import image_to_tensor
        from posterfusion.models.hardware import autocast

        batch = torch.stack([image_to_tensor(image, self.config.model.size) for image in images])
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        inputs = (self.preset(batch),
                  torch.as_tensor(objects, device=self.device) if self.model.uses_objects else None,
                  torch.as_tensor(metadata, device=self.device) if self.model.uses_metadata else None)
        with torch.inference_mode(), autocast(self.device, self.precision):
            if not embed:
                return None, self.model(*inputs).float().cpu().numpy()
            hidden, logits = self.model.embed_and_logits(*inputs)
            unit = torch.nn.functional.normalize(hidden.float(), dim=1)
        return unit.cpu().numpy(), logits.float().cpu().numpy()

    # --- predictions for people -------------------------------------------------------------

    def prediction(self, scored: Scored, i: int) -> Prediction:
        """Row ``i`` of a scored batch as a :class:`Prediction` (raises its PosterError if it failed)."""
        if scored.errors[i] is not None:
            raise PosterError(scored.errors[i], i)
        probs = scored.probabilities[i]
        return Prediction(
            probabilities={g: round(float(p), 6) for g, p in zip(self.genres, probs, strict=True)},
            top3=[(self.genres[j], round(float(probs[j]), 6)) for j in top_indices(probs)],
            genres=[g for g, p, t in zip(self.genres, probs, self.thresholds, strict=True) if p >= t],
            objects=object_summary(scored.detections[i]), detections=scored.detections[i],
            objects_source=scored.objects_source[i])

    def predict(self, posters: Sequence[bytes], metadata: Sequence[dict | None] | None = None
                ) -> list[Prediction | PosterError]:
        """One Prediction per poster, or the PosterError saying why that poster was not scored."""
        scored = self.score(posters, metadata)
        return [self.prediction(scored, i) if scored.errors[i] is None else PosterError(scored.errors[i], i)
                for i in range(len(posters))]

    def predict_one(self, poster: bytes, metadata: dict | None = None) -> Prediction:
        """One poster's Prediction; raises :class:`PosterError` when it cannot be scored."""
        return self.prediction(self.score([poster], [metadata]), 0)

    def embed_one(self, poster: bytes, metadata: dict | None = None) -> np.ndarray:
        """One poster's unit-length embedding (the similarity query); raises :class:`PosterError`."""
        scored = self.score([poster], [metadata], embed=True)
        if scored.errors[0] is not None:
            raise PosterError(scored.errors[0])
        return scored.embeddings[0]
