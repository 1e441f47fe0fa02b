"""Running the bundle's ``Predictor`` over a Ray Dataset: shared by ``evaluate``, ``embed`` and ``score``.

One actor class holds one ``Predictor`` (weights, detector, encoder loaded once per actor).
Cached object features are reused when the rows carry them, so detection does not run twice
for posters the features job already saw; rows without a cached vector are detected in the
same actor, so detection and the CNN never form two stages that wait on each other. Like the
model itself, this is what training, batch jobs and serving share, so it lives beside the
Predictor and no job module is imported by another stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from posterfusion.features.metadata import FIELDS

PREDICT_COLUMNS = ["movie_id", "poster_sha256", "poster", *FIELDS]


class PredictBatch:
    """Ray Data actor: catalogue rows in; probabilities, detections and per-poster errors out.

    Output columns: ``movie_id``, ``poster_sha256``, ``probabilities`` (one float per genre,
    NaN for a poster that was not scored), ``detections`` (list of dicts), ``objects_source``
    (``cache`` | ``detected`` | ``none``) and ``error`` (null, or why the poster was not scored).
    ``threads`` caps torch's threads so actors × threads never exceeds the cores they share.
    """

    def __init__(self, bundle: str, detect: bool = True, threads: int | None = None, device: str | None = None):
        import torch

        from posterfusion.models.predictor import Predictor

        if threads:
            torch.set_num_threads(threads)
        self.predictor = Predictor(bundle, device=device, detect=detect)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.reset_index(drop=True)
        objects = [None if _missing(v) else v for v in batch["objects"]] if "objects" in batch else None
        cached = [None if _missing(d) else [dict(x) for x in d] for d in batch["cached_detections"]] \
            if "cached_detections" in batch else None
        scored = self.predictor.score(batch["poster"].tolist(), batch, objects, cached)
        out = batch[["movie_id", "poster_sha256"]].copy()
        out["probabilities"] = list(scored.probabilities)
        out["detections"] = scored.detections
        out["objects_source"] = scored.objects_source
        out["error"] = scored.errors
        return out


def _missing(value) -> bool:
    """A null cell after Arrow → pandas: None, pd.NA or NaN, depending on the column's other values."""
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def cached_objects(features: Path, detector_id: str) -> dict[tuple[str, str], tuple[list, list]]:
    """(movie_id, poster_sha256) → (object vector, detections) from the features job's output."""
    from posterfusion.features.objects import load_object_features

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
    from posterfusion.cluster import actor_pool

    pool = actor_pool(actors, gpu_capable=True)
    return dataset.map_batches(
        actor_class, fn_constructor_kwargs={"bundle": str(bundle), "detect": detect, "threads": pool.threads,
                                            **actor_kwargs},
        batch_format="pandas", batch_size=batch_size, compute=pool.strategy(),
        num_cpus=pool.cpus, num_gpus=pool.gpus)  # Ray Data SPREADs actors over the nodes by default
