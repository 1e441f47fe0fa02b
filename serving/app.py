"""The online service: a FastAPI ingress and a batched model on Ray Serve, in one replica or two.

    HTTP ──► Api (FastAPI ingress: parse, validate, 4xx for bad input)
               │  one model call per poster: in this replica (default), or through a handle
               ▼
             BatchedModel (the bundle's Predictor; @serve.batch groups concurrent posters)

By default (``model_in_ingress``) the model lives in the ingress replica: the proxy's
request reaches the replica that scores it in one hop, and that deployment is what
autoscales (``target_ongoing_requests``) and what overload protects (``max_queued_requests``:
the proxy answers 503 at once instead of letting requests pile up). The model runs in a
thread, so the replica's event loop keeps parsing and validating while a batch computes. A
second hop cost 7.3 ms of a ``/healthz`` and 5.6 ms of a poster's serving overhead on this
project's 2-core machine (docs/results.md), so one deployment is the default; ``model_in_ingress: false`` splits
off a ``PosterModel`` deployment the ingress calls through a handle, for a cluster where
parsing should scale apart from GPU model replicas. Each poster is its own model call, so
posters of one ``/v1/predict/batch`` request and of other clients' requests share batches.
Every bad input is answered 4xx with a JSON body ``{"error": {"code", "message"}}`` before
it reaches the model; a poster that only fails to decode inside the model comes back as an
error value, never as an exception that would fail its batch-mates.

Built by :func:`build_app` — from ``posterfusion serve`` and from ``serve run`` /
``serve deploy`` with ``serving/serve_config.yaml`` (the builder takes the typed args).
"""

from __future__ import annotations

import time
from pathlib import Path

from posterfusion.locations import Location
from posterfusion.serving.config import ServeConfig

__all__ = ["ServeConfig", "build_app", "check_bundle", "direct_urls", "enable_direct_ingress", "running_settings",
           "start_service", "switch_model"]


def build_app(args: ServeConfig | dict):
    """Serve application builder: ``serve run posterfusion.serving.app:build_app model=DIR`` or a YAML's args."""
    from posterfusion.serving.deployments import bind  # ray.serve and FastAPI: only where the service starts

    config = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    return bind(config)


# Serve's direct ingress (Ray >= 2.56, experimental): a cluster-wide switch read when Serve starts.
DIRECT_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # how long a stopping replica keeps answering so a load balancer can drop it (Serve: 30 s)
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def enable_direct_ingress() -> None:
    """Set :data:`DIRECT_INGRESS_ENV` in this process, for the local Ray it is about to start.

    Only a Ray started afterwards by this process inherits it; a running cluster (``--address``)
    needs it in the environment its Ray processes started with (docs/operations.md).
    """
    import os

    for key, value in DIRECT_INGRESS_ENV.items():
        os.environ.setdefault(key, value)


def direct_urls(name: str = "posterfusion") -> list[str]:
    """The HTTP address of each running ingress replica of app ``name`` under Serve's direct ingress.

    With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the cluster's environment, every ingress
    replica also answers HTTP itself, on a port of its own (30000 and up) on the host Serve's
    HTTP options name (loopback here): a client or a load balancer beside it skips Serve's proxy
    and the hop from the proxy to the replica — most of the serving overhead on this project's
    machine (docs/results.md). The proxy keeps serving the usual URL. Serve has no public call for
    these ports yet; they come from the controller's target groups. Empty when direct ingress is off.
    """
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(name))
    return sorted(f"http://{target.ip}:{target.port}" for group in groups
                  if group.app_name == name and group.ingress_deployment_name
                  and group.protocol == RequestProtocol.HTTP for target in group.targets)


