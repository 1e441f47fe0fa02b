"""Any location can be object storage: every stage reads and writes a URI as it does a local path.

The store is the session's real S3 API (moto's server on 127.0.0.1, ``s3_endpoint``), reached only
through the standard AWS environment the fixture sets before the session's Ray starts, so every Ray
worker, actor and Serve replica reaches the same loopback endpoint.

* a mistake — a scheme no file system handles, a missing bucket, a prefix with no catalogue or bundle,
  wrong credentials, an unreachable endpoint — is one line naming the location (exit status 2 from the
  CLI), and nothing is half-written: a bundle, a catalogue or a feature run is published whole or not seen;
* ``test_the_whole_pipeline_runs_against_a_bucket`` (slow): posters and labels in a bucket → ingest →
  features → train (checkpoints in the bucket) → score, twice and twice at once → evaluate → embed and
  similar → the service loading its bundle from the bucket, answering as the local Predictor does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posterfusion.errors import UserError, UserFileNotFound
from posterfusion.features.catalogue import catalogue_files
from posterfusion.locations import PUBLISHED, Location

from s3server import credentials_checked, new_bucket
from support import detector

BUNDLE_FILES = ("config.json", "model.safetensors", "genres.json", "metadata_encoder.json", "thresholds.json",
                "calibration.json", "metrics.json")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"RAY_ADDRESS": ""}  # the AWS environment of the fixture included
    return subprocess.run([sys.executable, "-m", "posterfusion", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


def _one_line(run: subprocess.CompletedProcess, *says: str) -> str:
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("posterfusion: error:"), run.stderr
    assert all(part in lines[0] for part in says), lines[0]
    return lines[0]


def _error_line(error: BaseException, *says: str) -> str:
    text = str(error)
    assert isinstance(error, UserError) and "\n" not in text and all(part in text for part in says), text
    return text


def _upload(folder: Path, target: Location) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        (target / path.relative_to(folder).as_posix()).upload_file(path)


@pytest.fixture
def bucket(s3_endpoint) -> str:
    return new_bucket()


# ---------------------------------------------------------------------------- the CLI: one line, exit 2


@pytest.mark.parametrize("args", [
    ["score", "--model", "nosuchfs://b/model", "--catalogue", "nosuchfs://b/cat", "--out", "nosuchfs://b/out"],
    ["ingest", "--source", "multilabel:nosuchfs://b/posters", "--out", "catalogue"],
])
def test_a_scheme_no_file_system_handles_is_one_line_and_exit_status_2(args, tmp_path):
    _one_line(_cli(*args, cwd=tmp_path), "nosuchfs://b/", "no file system handles the scheme 'nosuchfs://'")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_bucket_is_one_line_and_nothing_is_written_anywhere(s3_endpoint, tmp_path):
    source = tmp_path / "posters"
    (source / "Images").mkdir(parents=True)
    (source / "train.csv").write_text("Id,Genre\n")
    work = tmp_path / "work"
    work.mkdir()
    run = _cli("ingest", "--source", f"multilabel:{source}", "--out", "s3://no-such-bucket-pf/cat", cwd=work)
    _one_line(run, "s3://no-such-bucket-pf/cat", "the bucket 'no-such-bucket-pf' does not exist")
    run = _cli("score", "--model", "s3://no-such-bucket-pf/model", "--catalogue", str(tmp_path / "cat"),
               "--out", str(tmp_path / "predictions"), cwd=work)
    _one_line(run, "s3://no-such-bucket-pf/model", "the bucket 'no-such-bucket-pf' does not exist")
    assert list(work.iterdir()) == [] and not (tmp_path / "predictions").exists()  # no "s3:" folder either


@pytest.mark.slow
def test_ingest_into_a_bucket_from_the_cli_writes_no_local_folder(bucket, tmp_path):
    """``--out s3://b/cat`` is the bucket's prefix, never a local ``s3:`` folder (a ``Path`` option made it one)."""
    from posterfusion.jobs.sample import SampleConfig, write_sample

    write_sample(SampleConfig(out=tmp_path / "sample", n=8, unlabelled=0, seed=1))
    work = tmp_path / "work"
    work.mkdir()
    run = _cli("ingest", "--source", f"multilabel:{tmp_path / 'sample'}", "--out", f"s3://{bucket}/cat", cwd=work)
    assert run.returncode == 0, run.stderr
    assert list(work.iterdir()) == [] and len(catalogue_files(f"s3://{bucket}/cat").read(["movie_id"])) == 8
    assert Location(f"s3://{bucket}/cat/ingest_report.json").is_file()


