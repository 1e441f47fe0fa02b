"""No Ray or app process may connect anywhere but loopback.

The local cluster is started by the real CLI in a child process whose every Python
descendant (driver, dashboard, Ray workers) loads ``tests/netaudit/sitecustomize.py``: an
audit hook recording each ``socket.connect`` and ``socket.getaddrinfo``. Native processes
(GCS, raylet) are covered by sampling every descendant's open sockets while the job runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from posterfusion.jobs.sample import SampleConfig, write_sample

from netaudit import is_loopback, offending, read_events
from support import REPO

AUDIT_PATH = REPO / "tests" / "netaudit"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1", "localhost", None, ""])
def test_loopback_destinations_are_accepted(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["169.254.169.254", "metadata.google.internal", "8.8.8.8",
                                  "10.0.0.1", "2001:db8::1", "::ffff:10.0.0.1", "example.com"])
def test_other_destinations_are_flagged(host):
    assert not is_loopback(host)
    assert offending([{"family": "inet", "host": host}])


def _sample_sockets(root: psutil.Process, seen: dict[int, set]) -> None:
    """Record (name, remote ip) of every inet connection of root and its descendants."""
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            for conn in process.net_connections(kind="inet"):
                if conn.raddr:
                    seen.setdefault(process.pid, set()).add((process.name(), conn.raddr.ip))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def _audited_env(tmp_path):
    """(environment, audit dir) for a child whose every Python process loads the audit hook; a local Ray."""
    audit = tmp_path / "audit"
    audit.mkdir()
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(AUDIT_PATH), os.environ.get("PYTHONPATH", "")]),
        "POSTERFUSION_NET_AUDIT_DIR": str(audit),
        "POSTERFUSION_HOME": str(tmp_path / "state"),
    }
    env.pop("RAY_ADDRESS", None)
    return env, audit


def test_local_cluster_and_ingest_stay_on_loopback(tmp_path):
    sample = write_sample(SampleConfig(out=tmp_path / "sample", n=24, unlabelled=4))
    env, audit = _audited_env(tmp_path)
    command = [sys.executable, "-m", "posterfusion", "ingest",
               "--source", f"multilabel:{sample['out']}", "--metadata", sample["metadata"],
               "--out", str(tmp_path / "catalogue"), "--num-cpus", "2"]
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    sockets: dict[int, set] = {}
    root = psutil.Process(child.pid)
    while child.poll() is None:
        _sample_sockets(root, sockets)
        time.sleep(0.2)
    output = child.stdout.read()
    assert child.returncode == 0, output
    assert "reconciles" in output

    events = read_events(audit)
    argvs = {e["argv"] for e in events if e["event"] == "audit.loaded"}
    # The hook really ran in Ray's own processes, not only in the driver.
    assert any("dashboard" in a for a in argvs), argvs
    assert any("default_worker" in a for a in argvs), argvs
    assert any(e["family"] == "inet" and is_loopback(e["host"]) for e in events)
    assert offending(events) == [], offending(events)[:10]
    # And no process, native ones included, held a connection to anything but loopback.
    remote = {(name, ip) for conns in sockets.values() for name, ip in conns}
    assert remote, "no connection was sampled: the socket sampler saw nothing"
    assert {(n, ip) for n, ip in remote if not is_loopback(ip)} == set()
    assert (tmp_path / "state" / "ray-home" / "ray_bootstrap_config.yaml").is_file()


def test_run_tracking_stays_on_loopback(tmp_path):
    """MLflow records a run (its local store, an artifact) and sends nothing anywhere: telemetry is off."""
    env, audit = _audited_env(tmp_path)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = ("from posterfusion.cluster import prepare_environment; prepare_environment()\n"
            "from posterfusion.jobs.tracking import tracked\n"
            "with tracked('train', 'audit', {'optim': {'lr': 0.001}}) as run:\n"
            "    run.history([{'epoch': 1, 'val_macro_auc': 0.5}])\n"
            "    run.artifact('note.txt', b'audited')\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(audit)
    assert any(e["event"] == "audit.loaded" for e in events)
    assert offending(events) == [], offending(events)[:10]


@pytest.mark.slow
def test_the_service_stays_on_loopback(tmp_path, small_fused):
    """`posterfusion serve` (its own local Ray, Serve's proxy, replicas) answering real HTTP requests, then
    stopped by SIGINT (``kill -INT``): it shuts down cleanly within seconds (exit status 0)."""
    import signal

    import httpx

    from posterfusion.cluster.multinode import free_port

    from support import jpeg_bytes

    bundle = small_fused / "bundle"  # fused: the service runs the real YOLO (Ultralytics, LiteRT) as well
    env, audit = _audited_env(tmp_path)
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "posterfusion", "serve", "--model", str(bundle),
                              "--port", str(port), "--num-cpus", "2", "--replica-cpus", "0.25"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sockets: dict[int, set] = {}
    process = psutil.Process(child.pid)
    answers = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and child.poll() is None and not answers:
            _sample_sockets(process, sockets)
            try:  # the proxy answers 404 until the app's routes are registered
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200:
                    answers.append(httpx.post(f"http://127.0.0.1:{port}/v1/predict", timeout=30,
                                              files={"poster": ("p.jpg", jpeg_bytes(), "image/jpeg")}))
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(1)
        for _ in range(10):
            _sample_sockets(process, sockets)
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGINT)  # kill -INT; SIGTERM takes the same path (test_cli)
        stopping = time.monotonic()
        try:
            output = child.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            child.kill()
            output = child.communicate()[0]
    assert answers and answers[0].status_code == 200, output[-3000:]
    assert child.returncode == 0 and "SIGTERM received" not in output, output[-3000:]
    assert time.monotonic() - stopping < 30, output[-3000:]  # Serve's shutdown, then Ray's: seconds, not a hang
    events = read_events(audit)
    argvs = {e["argv"] for e in events if e["event"] == "audit.loaded"}
    assert any("default_worker" in a for a in argvs), argvs
    assert offending(events) == [], offending(events)[:10]
    remote = {(name, ip) for conns in sockets.values() for name, ip in conns}
    assert remote and {(n, ip) for n, ip in remote if not is_loopback(ip)} == set()
