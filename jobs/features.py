"""``posterfusion features``: object-detection features for every catalogue poster, incrementally.

Stages: read the keys already computed for this detector (pyarrow, no Ray) and the
catalogue's keys → keep only the (``movie_id``, ``poster_sha256``) pairs not yet computed →
Ray Data streams those posters through a pool of ``ObjectFeaturizer`` actors (one model
load each) → ``write_parquet`` into a fresh run folder, renamed into place only once it is
complete.

Layout: ``OUT/<detector_id>/run-<UTC time>-<random>/*.parquet`` (a
:class:`~posterfusion.features.store.FeatureStore`; ``OUT`` a local path or a URI, each run published
whole) and ``OUT/<detector_id>/detector.json``, the
detector's weights and thresholds, so later stages can take the detector from the features
directory. Runs only ever add folders, so a rerun computes nothing and a changed poster (new
sha) is computed beside its old row; readers join on both keys, so stale rows never match. A
poster that failed (undecodable, or the detector raised) keeps its error row and is tried
again by the next run.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from posterfusion.errors import UserValueError
from posterfusion.features.catalogue import catalogue_files
from posterfusion.features.objects import (
    KEY_COLUMNS,
    DetectorConfig,
    ObjectFeaturizer,
    object_store,
    record_detector,
    uses_gpu,
)
from posterfusion.features.store import keep_keys, plan_missing
from posterfusion.locations import Location, ParquetFiles

log = logging.getLogger(__name__)


class FeaturesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    catalogue: Location
    out: Location = Field(description="object features: a local path or a URI (s3://bucket/features)")
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    batch_size: int = Field(16, ge=1, description="posters per actor call")
    actors: int | None = Field(None, ge=1, description="detector actors; None = one per cluster CPU")
    cpus_per_actor: float | None = Field(None, ge=0, description="None = share 75 % of the cluster's CPUs, "
                                         "keeping one whole CPU free for Ray Data's file listing")
    gpus_per_actor: float | None = Field(None, ge=0, description="None = share the cluster's GPUs if the "
                                         "weights can use one (a .tflite never does), else 0")
    io_cpus: float = Field(0.1, gt=0, description="CPU per read/filter/write task (fractional)")
    rows_per_file: int = Field(5000, gt=0, description="~1-2 KB a row")


def detector_pool(config: FeaturesConfig, rows: int) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor); an explicit CPU ask must leave the listing CPU free."""
    from posterfusion.cluster import LISTING_CPUS, actor_pool, cpu_budget

    pool = actor_pool(config.actors, math.ceil(rows / config.batch_size), gpu_capable=uses_gpu(config.detector))
    cpus, gpus = pool.cpus, pool.gpus if config.gpus_per_actor is None else config.gpus_per_actor
    if config.cpus_per_actor is not None:
        if pool.size * config.cpus_per_actor > cpu_budget() - LISTING_CPUS + 1e-9:
            raise UserValueError(f"{pool.size} actors × {config.cpus_per_actor} CPU leave no whole CPU of the "
                                 f"cluster's {cpu_budget():g} for Ray Data's file listing: the job would never start")
        cpus = config.cpus_per_actor
    return pool.size, cpus, gpus


def run_features(config: FeaturesConfig) -> dict:
    """Compute features for catalogue posters that have none (or only a failed row) for this detector."""

    started = time.perf_counter()
    config.out.check_store()
    detector = record_detector(config.out, config.detector)
    store = object_store(config.out, detector)
    files, todo, rows = plan_missing(catalogue_files(config.catalogue), store.present_keys(), KEY_COLUMNS)
    summary = {"detector_id": detector, "catalogue_rows": rows, "already_present": rows - len(todo),
               "to_compute": len(todo)}
    log.info("features %s: %d catalogue rows, %d to compute", detector, rows, len(todo))
    run_dir, computed = None, pd.DataFrame(columns=["detections", "detect_error"])
    if len(todo):
        actors, cpus, gpus = detector_pool(config, len(todo))
        summary |= {"actors": actors, "cpus_per_actor": cpus, "gpus_per_actor": gpus}
        run_dir = store.write_run(lambda staging: _detect_into(config, detector, todo, files, staging,
                                                               actors, cpus, gpus))
        computed = ParquetFiles(run_dir.list_files(".parquet")).read(["detections", "detect_error"]).to_pandas()
    seconds = time.perf_counter() - started
    return summary | _describe(computed, seconds) | {
        "reconciles": len(computed) == len(todo),
        "run": str(run_dir) if run_dir else None,
        "out": str(store.folder),
    }


def _detect_into(config: FeaturesConfig, detector: str, todo: pa.Array, files: ParquetFiles, staging: Location,
                 actors: int, cpus: float, gpus: float) -> None:
    """Ray Data: the ``todo`` posters through the detector actor pool, written into ``staging``."""
    import ray

    ds = ray.data.read_parquet(files.paths, filesystem=files.filesystem, columns=[*KEY_COLUMNS, "poster"],
                               num_cpus=config.io_cpus)
    ds = ds.map_batches(keep_keys, batch_format="pyarrow", fn_kwargs={"keys": todo, "columns": KEY_COLUMNS},
                        num_cpus=config.io_cpus)
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
    ds.write_parquet(staging.fs_path, filesystem=staging.filesystem, min_rows_per_file=config.rows_per_file,
                     ray_remote_args={"num_cpus": config.io_cpus})  # write_parquet has no named num_cpus


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