# ---------------------------------------------------------------------------- the jobs: one line, nothing half-written


def test_a_prefix_with_no_catalogue_or_a_half_written_one_is_refused(bucket):
    with pytest.raises(UserFileNotFound) as error:
        catalogue_files(f"s3://{bucket}/nothing")
    _error_line(error.value, f"no catalogue under s3://{bucket}/nothing", "no _PUBLISHED marker", "nothing is there")
    half = Location(f"s3://{bucket}/half")
    (half / "data" / "part-0.parquet").write_bytes(_parquet(pa.table({"movie_id": ["tt1"]})))  # marker never came
    with pytest.raises(UserFileNotFound) as error:
        catalogue_files(half)
    _error_line(error.value, f"no catalogue under s3://{bucket}/half", "a publish is in progress or failed")


def test_a_bundle_is_read_only_when_published_whole(bucket, tmp_path, monkeypatch):
    from posterfusion.models.bundle import load_bundle

    with pytest.raises(UserFileNotFound) as error:
        load_bundle(f"s3://{bucket}/models/none")
    _error_line(error.value, f"s3://{bucket}/models/none is not a model bundle", "nothing is there")

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    Location(f"s3://{bucket}/models/partial").publish_dir(partial)
    with pytest.raises(UserFileNotFound) as error:
        load_bundle(f"s3://{bucket}/models/partial")
    _error_line(error.value, f"s3://{bucket}/models/partial is not a model bundle: missing model.safetensors")

    whole = tmp_path / "whole"
    whole.mkdir()
    for name in BUNDLE_FILES:
        (whole / name).write_text("{}")
    uploads = []

    def failing_upload(self, source):  # the connection drops after the first file
        if uploads:
            raise UserError(f"{self}: cannot reach the endpoint")
        uploads.append(self)
        Location.write_bytes(self, Path(source).read_bytes())

    monkeypatch.setattr(Location, "upload_file", failing_upload)
    with pytest.raises(UserError):
        Location(f"s3://{bucket}/models/v1").publish_dir(whole)
    assert not Location(f"s3://{bucket}/models/v1/{PUBLISHED}").exists()
    with pytest.raises(UserFileNotFound) as error:
        load_bundle(f"s3://{bucket}/models/v1")
    _error_line(error.value, "is not a model bundle", "a publish is in progress or failed")


def test_wrong_credentials_and_an_unreachable_endpoint_are_one_line(s3_endpoint, bucket, tmp_path, monkeypatch):
    from posterfusion.models.bundle import load_bundle

    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    Location(f"s3://{bucket}/models/v1").publish_dir(folder)
    with credentials_checked(s3_endpoint):
        for action in (lambda: load_bundle(f"s3://{bucket}/models/v1"), lambda: catalogue_files(f"s3://{bucket}/c"),
                       lambda: Location(f"s3://{bucket}/out").check_store()):
            with pytest.raises(UserError) as error:
                action()
            _error_line(error.value, f"s3://{bucket}/", "access denied", "AWS_ACCESS_KEY_ID")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError) as error:
        load_bundle(f"s3://{bucket}/models/v1")
    _error_line(error.value, f"s3://{bucket}/models/v1", f"cannot reach the endpoint http://127.0.0.1:{port}")


