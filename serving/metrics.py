"""The service's own Prometheus metrics, exported by Ray's metrics agent with the Serve tags.

Names (Ray prefixes ``ray_``): ``posterfusion_requests_total{endpoint,status}``,
``posterfusion_request_latency_ms{endpoint}``, ``posterfusion_batch_size``,
``posterfusion_batch_latency_ms``, ``posterfusion_predictions_total{genre}`` (thresholded
genre sets), ``posterfusion_rejected_posters_total{reason}``. ``docs/operations.md`` says
what each means and how to alert on it.
"""

from __future__ import annotations

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


class ApiMetrics:
    """Recorded by the ingress: every answer, by endpoint and HTTP status."""

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("posterfusion_requests_total", description="HTTP answers by status",
                                        tag_keys=("endpoint", "status"))
        self.latency = metrics.Histogram("posterfusion_request_latency_ms", description="ingress latency",
                                         boundaries=LATENCY_MS, tag_keys=("endpoint",))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        self.latency.observe(seconds * 1000, tags={"endpoint": endpoint})


class ModelMetrics:
    """Recorded by the model replicas: batch sizes, batch latency, what was predicted and rejected."""

    def __init__(self, genres: list[str]):
        from ray.serve import metrics

        self.batch_size = metrics.Histogram("posterfusion_batch_size", description="posters per model call",
                                            boundaries=BATCH_SIZES)
        self.batch_latency = metrics.Histogram("posterfusion_batch_latency_ms", description="one model call",
                                               boundaries=LATENCY_MS)
        self.predictions = metrics.Counter("posterfusion_predictions_total", description="thresholded genres",
                                           tag_keys=("genre",))
        self.rejected = metrics.Counter("posterfusion_rejected_posters_total", description="undecodable posters",
                                        tag_keys=("reason",))
        self.genres = genres

    def observe_batch(self, size: int, seconds: float, results: list[dict]) -> None:
        self.batch_size.observe(size)
        self.batch_latency.observe(seconds * 1000)
        for result in results:
            if "error" in result:
                self.rejected.inc(tags={"reason": result["error"].split(":", 1)[0]})
            for genre in result.get("genres", []):
                self.predictions.inc(tags={"genre": genre})
