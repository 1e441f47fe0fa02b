"""A real multi-node Ray cluster on one machine, on loopback: a head and worker nodes via ``ray start``.

What platform teams run across machines (``cluster/launcher.yaml``, ``cluster/kuberay/``),
made small enough for a laptop or CI: every node is a separate ``ray start`` (its own raylet,
object store, agents and temp dir), all bound to 127.0.0.1, and the head starts with the
bootstrap HOME of :mod:`posterfusion.cluster.local` so it never probes cloud metadata.

Nodes are stopped by killing exactly their own processes (found by the temp dir or ports in
their command lines), never with ``ray stop``, which would take down every Ray on the
machine, including a test session's own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from posterfusion.cluster.local import prepare_environment, ray_home

# Loopback addresses that Ray does not treat as "localhost": given 127.0.0.1, a joining node
# replaces it with the machine's routable IP (found by a UDP connect toward a public address).
# Every node gets its own 127.0.0.x, so each is told apart by IP as on a real network.
HEAD_IP = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    """One ``ray start``: its marker (a string only its processes' command lines contain)."""

    name: str
    marker: str
    resources: dict = field(default_factory=dict)

    def processes(self):
        import psutil

        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any(self.marker in part for part in process.info["cmdline"] or []):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def kill(self, sig: int = signal.SIGKILL, wait: float = 30) -> int:
        """Signal every process of this node (and their children); returns how many."""
        import psutil

        victims = {p.pid: p for p in self.processes()}
        for process in list(victims.values()):
            try:
                victims.update({c.pid: c for c in process.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        for process in victims.values():
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(list(victims.values()), timeout=wait)
        return len(victims)


class LocalCluster:
    """Head + ``workers`` worker nodes, all on 127.0.0.1.

    ``ray start`` takes whole logical CPUs per node (2 by default, so one node can host a
    Ray Train worker and another the file listing); jobs ask fractions of them.
    ``with LocalCluster(workers=1) as cluster:`` → ``cluster.address`` (GCS, for
    ``ray.init``/``--address``) and ``cluster.dashboard`` (HTTP, for the job submission API).
    Each node gets a custom resource ``node:<name>`` so work can be pinned in tests.
    """

    def __init__(self, workers: int = 1, cpus: int = 2, root: Path | None = None,
                 object_store_mb: int = 200):
        self.workers, self.cpus, self.object_store_mb = workers, cpus, object_store_mb
        self.owns_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="pf-cluster-"))
        self.port, self.dashboard_port = free_port(), free_port()
        self.nodes: list[Node] = []

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://{HEAD_IP}:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """The environment of every ``ray start``: loopback-only settings, bootstrap HOME, this Python."""
        prepare_environment()
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env["HOME"] = str(ray_home())
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _ray_start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Node:
        temp = self.root / name
        temp.mkdir(parents=True, exist_ok=True)
        ray = str(Path(sys.executable).parent / "ray")
        command = [ray, "start", f"--num-cpus={self.cpus}", "--num-gpus=0",
                   f"--object-store-memory={self.object_store_mb * 1024 * 1024}", f"--temp-dir={temp}",
                   f"--resources={{\"node:{name}\": 1}}", "--disable-usage-stats", *args]
        log = self.root / f"{name}.log"  # not a pipe: the daemons ray start leaves behind would hold it open
        with open(log, "w") as out:
            done = subprocess.run(command, env=self.env() | (env or {}), stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{log.read_text()[-3000:]}")
        node = Node(name=name, marker=str(temp), resources={f"node:{name}": 1})
        self.nodes.append(node)
        return node

    def start(self) -> LocalCluster:
        # `ray start` turns token authentication on and keeps the token under the head's HOME;
        # this process attaches as a driver, so it must use and present that token too.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(ray_home() / ".ray" / "auth_token"))
        self._ray_start("head", ["--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}",
                                 f"--dashboard-host={HEAD_IP}",
                                 f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                                 # not the default 52365: another Ray on this machine (a test session's) holds it,
                                 # and without its agent the head cannot take job submissions
                                 f"--dashboard-agent-listen-port={free_port()}",
                                 f"--metrics-export-port={free_port()}"])
        for i in range(self.workers):
            self.add_worker(f"worker{i + 1}")
        self.wait_for_nodes(1 + self.workers)
        return self

    def add_worker(self, name: str) -> Node:
        ip = f"127.0.0.{2 + len(self.nodes)}"
        # Ray refuses a second node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which the head and
        # drivers keep, so they never probe a public address for their IP); the node IP is given.
        return self._ray_start(name, [f"--address={self.address}", f"--node-ip-address={ip}",
                                      f"--dashboard-agent-listen-port={free_port()}",
                                      f"--metrics-export-port={free_port()}"],
                               env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})

    def alive_nodes(self) -> list[dict]:
        """Nodes the GCS reports alive (via the state API; no driver is attached)."""
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard) if n.state == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline, seen, error = time.monotonic() + timeout, None, None
        while time.monotonic() < deadline:
            try:
                seen = len(self.alive_nodes())
                if seen == count:
                    return
            except Exception as exc:  # the dashboard is still starting
                error = exc
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {count} alive nodes in {timeout} s "
                           f"(last seen: {seen}; last error: {error!r})")

    def stop(self, grace: float = 3) -> None:
        """Workers first, then the head; only this cluster's processes.

        Each node gets SIGTERM, then SIGKILL after ``grace`` seconds: a worker node is gone in about
        a second, while the head's GCS, raylet and monitor outlive a SIGTERM by more than 10 s here
        (measured), and nothing of a test cluster needs saving.
        """
        for node in reversed(self.nodes):
            node.kill(signal.SIGTERM, wait=grace)
            node.kill(signal.SIGKILL)
        self.nodes = []
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