def test_a_feature_run_counts_only_once_its_marker_is_written(bucket):
    from posterfusion.features.objects import OBJECT_FEATURES_SCHEMA, object_store

    store = object_store(f"s3://{bucket}/features", "d")
    rows = pa.Table.from_pylist([{"movie_id": "a", "poster_sha256": "1", "detector_id": "d", "objects": [1.0],
                                  "detections": [], "detect_error": None}], schema=OBJECT_FEATURES_SCHEMA)

    def write(where: Location) -> None:
        (where / "part-0.parquet").write_bytes(_parquet(rows))

    def fail(where: Location) -> None:
        write(where)
        raise RuntimeError("the run died")

    with pytest.raises(RuntimeError):
        store.write_run(fail)
    assert store.files() == [] and Location(f"s3://{bucket}/features/d").list_files() == []  # cleaned up
    (store.folder / "run-orphan" / "part-0.parquet").write_bytes(_parquet(rows))  # a writer killed before its marker
    run = store.write_run(write)
    assert [Location(f"s3://{f}").relative_to(store.folder) for f in store.files()] == [f"{run.name}/part-0.parquet"]
    assert store.present_keys().to_pylist() == ["a\x1f1"]


def test_weights_named_by_a_uri_are_fetched_once_and_used_as_a_file(bucket, monkeypatch):
    from posterfusion.features.objects import DetectorConfig, detector_id, resolved_detector
    from posterfusion.weights import find_weights

    local = Path(detector().weights)
    uri = f"s3://{bucket}/weights/{local.name}"
    Location(uri).upload_file(local)
    cached = find_weights(uri)
    assert cached.read_bytes() == local.read_bytes() and cached.name == local.name
    assert find_weights(f"s3://{bucket}/weights/missing.tflite") is None
    monkeypatch.setattr(Location, "read_bytes", lambda self: pytest.fail("fetched twice"))
    assert find_weights(uri) == cached
    remote = DetectorConfig(weights=uri)
    assert detector_id(remote) == detector_id(detector()) and resolved_detector(remote).weights == uri


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------------------- the whole pipeline


def _score_config(root: str, out: str, **kwargs):
    from posterfusion.jobs.score import ScoreConfig

    return ScoreConfig(model=f"{root}/model", catalogue=f"{root}/catalogue", features=f"{root}/features", out=out,
                       batch_size=8, rows_per_file=16, run_date=date(2026, 12, 3), **kwargs)


def _each_row_once(root: str, out: str) -> None:
    from posterfusion.models.predictions import read_predictions

    stored = read_predictions(out)
    catalogue = catalogue_files(f"{root}/catalogue").read(["movie_id"])
    assert not stored.duplicated(["movie_id", "poster_sha256", "model_version"]).any()
    assert sorted(stored["movie_id"]) == sorted(catalogue["movie_id"].to_pylist())


