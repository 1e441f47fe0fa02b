"""The Serve deployments and the FastAPI routes (imported only where the service runs).

See :mod:`posterfusion.serving.app` for how the service is laid out and why; this module
holds what needs ``ray.serve`` at class-definition time (``@serve.batch``, ``@serve.ingress``).
"""


import asyncio
import inspect
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from posterfusion.serving.config import ServeConfig
from posterfusion.serving.metrics import ApiMetrics, ModelMetrics
from posterfusion.serving.requests import (
    DECODE_STATUS,
    PAGE,
    ApiError,
    batch_metadata,
    check_poster_part,
    parse_metadata,
    raise_first,
    read_form,
    read_json_field,
)
from posterfusion.serving.schemas import BatchResponse, GenresResponse, PredictResponse

api = FastAPI(title="posterfusion", version="1",
              description="Movie genres from a poster (+ optional metadata), with the objects detected on it.")
ROUTES = {"/", "/healthz", "/v1/genres", "/v1/predict", "/v1/predict/batch"}
_metrics: list[ApiMetrics] = []  # created in the replica on first use, never at import
logger = logging.getLogger("ray.serve")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse({"error": {"code": "invalid_request", "message": str(exc.errors())[:500]}}, status_code=422)


class RecordAnswers:
    """Every answer is counted by endpoint and status, an unhandled exception as the 500 it becomes.

    That 500 is a bug by definition (bad input is 4xx, overload 503): the count is what an
    alert on ``status="500"`` watches. A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware``
    runs each request through an extra task and stream, a cost every request pays.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]  # 500 unless a response starts

        async def record_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            if not _metrics:
                _metrics.append(ApiMetrics())
            path = scope.get("path", "")
            _metrics[0].observe(path if path in ROUTES else "other", status[0], time.perf_counter() - started)


api.add_middleware(RecordAnswers)


class BatchedModel:
    """The bundle's Predictor; concurrent posters (from any request) are scored in batches.

    Lives inside each HTTP ingress replica (``ServeConfig.model_in_ingress``, the default: one
    hop from the proxy) or as its own deployment, ``PosterModel``, that the ingress calls
    through a handle (parsing and the model scale apart, at the cost of a hop per poster).

    The batch wait adapts to the load: a poster alone in the replica is scored at once (no
    wait added to a quiet service's latency); with others in flight, the batch waits up to
    ``batch_wait_timeout_s`` to fill. The wait is what lets batches fill at all: the replica's
    event loop needs that time to take the requests that arrived while the last batch computed
    (with a 2 ms wait, 16 concurrent clients formed batches of 1–3 here; with 20 ms, of 8).
    """

    def __init__(self, bundle: str, max_batch_size: int, batch_wait_timeout_s: float, max_pixels: int):
        from dataclasses import replace

        from posterfusion.features.catalogue import SERVING_LIMITS
        from posterfusion.models.predictor import Predictor

        self.predictor = Predictor(bundle, limits=replace(SERVING_LIMITS, max_pixels=max_pixels))
        _ = self.predictor.detector  # loaded (and verified) now, not by the first request
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.wait_s, self.in_flight = batch_wait_timeout_s, 0
        self.metrics = ModelMetrics(self.predictor.genres)

    async def predict(self, poster: bytes, metadata: dict | None) -> dict:
        self.in_flight += 1
        try:
            self.predict_batch.set_batch_wait_timeout_s(self.wait_s if self.in_flight > 1 else 0.0)
            return await self.predict_batch((poster, metadata))
        finally:
            self.in_flight -= 1

    def info(self) -> dict:
        return {"model_version": self.predictor.version, "variant": self.predictor.config.model.variant,
                "detector": self.predictor.config.detector_id, "genres": self.predictor.genres,
                "thresholds": {g: float(t) for g, t in zip(self.predictor.genres, self.predictor.thresholds,
                                                            strict=True)}}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # set from the ServeConfig in __init__ / predict
    async def predict_batch(self, items: list[tuple[bytes, dict | None]]) -> list[dict]:
        started = time.perf_counter()
        # In a thread: the replica's event loop keeps queueing the next batch while this one computes.
        results = await asyncio.to_thread(self._predict_sync, items)
        seconds = time.perf_counter() - started
        self.metrics.observe_batch(len(items), seconds, results)
        for result in results:
            if "error" not in result:
                result["model_ms"] = round(1000 * seconds, 3)
        return results

    def _predict_sync(self, items: list[tuple[bytes, dict | None]]) -> list[dict]:
        """One Predictor call for the batch; a poster that fails is ``{"error": reason}``, alone.

        ``Predictor.score`` already isolates decode, metadata and detection per poster. Should the
        batch call still raise (the network itself on some input), each poster is scored alone,
        so only the one that fails gets its error (``model_failed``, logged with its traceback)
        and its neighbours their answers.
        """
        try:
            scored = self.predictor.score([poster for poster, _ in items], [metadata for _, metadata in items])
        except Exception as exc:
            if len(items) > 1:
                return [result for item in items for result in self._predict_sync([item])]
            logger.exception("a poster failed inside the model")
            return [{"error": f"model_failed: {type(exc).__name__}: {exc}"[:300]}]
        results: list[dict] = []
        for i in range(len(items)):
            if scored.errors[i] is not None:
                results.append({"error": scored.errors[i]})
                continue
            prediction = self.predictor.prediction(scored, i)
            results.append({
                "model_version": self.predictor.version,
                "probabilities": prediction.probabilities,
                "top3": [{"genre": g, "probability": p} for g, p in prediction.top3],
                "genres": prediction.genres,
                "objects": [o.model_dump() for o in prediction.objects],
                "detections": prediction.detections,
                "batch_size": len(items),
            })
        return results


# The model as a deployment of its own (``model_in_ingress=False``).
PosterModel = serve.deployment(name="PosterModel")(BatchedModel)


@serve.deployment
@serve.ingress(api)
class Api:
    """FastAPI ingress: parses and validates, then one model call per poster.

    The model is in this replica (``model`` None: a :class:`BatchedModel` built here) or behind
    a handle to the ``PosterModel`` deployment.
    """

    def __init__(self, model: DeploymentHandle | None, config: dict):
        self.config = ServeConfig.model_validate(config)
        self.model = model
        self.local = None if model is not None else BatchedModel(
            str(self.config.model), self.config.max_batch_size, self.config.batch_wait_timeout_s,
            self.config.max_pixels)

    def reconfigure(self, settings: dict) -> None:
        """Serve's hook for ``user_config``: the ``ServeConfig`` this replica was built with (``bind`` records it
        there for ``posterfusion deploy`` to read back). The same settings are the init args, so a change of them
        is a new version with new replicas: a running replica has nothing to re-apply."""

    async def _call(self, method: str, *args):
        """A model call, here or through the handle; Serve's back-pressure (the model's queue is full) is the
        client's 503, on every route. (In one deployment, the proxy itself answers 503 before the request
        reaches this replica.)"""
        if self.local is not None:
            result = getattr(self.local, method)(*args)
            return await result if inspect.isawaitable(result) else result
        try:
            return await getattr(self.model, method).remote(*args)
        except BackPressureError:
            raise ApiError(503, "overloaded", "the model's queue is full; retry with backoff") from None

    async def score(self, poster: bytes, metadata: dict | None = None) -> dict:
        """One poster's answer as the routes get it (for handle calls: benchmarks, other deployments)."""
        return await self._call("predict", poster, metadata)

    async def _predict(self, poster: bytes, metadata: dict | None, index: int | None = None) -> dict:
        result = await self.score(poster, metadata)
        if "error" in result:
            code = result["error"].split(":", 1)[0]
            where = f"poster {index}: " if index is not None else ""
            raise ApiError(DECODE_STATUS.get(code, 422), code, where + result["error"])
        return result

    async def _poster_bytes(self, part, name: str) -> bytes:
        check_poster_part(part, self.config.max_upload_bytes, name)
        data = await part.read()
        if not data:
            raise ApiError(400, "empty_poster", f"'{name}' is an empty file")
        if len(data) > self.config.max_upload_bytes:
            raise ApiError(413, "poster_too_large",
                           f"'{name}' is {len(data)} bytes; the limit is {self.config.max_upload_bytes}")
        return data

    @api.post("/v1/predict", response_model=PredictResponse)
    async def predict(self, request: Request) -> dict:
        """Multipart: ``poster`` (image file), optional ``metadata`` (a JSON object)."""
        form = await read_form(request, self.config)
        data = await self._poster_bytes(form.get("poster"), "poster")
        metadata = parse_metadata(await read_json_field(form.get("metadata"), "metadata",
                                                        self.config.max_metadata_bytes))
        return await self._predict(data, metadata)

    @api.post("/v1/predict/batch", response_model=BatchResponse)
    async def predict_batch(self, request: Request) -> dict:
        """Multipart: ``posters`` (repeated image files), optional ``metadata`` (a JSON list, one per poster)."""
        form = await read_form(request, self.config, posters=self.config.max_batch_posters)
        parts = form.getlist("posters")
        if not parts:
            raise ApiError(400, "missing_poster", "multipart field 'posters' with at least one image is required")
        if len(parts) > self.config.max_batch_posters:
            raise ApiError(413, "too_many_posters", f"{len(parts)} posters; the limit is "
                           f"{self.config.max_batch_posters}")
        posters = [await self._poster_bytes(p, f"posters[{i}]") for i, p in enumerate(parts)]
        raw = await read_json_field(form.get("metadata"), "metadata", self.config.max_metadata_bytes)
        metadata = batch_metadata(raw, len(posters))
        results = await asyncio.gather(*(self._predict(p, m, i) for i, (p, m) in
                                         enumerate(zip(posters, metadata, strict=True))), return_exceptions=True)
        raise_first(results)
        return {"model_version": results[0]["model_version"], "predictions": results}

    @api.get("/v1/genres", response_model=GenresResponse)
    async def genres(self) -> dict:
        return await self._call("info")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        info = await self._call("info")
        return {"status": "ok", "model_version": info["model_version"]}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE.read_text()


