"""``posterfusion score``: the whole catalogue through the bundle's Predictor, incrementally.

Stages: read the keys already scored for this model version (pyarrow, no Ray) and the
catalogue's keys → keep only the rows not yet scored → Ray Data streams those posters through
a pool of ``ScoreBatch`` actors (decode → detection for posters without cached features → CNN
→ fusion, in one actor so two model stages never wait on each other) → the driver commits
the rows in files of ``rows_per_file``, each written to a dot-file and renamed into place.

Layout: ``OUT/run_date=YYYY-MM-DD/part-<run_id>-<seq>.parquet`` (Hive partitioning: any
Parquet reader sees ``run_date`` as a column) and ``OUT/_runs/<run_id>.json``, the run summary.

Why the driver writes: a committed file is a finished piece of work. A run that is stopped
(the driver killed, the node lost) keeps every file it committed, and the next run scores
only the rest, so each catalogue row ends up scored exactly once; a worker lost mid-run is
retried by Ray Data itself and its rows reach the driver once. Rows are keyed by
(``movie_id``, ``poster_sha256``, ``model_version``): the poster's hash and the model's hash
say whether the stored answer is still the answer, and ``movie_id`` is part of the key
because the fused model reads each movie's metadata (two movies may share a poster).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from posterfusion.features.catalogue import catalogue_files
from posterfusion.features.objects import DETECTION_TYPE
from posterfusion.jobs.batch_predict import PREDICT_COLUMNS, PredictBatch, attach_cached_objects, predict_dataset

log = logging.getLogger(__name__)

KEY_COLUMNS = ["movie_id", "poster_sha256", "model_version"]
OBJECT_SUMMARY_TYPE = pa.struct([
    pa.field("name", pa.string()),
    pa.field("count", pa.int32()),
    pa.field("max_confidence", pa.float32()),
])


class ScoreConfig(BaseModel):
    model: Path
    catalogue: Path
    out: Path
    features: Path | None = Field(None, description="cached object features to reuse; the rest are detected")
    run_date: date = Field(default_factory=lambda: datetime.now(UTC).date(), description="output partition")
    batch_size: int = Field(32, ge=1, description="posters per actor call")
    actors: int | None = Field(None, ge=1, description="Predictor actors; None = sized from the cluster")
    rows_per_file: int = Field(1000, ge=1, description="rows per committed Parquet file")
    stop_after_files: int | None = Field(None, ge=1, description="testing: stop the run (as if killed) after "
                                         "committing this many files")
    kill_worker_after: int | None = Field(None, ge=1, description="testing: the first actor to reach this many "
                                          "batches exits its process, once per run (Ray restarts it)")


def predictions_schema(genres: list[str]) -> pa.Schema:
    """The predictions table for one genre vocabulary: a ``p_<genre>`` column per genre."""
    return pa.schema([
        pa.field("movie_id", pa.string(), nullable=False),
        pa.field("poster_sha256", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("ms", tz="UTC"), nullable=False),
        *[pa.field(probability_column(g), pa.float32()) for g in genres],
        pa.field("top3", pa.list_(pa.string())),
        pa.field("top3_probabilities", pa.list_(pa.float32())),
        pa.field("genres", pa.list_(pa.string())),
        pa.field("objects", pa.list_(OBJECT_SUMMARY_TYPE)),
        pa.field("detections", pa.list_(DETECTION_TYPE)),
        pa.field("objects_source", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ])


def probability_column(genre: str) -> str:
    return f"p_{genre}"


class ScoreBatch(PredictBatch):
    """PredictBatch plus the output row format: top-3, thresholded set, object summary."""

    def __init__(self, bundle: str, detect: bool, run_id: str, chaos_dir: str | None = None,
                 kill_worker_after: int | None = None):
        super().__init__(bundle, detect=detect)
        self.run_id, self.chaos_dir, self.kill_after, self.calls = run_id, chaos_dir, kill_worker_after, 0
        self.schema = predictions_schema(self.predictor.genres)

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        self.calls += 1
        self._maybe_die()
        scored = super().__call__(batch)
        return format_rows(scored, self.predictor.genres, self.predictor.thresholds, self.predictor.version,
                           self.run_id, self.schema)

    def _maybe_die(self) -> None:
        """Failure injection for the exactly-once tests: one hard process exit per run."""
        if self.kill_after is None or self.calls < self.kill_after:
            return
        marker = Path(self.chaos_dir) / f"killed-{self.run_id}"
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            with open(marker, "x") as handle:
                handle.write(str(os.getpid()))
        except FileExistsError:
            return
        log.warning("failure injection: actor %d exits after %d batches", os.getpid(), self.calls)
        os._exit(1)


def format_rows(scored: pd.DataFrame, genres: list[str], thresholds: np.ndarray, version: str, run_id: str,
                schema: pa.Schema) -> pa.Table:
    """PredictBatch output → prediction rows (an undecodable poster keeps its row, with ``error``)."""
    probs = np.stack(scored["probabilities"].to_list()) if len(scored) else np.zeros((0, len(genres)), np.float32)
    ok = ~np.isnan(probs).any(axis=1)
    order = np.argsort(-np.nan_to_num(probs, nan=-1.0), axis=1)[:, :3]
    columns = {
        "movie_id": scored["movie_id"].to_list(),
        "poster_sha256": scored["poster_sha256"].to_list(),
        "model_version": [version] * len(scored),
        "run_id": [run_id] * len(scored),
        "scored_at": [datetime.now(UTC)] * len(scored),
        **{probability_column(g): pa.array(probs[:, j], pa.float32(), mask=~ok) for j, g in enumerate(genres)},
        "top3": [[genres[j] for j in row] if good else None for row, good in zip(order, ok, strict=True)],
        "top3_probabilities": [probs[i, row].tolist() if good else None for i, (row, good) in
                               enumerate(zip(order, ok, strict=True))],
        "genres": [[g for g, p, t in zip(genres, row, thresholds, strict=True) if p >= t] if good else None
                   for row, good in zip(probs, ok, strict=True)],
        "objects": [object_summary(d) for d in scored["detections"]],
        "detections": [list(d) for d in scored["detections"]],
        "objects_source": scored["objects_source"].to_list(),
        "error": scored["error"].to_list(),
    }
    return pa.table(columns, schema=schema)


def object_summary(detections: list[dict]) -> list[dict]:
    """Detections → one entry per class: how many, and the best confidence; most frequent first."""
    counts = Counter(d["name"] for d in detections)
    best: dict[str, float] = {}
    for d in detections:
        best[d["name"]] = max(best.get(d["name"], 0.0), float(d["confidence"]))
    return [{"name": name, "count": n, "max_confidence": best[name]} for name, n in counts.most_common()]


def prediction_files(out: Path | str) -> list[str]:
    """Committed prediction files; dot-files (being written) and ``_`` folders are skipped."""
    root = Path(out)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.glob("run_date=*/*.parquet") if not p.name.startswith((".", "_")))


def read_predictions(out: Path | str, columns: list[str] | None = None) -> pd.DataFrame:
    """Every stored prediction row (all runs, all model versions), with ``run_date``.

    Files of bundles with different genre vocabularies have different ``p_*`` columns; the
    schemas are unified, so a genre one bundle lacks reads as null.
    """
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    files = prediction_files(out)
    if not files:
        return pd.DataFrame(columns=columns or [*KEY_COLUMNS, "run_date"])
    partitioning = pads.partitioning(pa.schema([("run_date", pa.string())]), flavor="hive")
    schema = pa.unify_schemas([pq.read_schema(f) for f in files] + [partitioning.schema])
    dataset = pads.dataset(files, schema=schema, format="parquet", partitioning=partitioning,
                           partition_base_dir=str(out))
    return dataset.to_table(columns=columns).to_pandas()


def _scored_keys(out: Path) -> pa.Array:
    import pyarrow.parquet as pq

    tables = [pq.read_table(f, columns=KEY_COLUMNS) for f in prediction_files(out)]
    if not tables:
        return pa.array([], pa.string())
    return _keys(pa.concat_tables(tables), None)


def _keys(table: pa.Table, version: str | None) -> pa.Array:
    """One string per row joining movie_id, poster_sha256 and the model version."""
    versions = table["model_version"] if version is None else pa.array([version] * len(table), pa.string())
    keys = pc.binary_join_element_wise(table["movie_id"], table["poster_sha256"], versions, "\x1f")
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


def _keep(batch: pa.Table, keys: pa.Array, version: str) -> pa.Table:
    """Ray Data map: only the catalogue rows not yet scored by this model version."""
    return batch.filter(pc.is_in(_keys(batch, version), value_set=keys))


def plan(config: ScoreConfig, version: str) -> tuple[list[str], pa.Array, int]:
    """(catalogue files holding work, keys to score, catalogue rows), from the keys alone."""
    import pyarrow.parquet as pq

    done = _scored_keys(config.out)
    files = catalogue_files(config.catalogue)
    wanted = [_keys(pq.read_table(f, columns=["movie_id", "poster_sha256"]), version) for f in files]
    missing = [keys.filter(pc.invert(pc.is_in(keys, value_set=done))) for keys in wanted]
    todo_files = [f for f, keys in zip(files, missing, strict=True) if len(keys)]
    return todo_files, pc.unique(pa.concat_arrays(missing)) if missing else pa.array([], pa.string()), \
        sum(len(k) for k in wanted)


def run_score(config: ScoreConfig) -> dict:
    """Score every catalogue row this model version has not scored yet; return the run summary."""
    from posterfusion.models.bundle import model_version, read_config

    started = time.perf_counter()
    version, bundle = model_version(config.model), read_config(config.model)
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    _clean_partial_files(config.out)
    files, todo, rows = plan(config, version)
    log.info("score %s: %d catalogue rows, %d to score", version, rows, len(todo))
    summary = {"run_id": run_id, "run_date": config.run_date.isoformat(), "model_version": version,
               "catalogue_rows": rows, "already_scored": rows - len(todo), "to_score": len(todo)}
    written = _stream(config, bundle, version, run_id, files, todo) if len(todo) else []
    seconds = time.perf_counter() - started
    summary |= describe_run(config.out, written, seconds, run_id)
    summary["reconciles"] = summary["scored"] == len(todo)
    _save_summary(config.out, summary)
    return summary


def _stream(config: ScoreConfig, bundle, version: str, run_id: str, files: list[str], todo: pa.Array) -> list[Path]:
    """Ray Data: catalogue rows → ScoreBatch actors → files committed by this driver."""
    import ray

    dataset = ray.data.read_parquet(files, columns=PREDICT_COLUMNS, num_cpus=0.1)
    dataset = dataset.map_batches(_keep, batch_format="pyarrow", fn_kwargs={"keys": todo, "version": version},
                                  num_cpus=0.1)
    dataset = dataset.repartition(target_num_rows_per_block=config.batch_size)  # a block goes to one actor
    detect = True
    if config.features is not None and bundle.detector_id:
        wanted = {tuple(k.split("\x1f")[:2]) for k in todo.to_pylist()}
        dataset = attach_cached_objects(dataset, config.features, bundle.detector_id, strict=False, keys=wanted)
    scored = predict_dataset(dataset, config.model, batch_size=config.batch_size, actors=config.actors,
                             detect=detect, actor_class=ScoreBatch, run_id=run_id,
                             chaos_dir=str(config.out / "_chaos"), kill_worker_after=config.kill_worker_after)
    writer = _Committer(config.out / f"run_date={config.run_date.isoformat()}", run_id, config.rows_per_file,
                        config.stop_after_files)
    for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.add(batch)
    writer.flush()
    return writer.files


class RunStopped(RuntimeError):
    """Raised by the ``stop_after_files`` failure injection: the run ends as if killed."""


class _Committer:
    """Buffers rows and commits them as whole files: write a dot-file, fsync, rename."""

    def __init__(self, folder: Path, run_id: str, rows_per_file: int, stop_after: int | None):
        self.folder, self.run_id, self.rows_per_file, self.stop_after = folder, run_id, rows_per_file, stop_after
        self.pending: list[pa.Table] = []
        self.files: list[Path] = []

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
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"part-{self.run_id}-{len(self.files):05d}.parquet"
        staging = final.with_name("." + final.name)
        pq.write_table(table, staging)
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        staging.rename(final)
        self.files.append(final)
        log.info("score: committed %s (%d rows)", final.name, len(table))
        if self.stop_after is not None and len(self.files) >= self.stop_after:
            raise RunStopped(f"stopped after {len(self.files)} files (failure injection)")


def _clean_partial_files(out: Path) -> None:
    """Dot-files left by a run that was killed while writing hold no committed rows."""
    for partial in Path(out).glob("run_date=*/.part-*.parquet"):
        partial.unlink(missing_ok=True)


def describe_run(out: Path, written: list[Path], seconds: float, run_id: str) -> dict:
    """Counts read back from this run's files, the genre distribution, and drift against the last run."""
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f) for f in written]) if written else None
    frame = table.to_pandas() if table is not None else pd.DataFrame()
    genres = [c[2:] for c in frame.columns if c.startswith("p_")]
    ok = frame[frame["error"].isna()] if len(frame) else frame
    means = {g: round(float(ok[probability_column(g)].mean()), 5) for g in genres} if len(ok) else {}
    errors = frame["error"].dropna() if len(frame) else pd.Series(dtype=str)
    return {
        "scored": len(frame),
        "errors": {"count": len(errors), "reasons": dict(Counter(e.split(":", 1)[0] for e in errors))},
        "seconds": round(seconds, 2),
        "posters_per_s": round(len(frame) / seconds, 2) if seconds > 0 else None,
        "objects_source": dict(Counter(frame["objects_source"])) if len(frame) else {},
        "genre_distribution": {
            "mean_probability": means,
            "predicted_count": dict(Counter(g for gs in ok["genres"] for g in gs)) if len(ok) else {},
        },
        "drift": drift(out, means, run_id),
        "files": [str(f) for f in written],
    }


