"""The service's defences, each on its own and without a cluster: the running service is test_serving.py.

A batch in which one poster breaks the network answers its neighbours; back-pressure is a 503 on
every route; an unhandled exception is counted as the 500 it becomes (a "5xx = bug" alert can
fire); posters are capped at a poster's size, in a poster's formats, and big JPEGs are decoded
small.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from posterfusion.features.catalogue import SERVING_LIMITS, DecodeLimits, PosterDecodeError, decode_rgb
from posterfusion.models.predictor import Scored

from support import jpeg_bytes

pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__:RuntimeWarning")


def _class_of(deployment):
    return deployment.func_or_class


class FakePredictor:
    """Scores posters; the network raises on any batch holding ``b"breaks the model"``."""

    version, genres, thresholds = "v", ["Drama", "Comedy"], np.array([0.5, 0.5])

    def score(self, posters, metadata):
        if b"breaks the model" in posters:
            raise RuntimeError("shape mismatch in the network")
        return Scored(probabilities=np.full((len(posters), 2), 0.6, np.float32), detections=[[] for _ in posters],
                      objects_source=["none"] * len(posters), errors=[None] * len(posters))

    def prediction(self, scored, i):
        from posterfusion.models.predictor import Prediction

        return Prediction(probabilities={"Drama": 0.6, "Comedy": 0.6}, top3=[("Drama", 0.6), ("Comedy", 0.6)],
                          genres=["Drama", "Comedy"], objects=[], detections=[], objects_source="none")


def test_a_poster_that_breaks_the_network_fails_alone_and_its_neighbours_are_answered():
    from posterfusion.serving.deployments import PosterModel

    replica = object.__new__(_class_of(PosterModel))
    replica.predictor = FakePredictor()
    results = replica._predict_sync([(b"good", None), (b"breaks the model", None), (b"also good", None)])
    assert [("error" in r) for r in results] == [False, True, False]
    assert results[1]["error"].startswith("model_failed: RuntimeError: shape mismatch")
    assert results[0]["top3"][0] == {"genre": "Drama", "probability": 0.6}


@pytest.mark.parametrize("route", ["genres", "healthz"])
def test_back_pressure_from_a_separate_model_deployment_is_a_503_on_every_route(route):
    """With the model in the ingress, the proxy answers 503 itself (test_serving.py's overload test)."""
    from ray.serve.exceptions import BackPressureError

    from posterfusion.serving.deployments import Api
    from posterfusion.serving.requests import ApiError

    class Full:
        def __getattr__(self, method):
            class Call:
                async def remote(self, *args):
                    raise BackPressureError(num_queued_requests=64, max_queued_requests=64)

            return Call()

    ingress = object.__new__(_class_of(Api))
    ingress.model, ingress.local = Full(), None
    with pytest.raises(ApiError) as raised:
        asyncio.run(getattr(ingress, route)())
    assert (raised.value.status, raised.value.code) == (503, "overloaded")


def test_an_unhandled_exception_is_counted_as_the_500_it_becomes(monkeypatch):
    from fastapi.testclient import TestClient

    from posterfusion.serving import deployments

    seen = []

    class Recorder:
        def observe(self, endpoint, status, seconds):
            seen.append((endpoint, status))

    monkeypatch.setattr(deployments, "_metrics", [Recorder()])

    @deployments.api.get("/v1/boom")
    async def boom():
        raise RuntimeError("a bug")

    try:
        answer = TestClient(deployments.api, raise_server_exceptions=False).get("/v1/boom")
    finally:
        deployments.api.router.routes.pop()  # the app is the module's: leave it as it was
    assert answer.status_code == 500
    assert seen and seen[-1][1] == 500


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_the_service_caps_posters_at_16_megapixels_before_decoding():
    twenty_megapixels = _png_header(4000, 5000)
    with pytest.raises(PosterDecodeError, match="image_too_large"):
        decode_rgb(twenty_megapixels, SERVING_LIMITS)
    with pytest.raises(PosterDecodeError) as catalogue:  # the catalogue's 50 MP cap lets it through to decoding
        decode_rgb(twenty_megapixels, DecodeLimits())
    assert "image_too_large" not in str(catalogue.value)


def _encoded(kind: str, size=(60, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, kind)
    return buffer.getvalue()


def test_the_service_takes_jpeg_png_and_webp_only():
    for kind in ("JPEG", "PNG", "WEBP"):
        assert decode_rgb(_encoded(kind), SERVING_LIMITS).size == (60, 90)
    for kind in ("GIF", "BMP"):
        with pytest.raises(PosterDecodeError, match=f"unsupported_format: {kind}"):
            decode_rgb(_encoded(kind), SERVING_LIMITS)
        assert decode_rgb(_encoded(kind)).size == (60, 90)  # the catalogue reads any format Pillow does


def test_a_large_jpeg_is_decoded_small_by_libjpeg():
    big = jpeg_bytes(size=(3000, 4500))
    assert decode_rgb(big).size == (3000, 4500)
    assert decode_rgb(big, SERVING_LIMITS).size == (1500, 2250)  # halved while decoding, still ≥ 1280 px a side


def test_one_detector_runs_one_call_at_a_time_whatever_threads_call_it():
    """A Serve replica may run two batches' threads at once; Ultralytics' predictor keeps per-call state."""
    import threading
    import time

    from posterfusion.features.objects import Detector, DetectorConfig

    inside, most = [0], [0]

    class Model:
        def predict(self, images, **options):
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            inside[0] -= 1
            return []

    detector = object.__new__(Detector)
    detector.config, detector.device, detector.model = DetectorConfig(), "cpu", Model()
    detector._lock = threading.Lock()  # what __init__ sets up
    threads = [threading.Thread(target=detector.detect, args=([Image.new("RGB", (8, 8))],)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1


def test_metrics_are_recorded_off_the_request_path_summed_per_tag_set():
    """The route only queues; a flush makes one ``inc`` per counter and tag set, and every histogram value."""
    import time

    from posterfusion.serving.metrics import Deferred

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def inc(self, value, tags=None):
            calls.append((self.name, "inc", value, tags))

        def observe(self, value, tags=None):
            calls.append((self.name, "observe", value, tags))

    requests, latency = Fake("requests"), Fake("latency")
    deferred = Deferred(flush_s=3600)
    for status in ("200", "200", "422"):
        deferred.count(requests, (("endpoint", "/v1/predict"), ("status", status)))
        deferred.observe(latency, 4.0, (("endpoint", "/v1/predict"),))
    assert calls == []  # nothing recorded while the requests are answered
    deferred.flush()
    assert sorted(c for c in calls if c[1] == "inc") == [
        ("requests", "inc", 1, {"endpoint": "/v1/predict", "status": "422"}),
        ("requests", "inc", 2, {"endpoint": "/v1/predict", "status": "200"})]
    assert [c for c in calls if c[1] == "observe"] == [("latency", "observe", 4.0, {"endpoint": "/v1/predict"})] * 3
    deferred.close()

    calls.clear()
    by_thread = Deferred(flush_s=0.05)
    by_thread.observe(latency, 1.0)
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert calls == [("latency", "observe", 1.0, None)]
    by_thread.close()
