"""A real two-node Ray cluster on loopback: jobs attach unchanged, and scoring survives losing a node.

The head and a worker node are separate ``ray start`` processes with their own temp dirs
(``cluster.multinode.LocalCluster``, each node on its own 127.0.0.x). Everything talks to
the cluster the way a platform team would: the CLI with ``--address`` and the job submission
API with ``cluster/runtime_env.yaml``. This test process never joins the cluster as a driver
(it may already be one for the test session's own Ray).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posterfusion.cluster.multinode import LocalCluster
from posterfusion.jobs.sample import SampleConfig, write_sample
from posterfusion.models.predictions import read_predictions

from support import REPO

pytestmark = pytest.mark.cluster


def cli(*args: str, address: str, timeout: int = 600) -> str:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "posterfusion", *args, "--address", address], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def submit_score(client, bundle: Path, catalogue: Path, out: Path) -> str:
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    deadline = time.monotonic() + 120
    while True:  # the head's job agent comes up a little after the dashboard answers
        try:
            return client.submit_job(  # --actors 2: one per node (80 rows would get one unasked)
                entrypoint=f"{sys.executable} -m posterfusion score --model {bundle} --catalogue {catalogue} "
                           f"--out {out} --batch-size 4 --rows-per-file 8 --actors 2",
                runtime_env=runtime_env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait_for(client, job: str, timeout: float = 600) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return status
        time.sleep(1)
    raise TimeoutError(client.get_job_logs(job)[-3000:])


def assert_each_row_once(out: Path, catalogue_rows: int) -> None:
    stored = read_predictions(out)
    assert len(stored) == catalogue_rows
    assert not stored.duplicated(["movie_id", "poster_sha256", "model_version"]).any()
    assert stored["error"].isna().all()


def test_jobs_run_across_two_nodes_and_scoring_survives_losing_one(quick_bundles, tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_tasks

    # the GCS probes each raylet every 0.5 s (not 3 s) and declares a node dead after 4 missed probes (not 5):
    # the killed node is seen dead in seconds; a probe still waits up to Ray's 10 s for a busy live raylet
    monkeypatch.setenv("RAY_health_check_period_ms", "500")
    monkeypatch.setenv("RAY_health_check_failure_threshold", "4")

    sample = write_sample(SampleConfig(out=tmp_path / "sample", n=72, unlabelled=8, seed=11))
    catalogue = tmp_path / "catalogue"
    # the session's small cnn bundle (no detector): a bundle scores any catalogue; training with --address is
    # `train`'s own code path (ray.init(address)), the same as ingest's below
    bundle = quick_bundles / "models" / "quick" / "cnn-s0"
    with LocalCluster(workers=1) as cluster:  # its own short /tmp root: unix socket paths are limited to 107 bytes
        assert len(cluster.alive_nodes()) == 2
        worker_id = next(n.node_id for n in cluster.alive_nodes() if "node:worker1" in n.resources_total)
        cli("ingest", "--source", f"multilabel:{tmp_path / 'sample'}", "--metadata", sample["metadata"],
            "--out", str(catalogue), address=cluster.address)

        # Score through the job submission API and kill the worker node once the job has committed its
        # first file: the job still finishes, every row once, and the killed node had done its share.
        client = JobSubmissionClient(cluster.dashboard)
        job = submit_score(client, bundle, catalogue, tmp_path / "scores")
        deadline = time.monotonic() + 300
        while not list((tmp_path / "scores").glob("run_date=*/part-*.parquet")):
            assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
            assert client.get_job_status(job) not in {"FAILED", "SUCCEEDED"}, client.get_job_logs(job)[-3000:]
            time.sleep(0.2)
        worker = cluster.nodes[1]
        assert worker.kill() > 0
        assert wait_for(client, job) == "SUCCEEDED", client.get_job_logs(job)[-5000:]
        assert "reconciles" in client.get_job_logs(job)
        assert_each_row_once(tmp_path / "scores", 80)
        job_id = client.get_job_info(job).job_id
        tasks = list_tasks(address=cluster.dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=10_000)
        actors = list_actors(address=cluster.dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=10_000)
        nodes = {t.node_id for t in tasks if t.node_id} | {a.node_id for a in actors if a.node_id}
        assert worker_id in nodes and len(nodes) == 2, f"the job ran on {len(nodes)} node(s)"
        deadline = time.monotonic() + 90  # the GCS declares a killed node dead after missed health checks:
        while len(cluster.alive_nodes()) != 1:  # the job may finish before it does
            assert time.monotonic() < deadline, cluster.alive_nodes()
            time.sleep(1)
    from posterfusion.cluster.multinode import Node

    assert Node("any", str(cluster.root)).processes() == []  # every process of the cluster is gone
    assert not cluster.root.exists()
