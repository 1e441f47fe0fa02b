"""Running the bundle's ``Predictor`` over a Ray Dataset: shared by ``evaluate`` and ``score``.

One actor class holds one ``Predictor`` (weights, encoder, and the detector if a poster needs
it, loaded once per actor). Cached object features are joined *inside* the actor, from one
Arrow table the driver puts in Ray's object store and every actor maps zero-copy: no extra
Ray Data operator, no per-batch task. Rows without a cached vector are detected in the same
actor, so detection and the CNN never form two stages that wait on each other. Batches stay
Arrow from the read to the output (no pandas round trip of the poster bytes). Like the model
itself, this is what training, batch jobs and serving share, so it lives beside the Predictor
and no job module is imported by another stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from posterfusion.errors import UserValueError
from posterfusion.features.metadata import INPUT_FIELDS
from posterfusion.locations import Location

PREDICT_COLUMNS = ["movie_id", "poster_sha256", "poster", *INPUT_FIELDS]


class CachedObjects:
    """The features job's object vectors and detections for the posters a job will see, to join by key.

    Built in the driver (:meth:`load`), shipped to actors as one object-store reference (Ray
    Data would pickle a bare table into every call's arguments). ``strict``: every row must have
    features (evaluation, where a silent re-detection would hide a stale cache); otherwise a
    missing row is detected by the actor.
    """

    def __init__(self, table: pa.Table, detector_id: str, strict: bool):
        self.detector_id, self.strict = detector_id, strict
        self._table, self._ref = table, None

    @classmethod
    def load(cls, features: Path | Location, detector_id: str, strict: bool = True, wanted: pa.Array | None = None,
             suffix: str | None = None) -> CachedObjects:
        return cls(cached_objects_table(features, detector_id, wanted, suffix), detector_id, strict)

    def share(self) -> CachedObjects:
        """Put the table in Ray's object store once; what is pickled from then on is the reference."""
        import ray

        if self._ref is None:
            self._ref = ray.put(self._table)
        return self

    def __getstate__(self) -> dict:
        if self._ref is None:
            raise RuntimeError("CachedObjects.share() first: the table travels through the object store")
        return {"detector_id": self.detector_id, "strict": self.strict, "_table": None, "_ref": self._ref}

    def table(self) -> pa.Table:
        """The lookup table: in an actor, read from the object store once (Arrow buffers: no copy)."""
        if self._table is None:
            import ray

            self._table = ray.get(self._ref)
        return self._table

    def join(self, batch: pa.Table) -> pa.Table:
        """``batch`` plus ``objects`` and ``cached_detections`` (null where the cache has no row)."""
        import pyarrow.compute as pc

        from posterfusion.features.objects import KEY_COLUMNS
        from posterfusion.features.store import join_keys

        table = self.table()
        index = pc.index_in(join_keys(batch, KEY_COLUMNS), value_set=table["key"])
        if self.strict and index.null_count:
            first = batch.filter(pc.is_null(index))["movie_id"][0]
            raise UserValueError(f"{index.null_count} posters have no cached object features for {self.detector_id}, "
                                 f"e.g. {first}: run `posterfusion features` first")
        return (batch.append_column("objects", table["objects"].take(index))
                .append_column("cached_detections", table["detections"].take(index)))


class PredictBatch:
    """Ray Data actor: catalogue rows (Arrow) in; probabilities, detections and per-poster errors out.

    Output columns: ``movie_id``, ``poster_sha256``, ``probabilities`` (one float per genre,
    NaN for a poster that was not scored), ``detections``, ``objects_source`` (``cache`` |
    ``detected`` | ``none``) and ``error`` (null, or why the poster was not scored).
    ``threads`` caps torch's threads so actors × threads never exceeds the cores they share.
    """

    def __init__(self, bundle: str, detect: bool = True, threads: int | None = None, device: str | None = None,
                 objects: CachedObjects | None = None):
        import torch

        from posterfusion.models.predictor import Predictor

        if threads:
            torch.set_num_threads(threads)
        self.predictor = Predictor(bundle, device=device, detect=detect)
        self.objects = objects

    def score(self, batch: pa.Table):
        """(the batch, with cached objects joined, and its :class:`~posterfusion.models.predictor.Scored`)."""
        if self.objects is not None:
            batch = self.objects.join(batch)
        columns = batch.column_names
        vectors = object_vectors(batch["objects"]) if "objects" in columns else None
        detections = batch["cached_detections"].to_pylist() if "cached_detections" in columns else None
        metadata = batch.select([f for f in INPUT_FIELDS if f in columns]).to_pandas()
        return batch, self.predictor.score(batch["poster"].to_pylist(), metadata, vectors, detections)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from posterfusion.features.objects import DETECTION_TYPE

        batch, scored = self.score(batch)
        return pa.table({
            "movie_id": batch["movie_id"], "poster_sha256": batch["poster_sha256"],
            "probabilities": list_array(scored.probabilities),
            "detections": pa.array(scored.detections, pa.list_(DETECTION_TYPE)),
            "objects_source": pa.array(scored.objects_source, pa.string()),
            "error": pa.array(scored.errors, pa.string()),
        })


def object_vectors(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """A list<float> column → one vector per row (None where null), from the flat buffer."""
    column = column.combine_chunks()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    if not valid.any():
        return [None] * len(column)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    matrix = iter(flat.reshape(int(valid.sum()), -1))
    return [next(matrix) if ok else None for ok in valid]


def list_array(matrix: np.ndarray) -> pa.ListArray:
    """An (N, K) matrix → a list<float32> column, built from the flat buffer (no per-row Python lists)."""
    rows, width = matrix.shape
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix, np.float32).ravel(), pa.float32()))


def cached_objects_table(features: Path | Location, detector_id: str, wanted: pa.Array | None = None,
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


def predict_dataset(dataset, bundle: Path | Location, batch_size: int = 32, actors: int | None = None,
                    detect: bool = True, objects: CachedObjects | None = None, actor_class: type = PredictBatch,
                    rows: int | None = None, **actor_kwargs):
    """``dataset`` (PREDICT_COLUMNS) → rows with ``probabilities``; ``objects`` are joined in the actors.

    Each actor gets the bundle's location (an absolute path or a URI) and loads it itself. With ``rows``
    known, the pool has no more actors than the rows are worth (:func:`~posterfusion.cluster.model_actors`):
    each actor loads the model (seconds), so a 66-poster catalogue gets one, not one per CPU.
    """
    from posterfusion.cluster import actor_pool, model_actors

    pool = actor_pool(actors, model_actors(rows, batch_size, actors) if rows else None, gpu_capable=True)
    where = str(Location.parse(bundle).absolute())
    return dataset.map_batches(
        actor_class, fn_constructor_kwargs={"bundle": where, "detect": detect, "threads": pool.threads,
                                            "objects": objects.share() if objects else None, **actor_kwargs},
        batch_format="pyarrow", batch_size=batch_size, compute=pool.strategy(),
        num_cpus=pool.cpus, num_gpus=pool.gpus)  # Ray Data SPREADs actors over the nodes by default
