"""The one way every job gets a Ray cluster.

With ``--address``/``RAY_ADDRESS`` a job attaches to that cluster unchanged. Without one it
starts Ray on this machine, and that start must keep every connection on loopback:

* Ray's dashboard asks cloud metadata servers (169.254.169.254, metadata.google.internal)
  which cloud it runs on, at every head start, unless ``~/ray_bootstrap_config.yaml``
  exists. The head therefore starts with ``HOME`` pointing at a private directory holding a
  ``provider: {type: local}`` bootstrap file.
* Ray finds its node IP by a UDP "connect" toward a public address unless told otherwise;
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` plus an explicit ``127.0.0.1`` node IP stop that.
* Usage stats reporting is switched off; Ultralytics is told it is offline.

``tests/test_network_audit.py`` proves the result with an audit hook in every Ray process.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field

from posterfusion.cluster.console import is_verbose, quiet_ray_data_env

log = logging.getLogger(__name__)

BOOTSTRAP_FILE = "ray_bootstrap_config.yaml"
BOOTSTRAP_TEXT = "# Written by posterfusion: marks this Ray head as a local cluster.\nprovider: {type: local}\n"


def state_dir() -> Path:
    """Where posterfusion keeps machine-local state (Ray's HOME, Ultralytics settings)."""
    return Path(os.environ.get("POSTERFUSION_HOME", Path.home() / ".cache" / "posterfusion"))


def prepare_environment() -> dict[str, str]:
    """Set the process environment that keeps Ray, Ultralytics and MLflow off the network.

    Must run before ``ray`` is imported: Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` at
    import time. Every process Ray starts inherits these variables. Returns what was set.
    """
    root = state_dir()
    real_home = os.environ.get("POSTERFUSION_REAL_HOME", os.path.expanduser("~"))
    values = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "0",
        "YOLO_VERBOSE": os.environ.get("YOLO_VERBOSE", "False"),
        "YOLO_CONFIG_DIR": str(root / "ultralytics"),
        "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow (run tracking) sends usage telemetry unless told not to
        "DO_NOT_TRACK": "true",
        # Ray's processes get a different HOME (below); keep caches where the user has them.
        "TORCH_HOME": os.environ.get("TORCH_HOME", os.path.join(real_home, ".cache", "torch")),
        "POSTERFUSION_REAL_HOME": real_home,
    }
    values |= quiet_ray_data_env()  # every Ray process this machine starts logs Ray Data quietly
    if os.environ.get("POSTERFUSION_WEIGHTS"):  # Ray's workers run in other directories: no relative paths
        os.environ["POSTERFUSION_WEIGHTS"] = os.path.abspath(os.environ["POSTERFUSION_WEIGHTS"])
    for key, value in values.items():
        os.environ.setdefault(key, value)
    Path(os.environ["YOLO_CONFIG_DIR"]).mkdir(parents=True, exist_ok=True)
    return {key: os.environ[key] for key in values}


def ray_home() -> Path:
    """A HOME for the Ray head whose bootstrap file stops the cloud-metadata probe."""
    home = state_dir() / "ray-home"
    home.mkdir(parents=True, exist_ok=True)
    bootstrap = home / BOOTSTRAP_FILE
    if not bootstrap.exists():
        bootstrap.write_text(BOOTSTRAP_TEXT)
    _ensure_auth_token(home / ".ray" / "auth_token")
    return home


def _ensure_auth_token(path: Path) -> None:
    """Ray's token authentication keeps a token at ``~/.ray/auth_token`` (here: the Ray HOME).

    Ray creates it on a first local start only when ``RAY_AUTH_MODE`` is unset; a process that
    sets the mode and ``RAY_AUTH_TOKEN_PATH`` up front (the tests, ``LocalCluster``) would find
    no file on a fresh machine. Same format as ``ray get-auth-token --generate``: 64 hex chars.
    """
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))


class ClusterConfig(BaseModel):
    """How a job reaches Ray. ``address=None`` and no ``RAY_ADDRESS`` means a local start."""

    address: str | None = Field(None, description="Ray address; falls back to RAY_ADDRESS.")
    num_cpus: float | None = Field(None, description="CPUs of a local start (default: all).")
    num_gpus: int | None = Field(None, description="GPUs of a local start (default: detected).")
    include_dashboard: bool = Field(True, description="Serve/job APIs need the dashboard.")
    object_store_mb: int | None = Field(None, description="Object store of a local start.")
    verbose: bool = Field(default_factory=is_verbose,
                          description="Ray workers log at INFO (default: warnings only; `posterfusion -v`).")

    def resolved_address(self) -> str | None:
        return self.address or os.environ.get("RAY_ADDRESS") or None


class ClusterInfo(BaseModel):
    """What a job needs to know about the cluster it got."""

    address: str
    local: bool
    cpus: float
    gpus: float
    nodes: int


def _describe(local: bool) -> ClusterInfo:
    import ray

    resources = ray.cluster_resources()
    return ClusterInfo(
        address=ray.get_runtime_context().gcs_address,
        local=local,
        cpus=float(resources.get("CPU", 0.0)),
        gpus=float(resources.get("GPU", 0.0)),
        nodes=sum(1 for node in ray.nodes() if node.get("Alive")),
    )


def _start_local(config: ClusterConfig) -> None:
    import ray

    saved_home = os.environ.get("HOME")
    os.environ["HOME"] = str(ray_home())  # inherited by the dashboard and every Ray process
    try:
        ray.init(
            num_cpus=config.num_cpus if config.num_cpus is not None else os.cpu_count(),
            num_gpus=config.num_gpus,
            object_store_memory=config.object_store_mb * 2**20 if config.object_store_mb else None,
            include_dashboard=config.include_dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            logging_level=_driver_logging_level(config),
            logging_config=_worker_logging(config),
            log_to_driver=True,
        )
    finally:
        if saved_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved_home


