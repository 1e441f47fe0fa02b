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

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posterfusion.serving.schemas import MovieMetadata

PAGE = Path(__file__).with_name("index.html")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")


class ServeConfig(BaseModel):
    """Everything an operator tunes; the serve config YAML's ``args`` validate against this."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Path = Field(description="model bundle directory (on every node)")
    max_batch_size: int = Field(8, ge=1, le=256, description="most posters one model call takes")
    batch_wait_timeout_s: float = Field(0.02, ge=0, le=5, description="how long a batch waits to fill while other "
                                        "posters are in flight (a poster alone is scored at once)")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0, description="autoscaling target per model replica, "
                                                  ">= max_batch_size; default: max_batch_size")
    max_ongoing_requests: int | None = Field(None, ge=1, description="in flight per replica, >= max_batch_size; "
                                             "default: twice max_batch_size, at least 16")
    max_queued_requests: int = Field(64, ge=1, description="queued beyond that → 503")
    replica_cpus: float = Field(0.5, gt=0)
    replica_gpus: float = Field(0.0, ge=0)
    model_in_ingress: bool = Field(True, description="score in the HTTP ingress replica (one hop); false: a "
                                   "separate PosterModel deployment, so parsing scales apart from the model")
    ingress_cpus: float = Field(0.1, gt=0, description="with model_in_ingress false: each ingress replica's CPUs")
    ingress_replicas: int = Field(1, ge=1, description="with model_in_ingress false: ingress replicas")
    max_upload_bytes: int = Field(8_000_000, ge=1, description="largest poster accepted (413 above)")
    max_pixels: int = Field(16_000_000, ge=1, description="largest poster in pixels (413 above; checked before "
                            "decoding)")
    max_metadata_bytes: int = Field(16_384, ge=2, description="largest metadata JSON (413 above)")
    max_batch_posters: int = Field(32, ge=1, description="most posters in one /v1/predict/batch")
    access_log: bool = Field(False, description="Serve's own log line per request and replica call; the "
                             "project's request metrics count every answer either way")

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.target_ongoing_requests is None:
            self.target_ongoing_requests = float(self.max_batch_size)
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = max(16, 2 * self.max_batch_size)
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        if self.target_ongoing_requests < self.max_batch_size:
            raise ValueError(f"target_ongoing_requests ({self.target_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}): autoscaling would add replicas before a batch can fill")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError("max_replicas must be >= min_replicas and >= 1")
        return self


class ApiError(Exception):
    """A request the service refuses: HTTP status, a stable code, and what is wrong."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# Decode failures the replica reports, mapped to statuses (413 for the pixel cap: too big, not malformed).
DECODE_STATUS = {"image_too_large": 413, "unsupported_format": 415}


async def read_json_field(value, field: str, limit: int):
    """A form field (text, or a file part: ``curl -F metadata=@m.json``) parsed as JSON; None when absent.

    Bounded before parsing (413), and every way ``json.loads`` can refuse — bad syntax, an integer
    of thousands of digits, nesting deeper than the parser recurses — is the client's 422.
    """
    if value is None:
        return None
    raw = value if isinstance(value, str) else await value.read(limit + 1)
    if len(raw) > limit:
        raise ApiError(413, "metadata_too_large", f"{field} is over {limit} bytes")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "invalid_metadata", f"{field} is not UTF-8 text") from None
    if raw.strip() == "":
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_metadata", f"{field} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except (ValueError, RecursionError) as exc:
        message = f"{field} cannot be parsed: {type(exc).__name__}: {exc}"[:300]
        raise ApiError(422, "invalid_metadata", message) from None


def parse_metadata(value) -> dict | None:
    """A metadata object → the Predictor's record (only the fields given); 422 says which field is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_metadata", f"metadata must be a JSON object, got {type(value).__name__}")
    try:
        return MovieMetadata.model_validate(value).model_dump(exclude_none=True)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'metadata'}: {e['msg']}" for e in exc.errors())
        raise ApiError(422, "invalid_metadata", problems) from None


def batch_metadata(value, n: int) -> list[dict | None]:
    if value is None:
        return [None] * n
    if not isinstance(value, list) or len(value) != n:
        raise ApiError(422, "invalid_metadata", f"metadata must be a JSON list with one entry (object or null) "
                       f"per poster: {n}")
    return [parse_metadata(v) for v in value]


def raise_first(results: list) -> None:
    """All posters of a batch request are answered, or the first problem is (4xx, naming the poster)."""
    for result in results:
        if isinstance(result, BaseException):
            raise result


def check_poster_part(part, limit: int, name: str) -> None:
    """An uploaded part must be a non-empty image of at most ``limit`` bytes (415 / 400 / 413)."""
    if part is None or isinstance(part, str):
        raise ApiError(400, "missing_poster", f"multipart field '{name}' with an image file is required")
    content_type = (part.content_type or "").split(";")[0].strip().lower()
    if content_type not in IMAGE_TYPES and content_type != "application/octet-stream":
        raise ApiError(415, "unsupported_media_type",
                       f"'{name}' is {content_type or 'untyped'}; send one of {', '.join(IMAGE_TYPES)}")
    if part.size is not None and part.size > limit:
        raise ApiError(413, "poster_too_large", f"'{name}' is {part.size} bytes; the limit is {limit}")


def _form_options(config: ServeConfig, posters: int) -> dict:
    """Starlette's own part-size check would answer an oversized metadata field 400: the body is
    already capped by :func:`read_body`, and the metadata's own limit is :func:`read_json_field`'s 413."""
    return {"max_files": config.max_batch_posters + 1, "max_fields": 8, "max_part_size": body_limit(config, posters)}


def body_limit(config: ServeConfig, posters: int) -> int:
    return config.max_upload_bytes * posters + config.max_metadata_bytes + 1_000_000


async def read_body(request, limit: int) -> bytes:
    """The whole body, counted while it streams: a chunked upload (no Content-Length) is cut off at ``limit``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, "body_too_large", f"request body is {length} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request, config: ServeConfig, posters: int = 1):
    """The multipart body, refusing a wrong content type (415) or an oversized body (413) first.

    The body is read under :func:`read_body`'s cap, then parsed from memory: Starlette alone
    would spool file parts of any size to disk.
    """
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with an image in 'poster' (got {content_type or 'no content type'})")
    body = await read_body(request, body_limit(config, posters))

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(**_form_options(config, posters))
    except HTTPException as exc:
        raise ApiError(400, "bad_multipart", str(exc.detail)) from None
    except Exception as exc:  # a malformed multipart body (starlette raises several kinds)
        raise ApiError(400, "bad_multipart", f"could not parse the multipart body: {exc}"[:300]) from None


def build_app(args: ServeConfig | dict):
    """Serve application builder: ``serve run posterfusion.serving.app:build_app model=DIR`` or a YAML's args."""
    from posterfusion.serving.deployments import bind

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