def start_service(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, name: str = "posterfusion",
                  route_prefix: str = "/") -> str:
    """Start Serve's HTTP proxy on ``host:port`` (loopback by default) and deploy the app; return its URL.

    Needs a connected Ray (``cluster.ray_cluster``). Returns once every replica is up.
    """
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def check_bundle(model: Path | Location) -> str:
    """Load ``model`` as a replica will and return its version; a bundle that cannot load is the user's error.

    A replica builds the network from the bundle's config, loads every weight strictly and loads
    the detector in its constructor; a bundle that fails there would have Serve retry replicas
    for minutes. Loaded here first (on the CPU), before any replica switches, it is refused while
    the running version keeps answering.
    """
    from posterfusion.errors import UserFileNotFound, UserValueError
    from posterfusion.models.predictor import Predictor

    try:
        predictor = Predictor(model, device="cpu")
        _ = predictor.detector
    except Exception as exc:  # whatever stops the bundle loading here would stop every new replica
        error = UserFileNotFound if isinstance(exc, FileNotFoundError) else UserValueError
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        raise error(f"refused {model}, the running model keeps serving: {reason}") from exc
    return predictor.version


def _application(name: str):
    """App ``name`` as Serve's controller describes it (``ServeInstanceDetails``, what ``serve.status()`` reads)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    from posterfusion.errors import UserValueError

    client = _get_global_client(raise_if_no_controller_running=False)
    apps = ServeInstanceDetails(**client.get_serve_details()).applications if client else {}
    if name not in apps:
        raise UserValueError(f"no Serve application {name!r} runs on this cluster (running: "
                             f"{', '.join(sorted(apps)) or 'none'})")
    return apps[name]


def running_settings(name: str = "posterfusion") -> tuple[ServeConfig, str | None]:
    """The ``ServeConfig`` app ``name`` runs with, and its route prefix, as Serve keeps them.

    ``bind`` records the config as the ingress deployment's ``user_config``: Serve holds it with
    the deployment (a restarted controller too) and shows it on its REST API, so a switch keeps
    every setting without the operator repeating them, whoever started the app and however.
    """
    from posterfusion.errors import UserValueError

    app = _application(name)
    if app.source == "declarative":
        raise UserValueError(f"Serve application {name!r} was deployed from a serve config (serve deploy, a "
                             "RayService): change the model in that config")
    ingress = app.deployments.get("Api")
    settings = ingress.deployment_config.user_config if ingress is not None else None
    if not isinstance(settings, dict):
        raise UserValueError(f"Serve application {name!r} records no posterfusion settings: is it this service "
                             "(started by posterfusion serve)?")
    return ServeConfig.model_validate(settings), app.route_prefix


def _replica_ids(app) -> set[str]:
    return {replica.replica_id for deployment in app.deployments.values() for replica in deployment.replicas}


def switch_model(model: Path | Location, name: str = "posterfusion", timeout_s: float = 600.0) -> ServeConfig:
    """Redeploy app ``name`` with bundle ``model`` and every other setting it runs with; return once switched.

    Serve's in-place update: the new version's replicas start, load the bundle and pass their
    health check before old ones stop taking requests and drain (``rollout_surge_percent``), so
    no request fails. Switched means the app is RUNNING and none of the replicas it had before
    is left: every replica answering was built with ``model``. Check the bundle first
    (:func:`check_bundle`); Serve's own failure to start the new version is reported with its
    message while the old replicas keep serving.
    """
    from ray.serve.api import _run  # serve.run waits for the app without a deadline

    config, route_prefix = running_settings(name)
    new = ServeConfig.model_validate(config.model_dump() | {"model": model})
    before = _replica_ids(_application(name))
    _run(build_app(new), name=name, route_prefix=route_prefix, _blocking=False)
    _wait_switched(name, before, timeout_s)
    return new


def _wait_switched(name: str, before: set[str], timeout_s: float) -> None:
    from posterfusion.errors import UserValueError

    deadline = time.monotonic() + timeout_s
    while True:
        app = _application(name)
        message = " ".join((app.message or "").split())[:400]
        if app.status == "DEPLOY_FAILED":
            raise UserValueError(f"Serve could not start the new model of {name!r} (replicas of the old one that are "
                                 f"still up keep serving): {message}")
        if app.status == "RUNNING" and not _replica_ids(app) & before:
            return
        if time.monotonic() > deadline:
            raise UserValueError(f"{name!r} had not switched after {timeout_s:g} s ({app.status}; {message}); Serve "
                                 "keeps rolling it out")
        time.sleep(0.25)