def _score_at_once(root: str, out: str) -> list[dict]:
    from posterfusion.features.lease import LeaseHeld
    from posterfusion.jobs.score import run_score

    results, refused = [], []

    def run(wait_s: float) -> None:
        try:
            results.append(run_score(_score_config(root, out, wait_s=wait_s)))
        except LeaseHeld as error:
            refused.append(error)

    threads = [threading.Thread(target=run, args=(wait_s,)) for wait_s in (300, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results + [run_score(_score_config(root, out)) for _ in refused]  # refused: it runs again


@pytest.mark.slow
def test_the_whole_pipeline_runs_against_a_bucket(ray_session, s3_endpoint, tmp_path, monkeypatch):
    import httpx

    from posterfusion.cluster.multinode import free_port
    from posterfusion.features.metadata import FIELDS
    from posterfusion.jobs.embed import EmbedConfig, run_embeddings
    from posterfusion.jobs.evaluate import EvaluateConfig, run_evaluate
    from posterfusion.jobs.features import FeaturesConfig, run_features
    from posterfusion.jobs.ingest import IngestConfig, run_ingest
    from posterfusion.jobs.sample import SampleConfig, write_sample
    from posterfusion.jobs.score import run_score
    from posterfusion.jobs.train import run_train
    from posterfusion.jobs.train.recipes import resolve
    from posterfusion.models.predictor import Predictor
    from posterfusion.models.similarity import read_embeddings_table, similar_posters
    from posterfusion.serving.app import ServeConfig, start_service

    root = f"s3://{new_bucket()}"
    sample = write_sample(SampleConfig(out=tmp_path / "sample", n=40, unlabelled=4, seed=5))
    _upload(tmp_path / "sample", Location(f"{root}/sample"))
    monkeypatch.chdir(tmp_path)  # whatever ran here, no local "s3:" folder may appear

    report = run_ingest(IngestConfig(sources=[f"multilabel:{root}/sample"], out=f"{root}/catalogue",
                                     metadata=[f"{root}/sample/{Path(sample['metadata']).name}"]))
    assert report["reconciles"] and report["rows_written"] == 44 and report["metadata_joined"] > 0
    assert Location(f"{root}/catalogue/{PUBLISHED}").is_file() and len(catalogue_files(f"{root}/catalogue")) >= 1

    features = run_features(FeaturesConfig(catalogue=f"{root}/catalogue", out=f"{root}/features",
                                           detector=detector()))
    assert features["reconciles"] and features["computed"] == 44

    train = resolve("quick", {"model": {"variant": "fused", "image_size": 48},
                              "optim": {"epochs": 2, "batch_size": 16},
                              "data": {"catalogue": f"{root}/catalogue", "features": f"{root}/features",
                                       "vocab": {"min_count": 3}},
                              "run": {"out": f"{root}/model", "storage_path": f"{root}/ray_results"}},
                     from_scratch=True)
    summary = run_train(train)
    assert summary["bundle"] == f"{root}/model" and summary["run_path"].startswith(f"{root}/ray_results/")
    checkpoints = Location(f"{root}/ray_results").list_files("state.pt")
    assert checkpoints and all("checkpoint_" in f.relative_to(Location(f"{root}/ray_results")) for f in checkpoints)

    first = run_score(_score_config(root, f"{root}/predictions"))
    again = run_score(_score_config(root, f"{root}/predictions"))
    assert (first["scored"], again["scored"], again["already_scored"]) == (44, 0, 44)
    _each_row_once(root, f"{root}/predictions")
    at_once = _score_at_once(root, f"{root}/predictions-at-once")
    assert sorted(r["scored"] for r in at_once) == [0, 44] and all(r["reconciles"] for r in at_once)
    _each_row_once(root, f"{root}/predictions-at-once")

    evaluation = run_evaluate(EvaluateConfig(model=f"{root}/model", catalogue=f"{root}/catalogue",
                                             out=f"{root}/report", features=f"{root}/features", split="all",
                                             baselines=False, n_boot=20))
    written = {f.name for f in Location(f"{root}/report").list_files()}
    assert {"metrics.json", "report.md", "predictions.parquet", "reliability.png"} <= written
    assert json.loads(Location(f"{root}/report/metrics.json").read_text())["posters"] == evaluation["posters"]

    run_embeddings(EmbedConfig(model=f"{root}/model", catalogue=f"{root}/catalogue", out=f"{root}/embeddings",
                               features=f"{root}/features"))  # the cached object vectors, as scoring reads them
    poster = sorted((tmp_path / "sample" / "Images").iterdir())[0].read_bytes()
    hits = similar_posters(f"{root}/model", f"{root}/catalogue", poster, k=3, embeddings=f"{root}/embeddings")
    assert len(hits) == 3

    local = Predictor(Location(f"{root}/model").download_dir(tmp_path / "bundle"))
    row = catalogue_files(f"{root}/catalogue").dataset().to_table().to_pandas().iloc[0]
    stored = read_embeddings_table(f"{root}/embeddings", ["movie_id", "embedding"]).to_pandas().set_index("movie_id")
    fresh = local.embed_one(row["poster"], {field: row[field] for field in FIELDS})  # the detector runs here
    np.testing.assert_allclose(stored.loc[row["movie_id"], "embedding"], fresh, atol=1e-5)
    url = start_service(ServeConfig(model=f"{root}/model", max_replicas=1, replica_cpus=0.25), port=free_port(),
                        name="from-bucket")
    try:
        answer = httpx.post(f"{url}/v1/predict", files={"poster": ("p.jpg", poster, "image/jpeg")}, timeout=60)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model_version"] == local.version
        expected = local.score([poster], [None]).probabilities[0]
        np.testing.assert_allclose([body["probabilities"][g] for g in local.genres], expected, atol=1e-5)
    finally:
        from ray import serve

        serve.shutdown()
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())
