"""``posterfusion features``: object-detection features for every catalogue poster, incrementally.

Stages: read the keys already computed for this detector (pyarrow, no Ray) and the
catalogue's keys → keep only the (``movie_id``, ``poster_sha256``) pairs not yet computed →
Ray Data streams those posters through a pool of ``ObjectFeaturizer`` actors (one model
load each) → ``write_parquet`` into a fresh run folder, renamed into place only once it is
complete.

Layout: ``OUT/<detector_id>/run-<UTC time>-<random>/*.parquet``. Runs only ever add folders,
so a rerun computes nothing and a changed poster (new sha) is computed beside its old row;
readers join on both keys, so stale rows never match.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from posterfusion.features.catalogue import catalogue_files
from posterfusion.features.objects import (
    OBJECT_FEATURES_SCHEMA,
    DetectorConfig,
    ObjectFeaturizer,
    detector_id,
    uses_gpu,
)

log = logging.getLogger(__name__)

KEY_COLUMNS = ["movie_id", "poster_sha256"]
KEY_SEPARATOR = "\x1f"  # cannot occur in an IMDb id or a hex digest


class FeaturesConfig(BaseModel):
    catalogue: Path
    out: Path
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    batch_size: int = Field(16, ge=1, description="posters per actor call")
    actors: int | None = Field(None, ge=1, description="detector actors; None = one per cluster CPU")
    cpus_per_actor: float | None = Field(None, ge=0, description="None = share 75 % of the cluster's CPUs, "
                                         "keeping one whole CPU free for Ray Data's file listing")
    gpus_per_actor: float | None = Field(None, ge=0, description="None = share the cluster's GPUs if the "
                                         "weights can use one (a .tflite never does), else 0")
    io_cpus: float = Field(0.1, gt=0, description="CPU per read/filter/write task (fractional)")
    rows_per_file: int = Field(5000, gt=0, description="~1-2 KB a row")


def _keys(table: pa.Table) -> pa.Array:
    """One string per row joining (movie_id, poster_sha256): pyarrow's ``is_in`` takes one column."""
    keys = pc.binary_join_element_wise(table["movie_id"], table["poster_sha256"], KEY_SEPARATOR)
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


def _keep_keys(batch: pa.Table, keys: pa.Array) -> pa.Table:
    """Ray Data map: only the catalogue rows whose (id, sha) pair is to be computed."""
    return batch.filter(pc.is_in(_keys(batch), value_set=keys))


def feature_files(out: Path | str, detector: str) -> list[str]:
    """Complete feature files of one detector; ``_``/``.`` folders (runs in progress) are skipped."""
    root = Path(out) / detector
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.rglob("*.parquet")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts))


