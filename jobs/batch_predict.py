"""Running the bundle's ``Predictor`` over a Ray Dataset: shared by ``evaluate``, ``embed`` and ``score``.

One actor class holds one ``Predictor`` (weights, detector, encoder loaded once per actor).
Cached object features are reused when the rows carry them, so detection does not run twice
for posters the features job already saw; rows without a cached vector are detected in the
same actor, so detection and the CNN never form two stages that wait on each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from posterfusion.jobs.train import META_COLUMNS

PREDICT_COLUMNS = ["movie_id", "poster_sha256", "poster", *META_COLUMNS]


class PredictBatch:
    """Ray Data actor: catalogue rows in; probabilities, detections and decode errors out.

    Output columns: ``movie_id``, ``poster_sha256``, ``probabilities`` (one float per genre,
    NaN for an undecodable poster), ``detections`` (list of dicts), ``objects_source``
    (``cache`` | ``detected`` | ``none``) and ``error`` (null, or why the poster was not scored).
    """

    def __init__(self, bundle: str, detect: bool = True):
        from posterfusion.models.predictor import Predictor

        self.predictor = Predictor(bundle, detect=detect)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        images, errors = decode_posters(batch["poster"])
        good = [i for i, image in enumerate(images) if image is not None]
        cached = [None if _missing(v) else v for v in batch["objects"]] if "objects" in batch else [None] * len(batch)
        detections = [_as_dicts(d) for d in batch["cached_detections"]] if "cached_detections" in batch \
            else [[] for _ in range(len(batch))]
        probs = np.full((len(batch), len(self.predictor.genres)), np.nan, dtype=np.float32)
        if good:
            objects = [cached[i] for i in good] if "objects" in batch else None
            probs[good], found = self.predictor.probabilities([images[i] for i in good],
                                                              batch.iloc[good].reset_index(drop=True), objects)
            for i, fresh in zip(good, found, strict=True):
                if cached[i] is None:
                    detections[i] = [_detection_dict(d) for d in fresh]
        out = batch[["movie_id", "poster_sha256"]].reset_index(drop=True)
        out["probabilities"] = list(probs)
        out["detections"] = detections
        out["objects_source"] = [self._source(cached[i], errors[i]) for i in range(len(batch))]
        out["error"] = errors
        return out

    def _source(self, cached, error: str | None) -> str:
        if error is not None or self.predictor.detector is None:
            return "none"
        return "cache" if cached is not None else "detected"


def decode_posters(posters) -> tuple[list, list[str | None]]:
    """(RGB image or None, None or the reason) per poster: one bad poster never fails its batch-mates."""
    from posterfusion.features.catalogue import PosterDecodeError, decode_rgb

    images, errors = [], []
    for data in posters:
        try:
            images.append(decode_rgb(data))
            errors.append(None)
        except PosterDecodeError as exc:
            images.append(None)
            errors.append(str(exc))
    return images, errors


def _detection_dict(detection) -> dict:
    from dataclasses import asdict

    return asdict(detection)


def _as_dicts(detections) -> list[dict]:
    """Cached detections arrive as an array of dicts (or None for an uncached poster)."""
    return [] if _missing(detections) else [dict(d) for d in detections]


def _missing(value) -> bool:
    """A null cell after Arrow → pandas: None, pd.NA or NaN, depending on the column's other values."""
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def cached_objects(features: Path, detector_id: str) -> dict[tuple[str, str], tuple[list, list]]:
    """(movie_id, poster_sha256) → (object vector, detections) from the features job's output."""
    from posterfusion.jobs.features import load_object_features

    table = load_object_features(features, detector_id)
    return {key: (list(v), list(d)) for key, v, d in
            zip(table.index, table["objects"], table["detections"], strict=True)}


def attach_cached_objects(dataset, features: Path, detector_id: str, strict: bool = True,
                          keys: set[tuple[str, str]] | None = None):
    """Add ``objects`` and ``cached_detections`` columns from the features job's output.

    ``strict``: every row must have features (evaluation, where a silent re-detection would
    hide a stale cache); otherwise missing rows get ``None`` and the actor detects them.
    ``keys``: only these (movie_id, poster_sha256) rows will be seen, so only they are shipped.
    The lookup goes to the object store once and each worker process reads it once.
    """
    import ray

    lookup = cached_objects(features, detector_id)
    if keys is not None:
        lookup = {k: v for k, v in lookup.items() if k in keys}
    return dataset.map_batches(_attach, batch_format="pyarrow", num_cpus=0.25,
                               fn_kwargs={"lookup": _LookupRef(ray.put(lookup)), "strict": strict,
                                          "detector_id": detector_id})


class _LookupRef:
    """An ObjectRef wrapper (Ray Data would not resolve a bare ref in ``fn_kwargs``), read once per process."""

    _cache: ClassVar[dict[str, dict]] = {}

    def __init__(self, ref):
        self.ref = ref

    def get(self) -> dict:
        import ray

        key = self.ref.hex()
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = ray.get(self.ref)
        return self._cache[key]


def _attach(batch, lookup: _LookupRef, strict: bool, detector_id: str):
    import pyarrow as pa

    from posterfusion.features.objects import DETECTION_TYPE

    table = lookup.get()
    keys = list(zip(batch["movie_id"].to_pylist(), batch["poster_sha256"].to_pylist(), strict=True))
    missing = [k for k in keys if k not in table]
    if strict and missing:
        raise KeyError(f"{len(missing)} posters have no cached object features for {detector_id}, "
                       f"e.g. {missing[0]}: run `posterfusion features` first")
    found = [table.get(k, (None, None)) for k in keys]  # explicit types: an all-missing block stays typed
    return (batch.append_column("objects", pa.array([f[0] for f in found], pa.list_(pa.float32())))
            .append_column("cached_detections", pa.array([f[1] for f in found], pa.list_(DETECTION_TYPE))))


def predict_dataset(dataset, bundle: Path, batch_size: int = 32, actors: int | None = None, detect: bool = True,
                    actor_class: type = PredictBatch, **actor_kwargs):
    """``dataset`` (PREDICT_COLUMNS, optionally ``objects``) → rows with ``probabilities``."""
    from ray.data import ActorPoolStrategy

    from posterfusion.cluster import actor_pool

    pool = actor_pool(actors, gpu_capable=True)
    return dataset.map_batches(
        actor_class, fn_constructor_kwargs={"bundle": str(bundle), "detect": detect, **actor_kwargs},
        batch_format="pandas", batch_size=batch_size, compute=ActorPoolStrategy(size=pool.size),
        num_cpus=pool.cpus, num_gpus=pool.gpus, scheduling_strategy="SPREAD")  # actors on every node
