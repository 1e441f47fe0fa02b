"""``posterfusion score`` into a bucket prefix: every catalogue row exactly once, as readers see it.

The output is ``s3://…/predictions`` on the session's S3 API (moto's server on 127.0.0.1); the
catalogue, features and bundle stay local. Two runs start at once: one takes the lease, the other
waits for it or is refused (``LeaseHeld``) and runs again; a later run finds a dead run's lease and
its uncommitted upload, takes the lease over, deletes the upload and scores nothing.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import date

import pytest

from posterfusion.features.catalogue import catalogue_files
from posterfusion.features.lease import LeaseHeld
from posterfusion.jobs.score import ScoreConfig, run_score
from posterfusion.jobs.score_summary import summaries
from posterfusion.locations import Location
from posterfusion.models.predictions import prediction_files, read_predictions

from s3server import new_bucket

pytestmark = pytest.mark.slow


def _config(root, out, **kwargs) -> ScoreConfig:
    return ScoreConfig(model=root / "bundle", catalogue=root / "catalogue", out=out, features=root / "features",
                       batch_size=8, rows_per_file=16, run_date=date(2026, 12, 1), **kwargs)


def _each_row_once(root, out: str) -> None:
    stored = read_predictions(out)
    catalogue = catalogue_files(root / "catalogue").dataset().to_table(columns=["movie_id"])
    assert not stored.duplicated(["movie_id", "poster_sha256", "model_version"]).any()
    assert sorted(stored["movie_id"]) == sorted(catalogue["movie_id"].to_pylist())


def test_two_runs_into_one_bucket_prefix_then_a_rerun_keep_every_row_once(small_fused, s3_endpoint):
    out = f"s3://{new_bucket()}/predictions"
    results, refused = [], []

    def run(wait_s: float) -> None:
        try:
            results.append(run_score(_config(small_fused, out, wait_s=wait_s)))
        except LeaseHeld as error:
            refused.append(error)

    threads = [threading.Thread(target=run, args=(wait_s,)) for wait_s in (300, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _ in refused:  # the run that would not wait ran into the live lease; it runs again
        results.append(run_score(_config(small_fused, out)))
    assert len(refused) <= 1 and sorted(r["scored"] for r in results) == [0, 66]
    assert all(r["reconciles"] for r in results)
    _each_row_once(small_fused, out)
    assert all(f.startswith(f"{out}/run_date=2026-12-01/part-") for f in prediction_files(out))

    # A driver killed mid-run: its lease (dead pid on this host) and an upload it never committed.
    base = Location(out)
    (base / "_lease").write_text(json.dumps({"run_id": "killed", "pid": 2**22 + 11, "host": socket.gethostname(),
                                             "heartbeat_at": time.time(), "committed": []}))
    orphan = base / "run_date=2026-12-01" / "part-killed-00000.parquet"
    orphan.write_bytes(Location(prediction_files(out)[0]).read_bytes())  # rows a reader must not see twice
    _each_row_once(small_fused, out)
    again = run_score(_config(small_fused, out))
    assert (again["to_score"], again["scored"], again["dead_staging_files_removed"]) == (0, 0, 1)
    assert not orphan.exists() and not (base / "_lease").exists()
    _each_row_once(small_fused, out)
    assert len(summaries(out)) == len(results) + 1  # every run's summary, in the bucket