def _read_table(out: Path | str, detector: str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.dataset as pads

    files = feature_files(out, detector)
    if not files:
        return OBJECT_FEATURES_SCHEMA.empty_table().select(columns or OBJECT_FEATURES_SCHEMA.names)
    return pads.dataset(files, schema=OBJECT_FEATURES_SCHEMA, format="parquet").to_table(columns=columns)


def read_object_features(out: Path | str, detector: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Every stored row of one detector, oldest run first (error rows and stale shas too)."""
    return _read_table(out, detector, columns).to_pandas()


def load_object_features(out: Path | str, detector: str, include_errors: bool = False) -> pd.DataFrame:
    """Features to join on: indexed by (``movie_id``, ``poster_sha256``), one row per key.

    ``objects`` holds the float32 vector (``features.objects.object_vector``), ``detections``
    the raw boxes. Rows whose poster failed are left out unless ``include_errors`` (their
    ``objects`` is null), so a join that misses a key means "no features", never zeros.
    """
    frame = read_object_features(out, detector)
    if not include_errors:
        frame = frame[frame["detect_error"].isna()]
    frame = frame.drop_duplicates(KEY_COLUMNS, keep="last")
    return frame.set_index(KEY_COLUMNS).sort_index()


def _pool(config: FeaturesConfig, rows: int) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor); an explicit CPU ask must leave the listing CPU free."""
    from posterfusion.cluster import LISTING_CPUS, actor_pool, cpu_budget

    pool = actor_pool(config.actors, math.ceil(rows / config.batch_size), gpu_capable=uses_gpu(config.detector))
    cpus, gpus = pool.cpus, pool.gpus if config.gpus_per_actor is None else config.gpus_per_actor
    if config.cpus_per_actor is not None:
        if pool.size * config.cpus_per_actor > cpu_budget() - LISTING_CPUS + 1e-9:
            raise ValueError(f"{pool.size} actors × {config.cpus_per_actor} CPU leave no whole CPU of the cluster's "
                             f"{cpu_budget():g} for Ray Data's file listing: the job would never start")
        cpus = config.cpus_per_actor
    return pool.size, cpus, gpus


def run_features(config: FeaturesConfig) -> dict:
    """Compute features for catalogue posters that have none for this detector; return a summary."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    started = time.perf_counter()
    detector = detector_id(config.detector)
    files = catalogue_files(config.catalogue)
    present = _keys(_read_table(config.out, detector, KEY_COLUMNS))
    wanted = [_keys(pq.read_table(f, columns=KEY_COLUMNS)) for f in files]
    missing = [keys.filter(pc.invert(pc.is_in(keys, value_set=present))) for keys in wanted]
    todo = pc.unique(pa.concat_arrays(missing))
    rows = sum(len(keys) for keys in wanted)
    summary = {"detector_id": detector, "catalogue_rows": rows,
               "already_present": rows - sum(len(keys) for keys in missing), "to_compute": len(todo)}
    log.info("features %s: %d catalogue rows, %d to compute", detector, rows, len(todo))
    run_dir, computed = None, pd.DataFrame(columns=["detections", "detect_error"])
    if len(todo):
        actors, cpus, gpus = _pool(config, len(todo))
        summary |= {"actors": actors, "cpus_per_actor": cpus, "gpus_per_actor": gpus}
        todo_files = [f for f, keys in zip(files, missing, strict=True) if len(keys)]  # skip finished files
        run_dir = _write_run(config, detector, todo, todo_files, actors, cpus, gpus)
        computed = pads.dataset(str(run_dir), format="parquet").to_table(
            columns=["detections", "detect_error"]).to_pandas()
    seconds = time.perf_counter() - started
    return summary | _describe(computed, seconds) | {
        "reconciles": len(computed) == len(todo),
        "run": str(run_dir) if run_dir else None,
        "out": str(config.out / detector),
    }


def _write_run(config: FeaturesConfig, detector: str, todo: pa.Array, files: list[str],
               actors: int, cpus: float, gpus: float) -> Path:
    """Detect ``todo``'s posters into a hidden folder, then rename it into place."""
    import ray

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"run-{stamp}-{uuid.uuid4().hex[:8]}"
    staging, final = config.out / detector / f"_{name}", config.out / detector / name
    ds = ray.data.read_parquet(files, columns=[*KEY_COLUMNS, "poster"], num_cpus=config.io_cpus)
    ds = ds.map_batches(_keep_keys, batch_format="pyarrow", fn_kwargs={"keys": todo}, num_cpus=config.io_cpus)
    # A catalogue file is one ~40 MB block, and a block goes to one actor: split it so all work.
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    ds = ds.map_batches(
        ObjectFeaturizer,
        fn_constructor_kwargs={"config": config.detector, "detector_key": detector},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
        batch_size=config.batch_size,
        batch_format="pandas",
    )
    try:
        ds.write_parquet(str(staging), min_rows_per_file=config.rows_per_file,
                         ray_remote_args={"num_cpus": config.io_cpus})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.mkdir(parents=True, exist_ok=True)  # a run that wrote no file still leaves its folder
    staging.rename(final)
    return final


def _describe(computed: pd.DataFrame, seconds: float) -> dict:
    """Counts read back from the run's files, so the summary describes what is on disk."""
    failed = computed["detect_error"].dropna()
    classes = Counter(d["name"] for ds in computed["detections"] if ds is not None for d in ds)
    return {
        "computed": len(computed),
        "errors": {"count": len(failed),
                   "reasons": dict(Counter(reason.split(":", 1)[0] for reason in failed).most_common())},
        "seconds": round(seconds, 2),
        "posters_per_s": round(len(computed) / seconds, 2) if seconds > 0 else None,
        "top_classes": dict(classes.most_common(10)),
    }


def format_features_summary(summary: dict) -> str:
    """The lines the CLI prints: the same numbers as the summary dict."""
    errors = summary["errors"]
    reasons = ", ".join(f"{k}={v}" for k, v in errors["reasons"].items()) or "none"
    top = ", ".join(f"{name} {n}" for name, n in summary["top_classes"].items()) or "none"
    pool = (f" on {summary['actors']} actors × {summary['cpus_per_actor']} CPU"
            f"{' + ' + str(summary['gpus_per_actor']) + ' GPU' if summary['gpus_per_actor'] else ''}"
            if "actors" in summary else "")
    return "\n".join([
        f"features {summary['detector_id']}: {summary['catalogue_rows']} catalogue rows, "
        f"{summary['already_present']} already present, {summary['computed']} computed{pool} "
        f"[{'reconciles' if summary['reconciles'] else 'DOES NOT RECONCILE'}]",
        f"  {errors['count']} posters failed ({reasons}); {summary['seconds']} s, "
        f"{summary['posters_per_s']} posters/s",
        f"  objects: {top}",
        f"  features: {summary['out']}",
    ])
