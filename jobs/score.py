"""``posterfusion score``: the whole catalogue through the bundle's Predictor, incrementally, exactly once.

Stages: take the output's lease → read the keys already scored for this model version and the
catalogue's keys (pyarrow, no Ray) → Ray Data streams only the rows not yet scored through a
pool of ``ScoreBatch`` actors (decode → detection for posters without cached features → CNN →
fusion, in one actor so two model stages never wait on each other) → the driver commits the
rows in files of ``rows_per_file`` under the lease → the run summary
(:mod:`posterfusion.jobs.score_summary`) is committed beside them. Every location — the bundle,
the catalogue, the features, ``OUT`` — is a local path or a URI (``s3://bucket/predictions``); for
``OUT`` only the lease differs (:func:`~posterfusion.features.lease.output_lease`).

Exactly once: rows are keyed by (``movie_id``, ``poster_sha256``, ``model_version``) — the
poster's hash and the model's hash say whether a stored answer is still the answer, and the
movie is in the key because the fused model reads each movie's metadata. A committed file is
finished work: a stopped run keeps what it committed and the next run scores only the rest; a
worker lost mid-run is retried by Ray Data and its rows reach the driver once. Two runs never
write one output at once: the first holds an exclusive lease (:func:`~posterfusion.features.
lease.output_lease`), and the second waits for it (``wait_s``) or stops with a clear error; a run
whose lease was taken over (it looked dead) is fenced and commits nothing more. A poster
that cannot be scored (undecodable, detector failure, bad metadata) is a row with its reason in
``error``, never a failed run.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, date, datetime

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from posterfusion.features.catalogue import catalogue_files
from posterfusion.features.lease import OutputLease, output_lease
from posterfusion.features.store import keep_keys, plan_missing
from posterfusion.locations import Location, ParquetFiles
from posterfusion.models.inference import PREDICT_COLUMNS, CachedObjects, PredictBatch, predict_dataset
from posterfusion.models.predictions import KEY_COLUMNS, prediction_rows, predictions_schema, scored_keys

log = logging.getLogger(__name__)
PART_FILES = "run_date=*/part-*.parquet"  # what runs commit under OUT


class ScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Location = Field(description="model bundle: a local path or a URI")
    catalogue: Location
    out: Location = Field(description="predictions: a local path or an object-store prefix (s3://bucket/prefix)")
    features: Location | None = Field(None, description="cached object features to reuse; the rest are detected")
    run_date: date = Field(default_factory=lambda: datetime.now(UTC).date(), description="output partition")
    batch_size: int = Field(32, ge=1, description="posters per actor call")
    actors: int | None = Field(None, ge=1, description="Predictor actors; None = sized from the cluster")
    rows_per_file: int = Field(1000, ge=1, description="rows per committed Parquet file")
    wait_s: float = Field(0.0, ge=0, description="how long to wait for another run's lease on OUT")


class ScoreBatch(PredictBatch):
    """PredictBatch plus the output row format: top-3, thresholded set, object summary."""

    def __init__(self, bundle: str, detect: bool, run_id: str, threads: int | None = None,
                 objects: CachedObjects | None = None, device: str | None = None):
        super().__init__(bundle, detect=detect, threads=threads, device=device, objects=objects)
        self.run_id = run_id
        self.schema = predictions_schema(self.predictor.genres)

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch, scored = self.score(batch)
        return prediction_rows(batch, scored, self.predictor, self.run_id, self.schema)


def plan(config: ScoreConfig, version: str) -> tuple[ParquetFiles, pa.Array, int]:
    """(catalogue files holding work, keys to score, catalogue rows), from the keys alone."""
    return plan_missing(catalogue_files(config.catalogue), scored_keys(config.out), KEY_COLUMNS[:2], suffix=version)


def run_score(config: ScoreConfig) -> dict:
    """Score every catalogue row this model version has not scored yet; return the run summary."""
    from posterfusion.jobs.score_summary import describe_run, save_summary
    from posterfusion.models.bundle import load_bundle

    started = time.perf_counter()
    loaded = load_bundle(config.model)  # names what is missing, before any work
    bundle, version = loaded.config, loaded.version
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    with output_lease(config.out, run_id, wait_s=config.wait_s) as lease:
        removed = lease.remove_dead(PART_FILES)  # what dead runs left: staging dot-files, or uncommitted uploads
        files, todo, rows = plan(config, version)
        log.info("score %s: %d catalogue rows, %d to score", version, rows, len(todo))
        summary = {"run_id": run_id, "run_date": config.run_date.isoformat(), "model_version": version,
                   "catalogue_rows": rows, "already_scored": rows - len(todo), "to_score": len(todo),
                   "dead_staging_files_removed": removed}
        written, stats = _stream(config, bundle, version, run_id, files, todo, lease) if len(todo) else ([], None)
        summary |= describe_run(config.out, written, time.perf_counter() - started, run_id, version)
        summary["ray_data_stats"] = stats  # where the time went, per operator (Ray Data's own account)
        summary["reconciles"] = summary["scored"] == len(todo)
        save_summary(config.out, summary)
    return summary


def _stream(config: ScoreConfig, bundle, version: str, run_id: str, files: ParquetFiles,
            todo: pa.Array, lease: OutputLease) -> tuple[list[Location], str]:
    """Ray Data: catalogue rows → ScoreBatch actors → files committed by this driver."""
    import ray

    dataset = ray.data.read_parquet(files.paths, filesystem=files.filesystem, columns=PREDICT_COLUMNS, num_cpus=0.1)
    dataset = dataset.map_batches(keep_keys, batch_format="pyarrow", num_cpus=0.1,
                                  fn_kwargs={"keys": todo, "columns": KEY_COLUMNS[:2], "suffix": version})
    dataset = dataset.repartition(target_num_rows_per_block=config.batch_size)  # a block goes to one actor
    objects = None
    if config.features is not None and bundle.detector_id:  # only the rows to score are shipped
        objects = CachedObjects.load(config.features, bundle.detector_id, strict=False, wanted=todo, suffix=version)
    scored = predict_dataset(dataset, config.model, batch_size=config.batch_size, actors=config.actors,
                             detect=True, objects=objects, actor_class=ScoreBatch, rows=len(todo),
                             run_id=run_id)
    committer = Committer(config.out / f"run_date={config.run_date.isoformat()}", run_id, config.rows_per_file,
                          lease)
    for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        committer.add(batch)
    committer.flush()
    return committer.files, scored.stats()


class Committer:
    """Buffers rows and commits them as whole files, numbered per run, through the lease (fenced, recorded)."""

    def __init__(self, folder: Location, run_id: str, rows_per_file: int, lease: OutputLease):
        self.folder, self.run_id, self.rows_per_file, self.lease = folder, run_id, rows_per_file, lease
        self.pending: list[pa.Table] = []
        self.files: list[Location] = []

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        if sum(len(t) for t in self.pending) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        import pyarrow.parquet as pq

        table = pa.concat_tables(self.pending) if self.pending else None
        self.pending = []
        if table is None or not len(table):
            return
        final = self.folder / f"part-{self.run_id}-{len(self.files):05d}.parquet"
        self.lease.check()  # fenced: a run whose lease was taken over never writes beside the new holder
        self.commit(final, lambda staging: pq.write_table(table, staging))
        self.files.append(final)
        log.info("score: committed %s (%d rows)", final.name, len(table))

    def commit(self, path: Location, write) -> Location:
        return self.lease.commit(path, write)


def format_score_summary(summary: dict) -> str:
    """The lines the CLI prints; the last is the one-line summary a nightly log is grepped for."""
    from posterfusion.jobs.score_summary import format_drift

    counts = summary["genre_distribution"]["predicted_count"]
    top = ", ".join(f"{g} {n}" for g, n in sorted(counts.items(), key=lambda kv: -kv[1])[:6]) or "-"
    return "\n".join([
        f"  predicted genres: {top}",
        f"  drift: {format_drift(summary['drift'])}",
        f"  objects: {summary['objects_source'] or '-'}; errors: {summary['errors']['count']} "
        f"{summary['errors']['reasons'] or ''}".rstrip(),
        f"score {summary['run_id']}: model {summary['model_version']}, {summary['catalogue_rows']} catalogue rows, "
        f"{summary['already_scored']} already scored, {summary['scored']} scored in {summary['seconds']} s "
        f"({summary['posters_per_s']} posters/s) "
        f"[{'reconciles' if summary['reconciles'] else 'DOES NOT RECONCILE'}]",
    ])