@contextmanager
def ray_cluster(config: ClusterConfig | None = None) -> Iterator[ClusterInfo]:
    """Yield a connected Ray; shut it down afterwards only if this call started it.

    A Ray already initialised in this process (a test session, a notebook) is reused as is.
    """
    config = config or ClusterConfig()
    prepare_environment()
    import ray

    if ray.is_initialized():
        yield _describe(local=False)
        return
    address = config.resolved_address()
    if address:
        log.info("attaching to Ray at %s", address)
        ray.init(address=address, logging_level=_driver_logging_level(config), logging_config=_worker_logging(config),
                 **_loopback_driver(address))
    else:
        _start_local(config)
    try:
        yield _describe(local=address is None)
    finally:
        ray.shutdown()


def _driver_logging_level(config: ClusterConfig) -> int:
    """The driver's ``ray`` logger: errors only unless verbose (its warnings are Ray's internals)."""
    return logging.WARNING if config.verbose else logging.ERROR


def _worker_logging(config: ClusterConfig):
    import ray

    from posterfusion.cluster.console import worker_logging_level

    return ray.LoggingConfig(log_level=worker_logging_level(config.verbose))


def _loopback_driver(address: str) -> dict:
    """A driver joining a loopback cluster (``cluster.multinode``) takes the head's 127.x IP as its own.

    Otherwise Ray names the driver's node 127.0.0.1 and finds no raylet there, since each
    node of such a cluster has its own 127.0.0.x.
    """
    host = address.rsplit(":", 1)[0] if "://" not in address else ""
    return {"_node_ip_address": host} if host.startswith("127.") and host != "127.0.0.1" else {}


def cpu_budget(fraction: float = 1.0) -> float:
    """CPUs of the connected cluster times ``fraction``: actor pools are sized from this.

    On a 2-CPU machine an actor asking a whole CPU can starve Ray Data's read tasks, so
    callers ask for fractions of what the cluster really has.
    """
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0)) * fraction


def node_cpus() -> list[float]:
    """CPUs of each alive node: one worker or actor can never ask more than one node has."""
    import ray

    return [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes()
            if n.get("Alive") and n["Resources"].get("CPU", 0.0) > 0]


LISTING_CPUS = 1.0  # Ray 2.60's read_parquet lists files in a task asking one whole CPU
# Each model-holding actor is a process that imports torch and loads its model before its first row:
# ~4 s on a 2-core machine, where scoring takes 10-50 ms a poster. A small input is done sooner by
# fewer actors (a 66-poster score run: 10.6-11.3 s on two actors, 6.4-8.0 s on one, measured here),
# so a model-holding pool gets one actor per this many rows (a large catalogue still gets them all).
ROWS_PER_MODEL_ACTOR = 256


def model_actors(rows: int, batch_size: int, requested: int | None = None) -> int:
    """The most model-holding actors ``rows`` rows are worth: one per batch, and unless the user asked
    for a number (``requested``), at least :data:`ROWS_PER_MODEL_ACTOR` rows each."""
    return max(1, math.ceil(rows / (batch_size if requested else max(batch_size, ROWS_PER_MODEL_ACTOR))))


class ActorPool(BaseModel):
    """How many model-holding actors a Ray Data stage gets, and what each reserves."""

    size: int
    cpus: float
    gpus: float
    threads: int = Field(1, ge=1, description="torch threads per actor: the cores each can use, never more")

    def strategy(self):
        """Ray Data's strategy for this pool: ``size`` actors from the start, none fewer than 1.

        ``min_size`` 1 rather than ``size``: a small input (a 5-poster split) leaves actors idle,
        which Ray Data would otherwise warn about on every such run.
        """
        from ray.data import ActorPoolStrategy

        return ActorPoolStrategy(min_size=1, max_size=self.size, initial_size=self.size)


def actor_pool(requested: int | None = None, work_items: int | None = None, share: float = 0.75,
               gpu_capable: bool = False) -> ActorPool:
    """Size an actor pool from the connected cluster.

    Actors start before any data is read, and Ray Data's file listing needs one whole CPU,
    so the pool reserves at most the cluster's CPUs minus one (and by default at most 75 %
    of them): on a 2-CPU machine, two actors asking 0.75 CPU each leave 0.5 free and the
    job waits forever. On several nodes the actors are spread (``SPREAD``), so each node
    hosts about ``size / nodes`` of them; they then ask little enough that the smallest node
    keeps a whole CPU too. GPUs are shared among the actors when the model can use one.
    """
    import ray

    total = cpu_budget()
    size = requested or max(1, int(total))
    if work_items is not None:
        size = max(1, min(size, work_items))
    spare = max(0.0, total - LISTING_CPUS)
    cpus = min(total * share, spare) / size
    nodes = node_cpus()
    if len(nodes) > 1:
        per_node = math.ceil(size / len(nodes))
        cpus = min(cpus, max(0.0, min(nodes) - LISTING_CPUS) / per_node)
    cpus = max(0.01, cpus)
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    gpus = min(1.0, cluster_gpus / size) if (gpu_capable and cluster_gpus) else 0.0
    threads = max(1, int(total // size))
    return ActorPool(size=size, cpus=math.floor(cpus * 1000) / 1000, gpus=gpus, threads=threads)