def autoscaling(config: ServeConfig) -> dict:
    """Serve's autoscaling config for the model replicas.

    The load reaches the controller every ``metrics_interval_s`` (Serve's default 10 s, pushed by
    the proxy's router): a third of the look-back window, so a short window holds several pushes
    rather than one stale one (Serve warns when the window is not longer than the interval).
    """
    return {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s, "downscale_delay_s": config.downscale_delay_s,
            "look_back_period_s": config.autoscaling_look_back_s,
            "metrics_interval_s": min(10.0, config.autoscaling_look_back_s / 3)}


def bind(config: ServeConfig):
    """The application graph with the config's batching, autoscaling, back-pressure and rollout settings.

    With the model in the ingress, that one deployment gets the model replica's settings; else
    the model deployment does, and the ingress is sized to never be what queues. Every
    deployment rolls out with a surge (``max_surge_percent``): a new version's replicas start and
    pass their health check before old ones stop, where Serve's default stops them first. The
    ingress records the whole ``ServeConfig`` as its ``user_config``, kept by Serve, which is
    where ``posterfusion deploy`` reads the running settings back (``app.running_settings``).
    """
    surge = {"max_surge_percent": config.rollout_surge_percent}
    replicas = {"autoscaling_config": autoscaling(config),
                "max_ongoing_requests": config.max_ongoing_requests,
                "max_queued_requests": config.max_queued_requests,
                "ray_actor_options": {"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
                "logging_config": {"enable_access_log": config.access_log}} | surge
    args = config.model_dump(mode="json")
    if config.model_in_ingress:
        return Api.options(**replicas, user_config=args).bind(None, args)
    model = PosterModel.options(**replicas).bind(str(config.model), config.max_batch_size,
                                                 config.batch_wait_timeout_s, config.max_pixels)
    return Api.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=max(64, 4 * config.max_ongoing_requests * config.max_replicas),
        max_queued_requests=4 * config.max_queued_requests,
        ray_actor_options={"num_cpus": config.ingress_cpus},
        logging_config={"enable_access_log": config.access_log},
        user_config=args, **surge,
    ).bind(model, args)
