"""Running the bundle's ``Predictor`` over a Ray Dataset: shared by ``evaluate`` and ``score``.

One actor class holds one ``Predictor`` (weights, detector, encoder loaded once per actor).
Cached object features are reused when the rows carry them, so detection does not run twice
for posters the features job already saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from posterfusion.jobs.train import META_COLUMNS

PREDICT_COLUMNS = ["movie_id", "poster_sha256", "poster", *META_COLUMNS]


class PredictBatch:
    """Ray Data actor: catalogue rows in, one probability column per genre out (+ errors)."""

    def __init__(self, bundle: str, detect: bool = True):
        from posterfusion.models.predictor import Predictor

        self.predictor = Predictor(bundle, detect=detect)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from posterfusion.features.catalogue import PosterDecodeError, decode_rgb

        images, errors = [], []
        for data in batch["poster"]:
            try:
                images.append(decode_rgb(data))
                errors.append(None)
            except PosterDecodeError as exc:
                images.append(None)
                errors.append(str(exc))
        good = [i for i, image in enumerate(images) if image is not None]
        probs = np.full((len(batch), len(self.predictor.genres)), np.nan, dtype=np.float32)
        detections: list = [[] for _ in range(len(batch))]
        if good:
            objects = np.stack(batch["objects"].iloc[good].to_list()) if "objects" in batch else None
            scored, found = self.predictor.probabilities([images[i] for i in good],
                                                         batch.iloc[good].reset_index(drop=True), objects)
            probs[good] = scored
            for i, d in zip(good, found, strict=True):
                detections[i] = d
        out = batch[["movie_id", "poster_sha256"]].reset_index(drop=True)
        out["probabilities"] = list(probs)
        out["detections"] = [[_detection_dict(d) for d in ds] for ds in detections]
        out["error"] = errors
        return out


def _detection_dict(detection) -> dict:
    from dataclasses import asdict

    return asdict(detection)


def predict_dataset(dataset, bundle: Path, batch_size: int = 32, actors: int | None = None, detect: bool = True):
    """``dataset`` (PREDICT_COLUMNS, optionally ``objects``) → rows with ``probabilities``."""
    from ray.data import ActorPoolStrategy

    from posterfusion.cluster import actor_pool

    pool = actor_pool(actors, gpu_capable=True)
    return dataset.map_batches(
        PredictBatch, fn_constructor_kwargs={"bundle": str(bundle), "detect": detect}, batch_format="pandas",
        batch_size=batch_size, compute=ActorPoolStrategy(size=pool.size), num_cpus=pool.cpus, num_gpus=pool.gpus)
