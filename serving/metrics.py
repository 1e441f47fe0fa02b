"""The service's own Prometheus metrics, exported by Ray's metrics agent with the Serve tags.

Names (Ray prefixes ``ray_``): ``posterfusion_requests_total{endpoint,status}``,
``posterfusion_request_latency_ms{endpoint}``, ``posterfusion_batch_size``,
``posterfusion_batch_latency_ms``, ``posterfusion_predictions_total{genre}`` (thresholded
genre sets), ``posterfusion_rejected_posters_total{reason}``. ``docs/operations.md`` says
what each means and how to alert on it.

Recording is off the request path: a Ray metric call costs tens of microseconds (tag checks, a
call into the core worker), several per request, all while the poster's answer waits. The
routes only append what they saw to a :class:`Deferred` queue (a lock and an append); a daemon
thread of the replica makes the Ray calls every ``flush_s`` (counters summed per tag set, one
``inc`` each). Prometheus scrapes every few seconds, so a second's delay changes nothing it sees.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


class Deferred:
    """Metric calls queued by the request path and made by a daemon thread every ``flush_s`` seconds.

    ``count`` sums a counter's increments per tag set until the flush (one ``inc`` per tag set);
    ``observe`` keeps every histogram value (Ray's histograms take them one at a time).
    """

    def __init__(self, flush_s: float = 1.0):
        self.flush_s, self.lock = flush_s, threading.Lock()
        self.counts: Counter = Counter()
        self.values: list[tuple[object, float, tuple]] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="metrics-flush").start()

    def count(self, counter, tags: tuple = ()) -> None:
        with self.lock:
            self.counts[(counter, tags)] += 1

    def observe(self, histogram, value: float, tags: tuple = ()) -> None:
        with self.lock:
            self.values.append((histogram, value, tags))

    def flush(self) -> None:
        """Make the queued calls now (the thread does it every ``flush_s``; tests call it directly)."""
        with self.lock:
            counts, values, self.counts, self.values = self.counts, self.values, Counter(), []
        for (counter, tags), n in counts.items():
            counter.inc(n, tags=dict(tags) or None)
        for histogram, value, tags in values:
            histogram.observe(value, tags=dict(tags) or None)

    def close(self) -> None:
        self._stop.set()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:  # a metric that refuses a value must not stop every later flush
                logging.getLogger("ray.serve").exception("recording the service's metrics failed")


_DEFERRED: list[Deferred] = []


def shared_deferred() -> Deferred:
    """This process's one :class:`Deferred` (its thread starts on first use, never at import)."""
    if not _DEFERRED:
        _DEFERRED.append(Deferred())
    return _DEFERRED[0]


class ApiMetrics:
    """Recorded by the ingress: every answer, by endpoint and HTTP status."""

    def __init__(self):
        from ray.serve import metrics

        self.deferred = shared_deferred()
        self.requests = metrics.Counter("posterfusion_requests_total", description="HTTP answers by status",
                                        tag_keys=("endpoint", "status"))
        self.latency = metrics.Histogram("posterfusion_request_latency_ms", description="ingress latency",
                                         boundaries=LATENCY_MS, tag_keys=("endpoint",))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.deferred.count(self.requests, (("endpoint", endpoint), ("status", str(status))))
        self.deferred.observe(self.latency, seconds * 1000, (("endpoint", endpoint),))


class ModelMetrics:
    """Recorded by the model replicas: batch sizes, batch latency, what was predicted and rejected."""

    def __init__(self, genres: list[str]):
        from ray.serve import metrics

        self.deferred = shared_deferred()
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
        self.deferred.observe(self.batch_size, size)
        self.deferred.observe(self.batch_latency, seconds * 1000)
        for result in results:
            if "error" in result:
                self.deferred.count(self.rejected, (("reason", result["error"].split(":", 1)[0]),))
            for genre in result.get("genres", []):
                self.deferred.count(self.predictions, (("genre", genre),))
