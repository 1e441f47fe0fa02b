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

import numpy as np
import pandas as pd
import pyarrow as pa

from posterfusion.errors import UserValueError
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


def cached_objects_table(features: Path, detector_id: str, wanted: pa.Array | None = None,
                         suffix: str | None = None) -> pa.Table:
    """The features job's good rows as Arrow: ``key`` (joined movie_id, poster_sha256), ``objects``, ``detections``.

    One row per key, the newest run's. ``wanted``: only keys in it (joined with ``suffix``,
    e.g. the scorer's to-do keys, which end in the model version). Arrow, not Python objects:
    ~1 KB a poster, and shipped through the object store it is read zero-copy by every process.
    """
    import pyarrow.compute as pc

    from posterfusion.features.objects import KEY_COLUMNS, object_store
    from posterfusion.features.store import join_keys

    table = object_store(features, detector_id).read([*KEY_COLUMNS, "objects", "detections", "detect_error"])
    table = table.filter(pc.is_null(table["detect_error"]))
    keys = join_keys(table, KEY_COLUMNS)
    newest = pc.subtract(len(keys) - 1, pc.index_in(pc.unique(keys[::-1]), value_set=keys[::-1]))  # last per key
    table = table.take(newest)
    keys = keys.take(newest)
    if wanted is not None:
        table = table.filter(pc.is_in(join_keys(table, KEY_COLUMNS, suffix), value_set=wanted))
        keys = join_keys(table, KEY_COLUMNS)
    return pa.table({"key": keys, "objects": table["objects"], "detections": table["detections"]})


def cached_objects(features: Path, detector_id: str) -> dict[tuple[str, str], tuple[list, list]]:
    """(movie_id, poster_sha256) → (object vector, detections), as Python objects (for a plain loop)."""
    from posterfusion.features.store import split_key

    table = cached_objects_table(features, detector_id)
    return {split_key(k): (v, d) for k, v, d in zip(table["key"].to_pylist(), table["objects"].to_pylist(),
                                                    table["detections"].to_pylist(), strict=True)}


def attach_cached_objects(dataset, features: Path, detector_id: str, strict: bool = True,
                          wanted: pa.Array | None = None, suffix: str | None = None):
    """Add ``objects`` and ``cached_detections`` columns from the features job's output.

    ``strict``: every row must have features (evaluation, where a silent re-detection would
    hide a stale cache); otherwise missing rows get nulls and the actor detects them.
    ``wanted``/``suffix``: only these rows will be seen (see :func:`cached_objects_table`), so only
    they are shipped. The lookup table goes to the object store once; each task maps it
    zero-copy and takes its batch's rows by index, so no process holds a copy of its own.
    """
    import ray

    table = cached_objects_table(features, detector_id, wanted, suffix)
    return dataset.map_batches(_attach, batch_format="pyarrow", num_cpus=0.25,
                               fn_kwargs={"lookup": _LookupRef(ray.put(table)), "strict": strict,
                                          "detector_id": detector_id})


class _LookupRef:
    """An ObjectRef wrapper: Ray Data would resolve a bare ref in ``fn_kwargs`` into a pickled copy per call."""

    def __init__(self, ref):
        self.ref = ref

    def get(self) -> pa.Table:
        import ray

        return ray.get(self.ref)  # Arrow buffers stay in the shared object store: no copy


def _attach(batch: pa.Table, lookup: _LookupRef, strict: bool, detector_id: str) -> pa.Table:
    import pyarrow.compute as pc

    from posterfusion.features.objects import KEY_COLUMNS
    from posterfusion.features.store import join_keys

    table = lookup.get()
    index = pc.index_in(join_keys(batch, KEY_COLUMNS), value_set=table["key"])
    missing = index.null_count
    if strict and missing:
        first = batch.filter(pc.is_null(index))["movie_id"][0]
        raise UserValueError(f"{missing} posters have no cached object features for {detector_id}, "
                       f"e.g. {first}: run `posterfusion features` first")
    return (batch.append_column("objects", table["objects"].take(index))
            .append_column("cached_detections", table["detections"].take(index)))


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