def drift(out: Path, means: dict[str, float], run_id: str) -> dict | None:
    """Each genre's mean probability now minus in the last run that scored anything.

    Nightly runs score the posters that are new that night; a large shift says the new
    posters (or a new model version) look unlike yesterday's. None when there is no
    earlier run or nothing was scored now.
    """
    previous = [s for s in _summaries(out) if s["run_id"] != run_id and s.get("scored")]
    if not means or not previous:
        return None
    last = previous[-1]
    before = last["genre_distribution"]["mean_probability"]
    shift = {g: round(means[g] - before[g], 5) for g in means if g in before}
    largest = max(shift, key=lambda g: abs(shift[g])) if shift else None
    return {"previous_run": last["run_id"], "previous_model_version": last["model_version"],
            "mean_probability_shift": shift, "largest": {"genre": largest, "shift": shift.get(largest)}}


def _summaries(out: Path) -> list[dict]:
    folder = Path(out) / "_runs"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _save_summary(out: Path, summary: dict) -> None:
    folder = Path(out) / "_runs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{summary['run_id']}.json").write_text(json.dumps(summary, indent=2))


def format_score_summary(summary: dict) -> str:
    """The lines the CLI prints; the last is the one-line summary a nightly log is grepped for."""
    counts = summary["genre_distribution"]["predicted_count"]
    top = ", ".join(f"{g} {n}" for g, n in sorted(counts.items(), key=lambda kv: -kv[1])[:6]) or "-"
    shift = summary["drift"]
    drift_line = (f"largest shift vs run {shift['previous_run']}: {shift['largest']['genre']} "
                  f"{shift['largest']['shift']:+.4f}" if shift else "no earlier run to compare")
    return "\n".join([
        f"  predicted genres: {top}",
        f"  drift: {drift_line}",
        f"  objects: {summary['objects_source'] or '-'}; errors: {summary['errors']['count']} "
        f"{summary['errors']['reasons'] or ''}".rstrip(),
        f"score {summary['run_id']}: model {summary['model_version']}, {summary['catalogue_rows']} catalogue rows, "
        f"{summary['already_scored']} already scored, {summary['scored']} scored in {summary['seconds']} s "
        f"({summary['posters_per_s']} posters/s) "
        f"[{'reconciles' if summary['reconciles'] else 'DOES NOT RECONCILE'}]",
    ])
