"""The predictions table: what batch scoring stores per (movie, poster, model version), and how to read it.

Layout: ``OUT/run_date=YYYY-MM-DD/part-<run_id>-<seq>.parquet`` (Hive partitioning, so any
Parquet reader sees ``run_date`` as a column), ``OUT`` a local path or an object-store prefix, files
committed whole under the output's lease. Readers read only committed files
(:func:`posterfusion.features.lease.committed_files`: on an object store the files named in its
commit records, never a bare listing). The schema depends on the bundle's genre vocabulary: one
``p_<genre>`` column per genre.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa

from posterfusion.features.objects import DETECTION_TYPE
from posterfusion.locations import Location

KEY_COLUMNS = ["movie_id", "poster_sha256", "model_version"]
FILES = "run_date=*/*.parquet"
OBJECT_SUMMARY_TYPE = pa.struct([
    pa.field("name", pa.string()),
    pa.field("count", pa.int32()),
    pa.field("max_confidence", pa.float32()),
])


def probability_column(genre: str) -> str:
    return f"p_{genre}"


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


def prediction_rows(batch: pa.Table, scored, predictor, run_id: str, schema: pa.Schema) -> pa.Table:
    """A scored batch (:class:`~posterfusion.models.predictor.Scored`, aligned with ``batch``'s
    ``movie_id``/``poster_sha256``) → prediction rows; a poster that was not scored keeps its row, with ``error``.

    Top-3 and the thresholded set come from the Predictor's own :func:`top_indices` and thresholds.
    """
    from posterfusion.models.predictor import object_summary, top_indices

    genres = predictor.genres
    probs = scored.probabilities
    ok = scored.ok
    order = top_indices(probs)
    n = len(probs)
    return pa.table({
        "movie_id": batch["movie_id"],
        "poster_sha256": batch["poster_sha256"],
        "model_version": pa.array([predictor.version] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "scored_at": pa.array([datetime.now(UTC)] * n, pa.timestamp("ms", tz="UTC")),
        **{probability_column(g): pa.array(probs[:, j], pa.float32(), mask=~ok) for j, g in enumerate(genres)},
        "top3": [[genres[j] for j in row] if good else None for row, good in zip(order, ok, strict=True)],
        "top3_probabilities": [probs[i, row].tolist() if good else None
                               for i, (row, good) in enumerate(zip(order, ok, strict=True))],
        "genres": [[g for g, p, t in zip(genres, row, predictor.thresholds, strict=True) if p >= t] if good else None
                   for row, good in zip(probs, ok, strict=True)],
        "objects": [object_summary(d) for d in scored.detections],
        "detections": scored.detections,
        "objects_source": scored.objects_source,
        "error": pa.array(scored.errors, pa.string()),
    }, schema=schema)


def prediction_files(out: Path | str | Location) -> list[str]:
    """Committed prediction files (paths, or URIs on an object store)."""
    from posterfusion.features.lease import committed_files

    return [str(f) for f in committed_files(out, FILES)]


def read_predictions(out: Path | str | Location, columns: list[str] | None = None) -> pd.DataFrame:
    """Every stored prediction row (all runs, all model versions), with ``run_date``.

    Files of bundles with different genre vocabularies have different ``p_*`` columns; the
    schemas are unified, so a genre one bundle lacks reads as null.
    """
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    out, files = _committed(out)
    if not files:
        return pd.DataFrame(columns=columns or [*KEY_COLUMNS, "run_date"])
    partitioning = pads.partitioning(pa.schema([("run_date", pa.string())]), flavor="hive")
    schema = pa.unify_schemas([pq.read_schema(f, filesystem=out.filesystem) for f in files] + [partitioning.schema])
    dataset = pads.dataset(files, schema=schema, format="parquet", partitioning=partitioning,
                           partition_base_dir=out.fs_path, filesystem=out.filesystem)
    return dataset.to_table(columns=columns).to_pandas()


def scored_keys(out: Path | str | Location) -> pa.Array:
    """``movie_id``/``poster_sha256``/``model_version`` keys of every stored row."""
    import pyarrow.parquet as pq

    from posterfusion.features.store import join_keys

    out, files = _committed(out)
    tables = [pq.read_table(f, columns=KEY_COLUMNS, filesystem=out.filesystem) for f in files]
    if not tables:
        return pa.array([], pa.string())
    return join_keys(pa.concat_tables(tables), KEY_COLUMNS)


def _committed(out: Path | str | Location) -> tuple[Location, list[str]]:
    """``out`` and its committed prediction files as paths within ``out.filesystem`` (pyarrow's terms)."""
    from posterfusion.features.lease import committed_files

    out = Location.parse(out)
    return out, [f.fs_path for f in committed_files(out, FILES)]
