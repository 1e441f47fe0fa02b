"""``posterfusion embed``: every catalogue poster's penultimate-layer embedding, with Ray Data.

An actor pool, each holding one ``Predictor``, embeds every catalogue poster (or one split) once
and writes ``OUT/embeddings/*.parquet`` plus ``_manifest.json`` (model version, genres, rows, the
files), published whole; :mod:`posterfusion.models.similarity` reads and searches them. ``OUT`` is a
local path (a hidden folder renamed into place) or a URI (the files under a fresh ``run-…`` prefix,
then the manifest naming them, then the previous run's files deleted).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from posterfusion.errors import UserValueError
from posterfusion.features.metadata import INPUT_FIELDS
from posterfusion.locations import Location, ParquetFiles
from posterfusion.models.bundle import load_bundle
from posterfusion.models.inference import CachedObjects, object_vectors
from posterfusion.models.similarity import EMBEDDINGS_SCHEMA, MANIFEST, read_embeddings_table

log = logging.getLogger(__name__)

READ_COLUMNS = ["movie_id", "poster_sha256", "poster", *INPUT_FIELDS]
TOP_GENRES = 3


class EmbedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Location = Field(description="model bundle (a path or a URI)")
    catalogue: Location
    out: Location = Field(description="embeddings are written to OUT/embeddings (a path or a URI)")
    split: str | None = Field(None, description="embed only this split; None = every catalogue row")
    features: Location | None = Field(None, description="the features job's output: a fused bundle's object "
                                      "vectors are read from it (a poster it lacks is detected); None = detect all")
    batch_size: int = Field(32, ge=1, description="posters per actor call")
    actors: int | None = Field(None, ge=1, description="Predictor actors; None = one per cluster CPU")
    io_cpus: float = Field(0.1, gt=0, description="CPU per read/filter/write task (fractional)")

    @field_validator("split")
    @classmethod
    def _known_split(cls, value: str | None) -> str | None:
        from posterfusion.features.catalogue import SPLITS

        if value is not None and value not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)} or None, got {value!r}")
        return value


class PosterEmbedder:
    """Ray Data actor: catalogue rows in, one embedding row per poster out.

    ``detect=False`` loads the detector only when the network reads objects, and then
    ``Predictor.score`` runs it exactly as scoring does, for the posters ``objects`` (the features
    job's cache, joined as scoring joins it) has no vector for. Catalogue posters passed the ingest
    decode check, so one that fails here means a damaged catalogue: it is an error.
    """

    def __init__(self, bundle: str, threads: int | None = None, objects: CachedObjects | None = None):
        import torch

        from posterfusion.models.predictor import Predictor

        if threads:
            torch.set_num_threads(threads)
        self.predictor = Predictor(bundle, detect=False)
        self.objects = objects

    def __call__(self, table: pa.Table) -> pa.Table:
        vectors = None
        if self.objects is not None:
            table = self.objects.join(table)
            vectors = object_vectors(table["objects"])
        batch = table.select([c for c in table.column_names if c not in ("objects", "cached_detections")]).to_pandas()
        scored = self.predictor.score(batch["poster"].tolist(), batch, vectors, embed=True)
        failed = [i for i, e in enumerate(scored.errors) if e is not None]
        if failed:
            raise ValueError(f"catalogue poster {batch['movie_id'][failed[0]]} cannot be scored: "
                             f"{scored.errors[failed[0]]}")
        return embeddings_table(batch, self.predictor.version, self.predictor.genres, scored.embeddings,
                                scored.probabilities)


def embeddings_table(batch: pd.DataFrame, version: str, genres: list[str], vectors: np.ndarray,
                     probs: np.ndarray) -> pa.Table:
    """Rows of :data:`EMBEDDINGS_SCHEMA`; list columns are built from flat buffers (no per-row lists)."""
    from posterfusion.models.inference import list_array
    from posterfusion.models.predictor import top_indices

    n = len(batch)
    order = top_indices(probs, TOP_GENRES)
    return pa.table({
        "movie_id": pa.array(batch["movie_id"].astype(str).tolist(), pa.string()),
        "poster_sha256": pa.array(batch["poster_sha256"].astype(str).tolist(), pa.string()),
        "model_version": pa.array([version] * n, pa.string()),
        "embedding": list_array(vectors),
        "top_genres": pa.array([[genres[i] for i in row] for row in order], pa.list_(pa.string())),
        "probabilities": list_array(probs),
    }, schema=EMBEDDINGS_SCHEMA)


def _keep_split(batch: pa.Table, split: str) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch["split"], split)).drop_columns(["split"])


def _count_rows(files: ParquetFiles, split: str | None) -> int:
    """Rows to embed, from Parquet footers (or the small ``split`` column): sizes the pool, checks the output."""
    import pyarrow.compute as pc

    if split is None:
        return files.dataset().count_rows()
    return int(pc.sum(pc.equal(files.read(["split"])["split"], split)).as_py() or 0)


def run_embeddings(config: EmbedConfig) -> dict:
    """Embed the catalogue's posters (or one split) with the bundle; replace ``OUT/embeddings``.

    Returns a summary: rows, dim, model_version, actors, seconds, posters/s, and the folder.
    """
    from posterfusion.cluster import actor_pool, model_actors
    from posterfusion.features.catalogue import catalogue_files

    started = time.perf_counter()
    bundle = load_bundle(config.model)  # fails early, on the driver, for a path that is no bundle
    config.out.check_store()
    files = catalogue_files(config.catalogue)
    rows = _count_rows(files, config.split)
    if not rows:
        raise UserValueError(f"the catalogue {config.catalogue} has no rows"
                         + (f" in split {config.split!r}" if config.split else ""))
    pool = actor_pool(config.actors, model_actors(rows, config.batch_size, config.actors), gpu_capable=True)
    version = bundle.version
    folder, token = config.out / "embeddings", uuid.uuid4().hex[:8]
    staging = config.out / f"_embeddings-{token}" if folder.is_local else folder / f"run-{token}"
    try:
        _write_embeddings(config, files, pool, staging, bundle.config.detector_id)
        written = staging.list_files(".parquet")
        if (count := read_embeddings_table(ParquetFiles(written), ["movie_id"]).num_rows) != rows:
            raise RuntimeError(f"embedded {count} posters but the catalogue selection has {rows}")
    except BaseException:
        staging.delete()
        raise
    manifest = {"model_version": version, "model": str(config.model), "catalogue": str(config.catalogue),
                "split": config.split, "rows": rows, "dim": bundle.config.model.embedding_dim,
                "genres": bundle.genres, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": [f.relative_to(staging if folder.is_local else folder) for f in written]}
    _publish(staging, folder, manifest)
    seconds = time.perf_counter() - started
    return {"rows": rows, "dim": bundle.config.model.embedding_dim, "model_version": version, "split": config.split,
            "actors": pool.size, "cpus_per_actor": pool.cpus, "gpus_per_actor": pool.gpus,
            "seconds": round(seconds, 2), "posters_per_s": round(rows / seconds, 2), "out": str(folder)}


def _write_embeddings(config: EmbedConfig, files: ParquetFiles, pool, staging: Location,
                      detector_id: str | None) -> None:
    import ray

    columns = READ_COLUMNS + (["split"] if config.split else [])
    ds = ray.data.read_parquet(files.paths, filesystem=files.filesystem, columns=columns, num_cpus=config.io_cpus)
    if config.split:
        ds = ds.map_batches(_keep_split, batch_format="pyarrow", fn_kwargs={"split": config.split},
                            num_cpus=config.io_cpus)
    # A catalogue file is one large block and a block goes to one actor: split it so all of them work.
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    objects = None
    if config.features is not None and detector_id:  # a network that reads no objects needs none
        objects = CachedObjects.load(config.features, detector_id, strict=False).share()
    ds = ds.map_batches(PosterEmbedder, fn_constructor_kwargs={"bundle": str(config.model.absolute()),
                                                               "threads": pool.threads, "objects": objects},
                        compute=pool.strategy(), num_cpus=pool.cpus,
                        num_gpus=pool.gpus, batch_size=config.batch_size, batch_format="pyarrow")
    ds.write_parquet(staging.fs_path, filesystem=staging.filesystem, ray_remote_args={"num_cpus": config.io_cpus})


def _publish(staging: Location, folder: Location, manifest: dict) -> None:
    """Readers see the previous embeddings or these, never a mix.

    Locally the finished folder is swapped into place by renames. On an object store the manifest,
    which names this run's files, replaces the previous one in one PUT; then the previous runs' files go.
    """
    if not folder.is_local:
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for old in folder.list_files():
            if not old.relative_to(folder).startswith(f"{staging.name}/"):
                old.delete()
        return
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    final, staged = folder.local_path, staging.local_path
    old = final.with_name(f"_old-{final.name}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    staged.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def format_embed_summary(summary: dict) -> str:
    gpu = f" + {summary['gpus_per_actor']} GPU" if summary["gpus_per_actor"] else ""
    return (f"embeddings: {summary['rows']} posters × {summary['dim']} dims (model {summary['model_version']}"
            f"{', split ' + summary['split'] if summary['split'] else ''}) on {summary['actors']} actors × "
            f"{summary['cpus_per_actor']} CPU{gpu}; {summary['seconds']} s, {summary['posters_per_s']} posters/s"
            f" → {summary['out']}")


