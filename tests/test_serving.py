"""The online service on loopback: good requests answered, every bad one 4xx (never 5xx), batching, overload.

One Serve instance for the module (in the test session's Ray), with the small fused bundle of
a synthetic sample: it detects objects with the real YOLO, so answers carry real detections.
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from posterfusion.cluster.multinode import free_port
from posterfusion.locations import Location
from posterfusion.models.predictor import Predictor
from posterfusion.serving.app import ServeConfig, start_service

from support import REPO, jpeg_bytes, noisy_jpeg_bytes

pytestmark = pytest.mark.slow


def gif_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 60), (200, 20, 20)).save(buffer, "GIF")
    return buffer.getvalue()


def png_header_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG header claiming ``width × height`` pixels, with one tiny IDAT: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bundle(small_fused) -> Path:
    return small_fused / "bundle"


@pytest.fixture(scope="module")
def service(bundle):
    """The app on 127.0.0.1 (a free port), a tightly limited app for the overload test, and the app with
    its model in a deployment of its own (``model_in_ingress=False``) at /split."""
    from ray import serve

    config = ServeConfig(model=bundle, max_batch_size=8, batch_wait_timeout_s=0.05, max_replicas=1,
                         replica_cpus=0.25, max_upload_bytes=200_000)
    url = start_service(config, port=free_port())
    tight = ServeConfig(model=bundle, max_batch_size=1, batch_wait_timeout_s=0, min_replicas=1, max_replicas=1,
                        max_ongoing_requests=1, max_queued_requests=1, replica_cpus=0.25)
    from posterfusion.serving.app import build_app

    serve.run(build_app(tight), name="tight", route_prefix="/tight", blocking=False)
    split = ServeConfig(model=bundle, model_in_ingress=False, max_batch_size=8, max_replicas=1, replica_cpus=0.1,
                        ingress_cpus=0.05)
    serve.run(build_app(split), name="split", route_prefix="/split", blocking=False)
    yield url
    serve.shutdown()


def post(url: str, files=None, data=None, **kwargs) -> httpx.Response:
    return httpx.post(url, files=files, data=data, timeout=60, **kwargs)


def poster_file(data: bytes, content_type: str = "image/jpeg", name: str = "poster.jpg"):
    return {"poster": (name, data, content_type)}


def test_a_poster_gets_probabilities_top3_genres_and_objects(service, bundle):
    poster = noisy_jpeg_bytes(1, size=(120, 180))
    response = post(f"{service}/v1/predict", files=poster_file(poster))
    assert response.status_code == 200, response.text
    body = response.json()
    predictor = Predictor(bundle)
    assert body["model_version"] == predictor.version
    assert list(body["probabilities"]) == predictor.genres
    expected = predictor.score([poster], [None]).probabilities[0]
    np.testing.assert_allclose([body["probabilities"][g] for g in predictor.genres], expected, atol=1e-5)
    top = [t["genre"] for t in body["top3"]]
    assert top == [predictor.genres[i] for i in np.argsort(-expected)[:3]]
    assert set(body["genres"]) <= set(predictor.genres)
    assert isinstance(body["objects"], list) and isinstance(body["detections"], list)
    assert body["batch_size"] >= 1 and body["model_ms"] > 0  # the model's share of the latency


def test_metadata_is_used_when_given(service, bundle):
    poster = noisy_jpeg_bytes(2)
    meta = {"year": 1985, "runtime": 95.0, "imdb_score": 7.1, "language": "English",
            "overview": "A detective hunts a killer through the city."}
    response = post(f"{service}/v1/predict", files=poster_file(poster), data={"metadata": json.dumps(meta)})
    assert response.status_code == 200, response.text
    predictor = Predictor(bundle)
    expected = predictor.score([poster], [meta]).probabilities[0]
    np.testing.assert_allclose(list(response.json()["probabilities"].values()), expected, atol=1e-5)


def test_a_real_poster_shows_the_people_on_it(service, shared_data):
    posters = sorted((shared_data / "multilabel-posters" / "Images").glob("*.jpg"))[:12]
    found = [post(f"{service}/v1/predict", files=poster_file(p.read_bytes())).json()["objects"] for p in posters]
    assert any(o["name"] == "person" for objects in found for o in objects)


BAD_REQUESTS = {
    "not an image": (dict(files=poster_file(b"this is plain text, not a JPEG")), 422, "not_an_image"),
    "truncated image": (dict(files=poster_file(noisy_jpeg_bytes(3)[:1500])), 422, "truncated_image"),
    "empty body": (dict(content=b"", headers={"content-type": "multipart/form-data; boundary=x"}), 400, None),
    "no body at all": (dict(), 415, "unsupported_media_type"),
    "empty file": (dict(files=poster_file(b"")), 400, "empty_poster"),
    "json instead of multipart": (dict(json={"poster": "abc"}), 415, "unsupported_media_type"),
    "poster part of the wrong type": (dict(files=poster_file(jpeg_bytes(), "text/plain")), 415,
                                      "unsupported_media_type"),
    "over the byte limit": (dict(files=poster_file(b"\xff\xd8" + b"0" * 300_000)), 413, "poster_too_large"),
    "decompression bomb": (dict(files=poster_file(png_header_bomb(), "image/png", "bomb.png")), 413,
                           "image_too_large"),
    "metadata not json": (dict(files=poster_file(jpeg_bytes()), data={"metadata": "{year: 1999"}), 422,
                          "invalid_metadata"),
    "metadata not an object": (dict(files=poster_file(jpeg_bytes()), data={"metadata": "[1, 2]"}), 422,
                               "invalid_metadata"),
    "metadata value out of range": (dict(files=poster_file(jpeg_bytes()), data={"metadata": '{"year": 3020}'}),
                                    422, "invalid_metadata"),
    "metadata of the wrong type": (dict(files=poster_file(jpeg_bytes()), data={"metadata": '{"runtime": "long"}'}),
                                   422, "invalid_metadata"),
    "an overview that is not text": (dict(files=poster_file(jpeg_bytes()), data={"metadata": '{"overview": 7}'}),
                                     422, "invalid_metadata"),
    "unknown metadata field": (dict(files=poster_file(jpeg_bytes()), data={"metadata": '{"genre": "Drama"}'}),
                               422, "invalid_metadata"),
    "garbled multipart": (dict(content=b"--x\r\nContent-Disposition: form-data; name=\"poster\"\r\n\r\nabc",
                               headers={"content-type": "multipart/form-data; boundary=x"}), 400, None),
    "a GIF (not a poster format)": (dict(files=poster_file(gif_bytes(), "image/jpeg", "p.jpg")), 415,
                                    "unsupported_format"),
    "metadata as a file part, invalid": (dict(files={**poster_file(jpeg_bytes()),
                                                     "metadata": ("m.json", b"{nope", "application/json")}),
                                         422, "invalid_metadata"),
    "an integer of 5000 digits": (dict(files=poster_file(jpeg_bytes()), data={"metadata": '{"year": ' + "9" * 5000
                                                                               + "}"}), 422, "invalid_metadata"),
    "nesting deeper than the parser": (dict(files=poster_file(jpeg_bytes()), data={"metadata": "[" * 5000}), 422,
                                       "invalid_metadata"),
    "metadata over its byte limit": (dict(files=poster_file(jpeg_bytes()), data={"metadata": "[" * 200_000}), 413,
                                     "metadata_too_large"),
    "a 309-digit vote count": (dict(files=poster_file(jpeg_bytes()), data={"metadata": '{"num_votes": 1' + "0" * 308
                                                                            + "}"}), 422, "invalid_metadata"),
    "an infinite budget": (dict(files=poster_file(jpeg_bytes()), data={"metadata": '{"budget": Infinity}'}), 422,
                           "invalid_metadata"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_json_error_and_the_service_keeps_serving(service, case):
    kwargs, status, code = BAD_REQUESTS[case]
    response = httpx.post(f"{service}/v1/predict", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert post(f"{service}/v1/predict", files=poster_file(jpeg_bytes())).status_code == 200


def test_metadata_sent_as_a_file_part_is_read_like_a_field(service, bundle):
    poster, meta = noisy_jpeg_bytes(7), {"year": 1999, "language": "English"}
    part = ("m.json", json.dumps(meta).encode(), "application/json")
    as_file = post(f"{service}/v1/predict", files={**poster_file(poster), "metadata": part})
    as_field = post(f"{service}/v1/predict", files=poster_file(poster), data={"metadata": json.dumps(meta)})
    assert as_file.status_code == as_field.status_code == 200, as_file.text
    assert as_file.json()["probabilities"] == as_field.json()["probabilities"]


def test_a_chunked_upload_over_the_limit_is_cut_off_while_it_streams(service):
    """No Content-Length to check up front: the service counts bytes as they arrive."""
    boundary = "fuzzboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"poster\"; filename=\"p.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(40):  # 40 × 64 KB: far over the test app's 200 KB poster limit
            yield b"\xff" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(f"{service}/v1/predict", content=body(), timeout=60,
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert post(f"{service}/v1/predict", files=poster_file(jpeg_bytes())).status_code == 200


def test_inside_a_batch_one_posters_failure_is_that_posters_alone(bundle):
    """The replica's Predictor: a bad poster or metadata record fails its own row, never its neighbours'."""
    predictor = Predictor(bundle)
    posters = [noisy_jpeg_bytes(11), b"not an image", noisy_jpeg_bytes(12), noisy_jpeg_bytes(13)]
    metadata = [{"year": 2001}, None, {"num_votes": 10**400}, None]  # an int no float can hold
    scored = predictor.score(posters, metadata)
    assert scored.errors[0] is None and scored.errors[3] is None
    assert scored.errors[1] == "not_an_image" and scored.errors[2].startswith("invalid_metadata")
    alone = predictor.score([posters[0]], [metadata[0]])
    np.testing.assert_allclose(scored.probabilities[0], alone.probabilities[0], atol=1e-6)
    assert np.isnan(scored.probabilities[[1, 2]]).all()


def test_the_batch_endpoint_answers_each_poster_or_names_the_bad_one(service):
    posters = [noisy_jpeg_bytes(i) for i in range(3)]
    files = [("posters", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(posters)]
    response = post(f"{service}/v1/predict/batch", files=files,
                    data={"metadata": json.dumps([{"year": 2001}, None, {"country": "France"}])})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 3
    files[1] = ("posters", ("bad.jpg", b"not an image", "image/jpeg"))
    response = post(f"{service}/v1/predict/batch", files=files)
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("poster 1:")
    response = post(f"{service}/v1/predict/batch", files=files[:2], data={"metadata": "[null]"})
    assert response.status_code == 422 and "one entry" in response.json()["error"]["message"]


def test_genres_health_and_the_upload_page(service, bundle):
    predictor = Predictor(bundle)
    genres = httpx.get(f"{service}/v1/genres").json()
    assert genres["genres"] == predictor.genres and genres["model_version"] == predictor.version
    assert set(genres["thresholds"]) == set(predictor.genres)
    assert httpx.get(f"{service}/healthz").json() == {"status": "ok", "model_version": predictor.version}
    page = httpx.get(f"{service}/")
    assert page.status_code == 200 and 'type="file"' in page.text
    assert httpx.get(f"{service}/no/such/route").status_code == 404


def test_concurrent_load_forms_batches_and_every_request_succeeds(service):
    """48 requests, 16 at a time: the replica must group posters (batch size > 1) with no errors."""

    async def run() -> list[httpx.Response]:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int) -> httpx.Response:
                async with limit:
                    return await client.post(f"{service}/v1/predict", files=poster_file(noisy_jpeg_bytes(i)))
            return await asyncio.gather(*(one(i) for i in range(48)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 48
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes


def test_overload_answers_503_not_5xx_and_recovers(service):
    """The tight app holds one request and queues one: a burst gets 503s, nothing else fails."""
    base = service.rstrip("/") + "/tight"

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int) -> int:
                response = await client.post(f"{base}/v1/predict", files=poster_file(noisy_jpeg_bytes(i)))
                return response.status_code
            return await asyncio.gather(*(one(i) for i in range(24)))

    statuses = asyncio.run(burst())
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses
    assert post(f"{base}/v1/predict", files=poster_file(jpeg_bytes())).status_code == 200


def test_the_serve_config_yaml_is_a_valid_serve_config_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    app = schema.applications[0]
    assert app.import_path == "posterfusion.serving.app:build_app"
    assert config["http_options"]["host"] == "127.0.0.1"
    ServeConfig.model_validate(app.args)


def test_under_direct_ingress_each_replica_answers_on_its_own_port_as_through_the_proxy(service, bundle):
    """``posterfusion serve --direct-ingress``: a client beside the replica skips the proxy, same answers."""
    from posterfusion.serving.app import direct_urls

    replicas = direct_urls("posterfusion")
    assert len(replicas) == 1 and replicas[0].startswith("http://127.0.0.1:")  # loopback, like the proxy
    assert replicas[0] != service
    poster = noisy_jpeg_bytes(11)
    via_proxy, direct = (post(f"{url}/v1/predict", files=poster_file(poster)) for url in (service, replicas[0]))
    assert direct.status_code == via_proxy.status_code == 200, direct.text
    assert direct.json()["probabilities"] == pytest.approx(via_proxy.json()["probabilities"], abs=1e-6)
    bad = post(f"{replicas[0]}/v1/predict", files=poster_file(b"not a poster"))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "not_an_image"
    assert httpx.get(f"{replicas[0]}/healthz", timeout=30).json()["status"] == "ok"


def test_a_separate_model_deployment_answers_as_the_one_replica_service_does(service):
    poster = noisy_jpeg_bytes(3, size=(120, 180))
    one, split = post(f"{service}/v1/predict", files=poster_file(poster)), \
        post(f"{service}/split/v1/predict", files=poster_file(poster))
    assert one.status_code == split.status_code == 200, split.text
    assert split.json()["probabilities"] == pytest.approx(one.json()["probabilities"], abs=1e-6)
    bad = post(f"{service}/split/v1/predict", files=poster_file(b"not an image"))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "not_an_image", bad.text
    assert httpx.get(f"{service}/split/healthz", timeout=30).json()["status"] == "ok"


def test_serve_run_builds_the_yaml_application_from_its_args(bundle):
    """What `serve run serving/serve_config.yaml` does: call the builder with the YAML's args; the graph it
    returns carries those settings to the deployment that scores (the ingress itself, by default)."""
    from posterfusion.serving.app import build_app

    app = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())["applications"][0]
    args = app["args"] | {"model": str(bundle)}
    ingress = build_app(args)._bound_deployment
    assert ingress.name == "Api" and ingress.init_args[0] is None  # no model handle: it scores in its replica
    assert ServeConfig.model_validate(ingress.init_args[1]).model == Location(bundle)
    assert ingress._deployment_config.max_ongoing_requests == args["max_ongoing_requests"]
    assert ingress._deployment_config.autoscaling_config.max_replicas == args["max_replicas"]
    assert ingress._deployment_config.max_queued_requests == args["max_queued_requests"]


def test_a_separate_model_deployment_takes_the_model_settings_and_the_ingress_calls_it(bundle):
    from posterfusion.serving.app import build_app

    config = ServeConfig(model=bundle, model_in_ingress=False, max_batch_size=4, max_replicas=3, ingress_cpus=0.2)
    ingress = build_app(config)._bound_deployment
    model = ingress.init_args[0]._bound_deployment  # the PosterModel handle the ingress calls
    assert ingress.name == "Api" and model.name == "PosterModel"
    assert model.init_args == (str(bundle), 4, config.batch_wait_timeout_s, config.max_pixels)
    assert model._deployment_config.autoscaling_config.max_replicas == 3
    assert ingress.ray_actor_options["num_cpus"] == 0.2


def test_the_config_refuses_batches_that_could_never_fill(tmp_path):
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeConfig(model=tmp_path, max_batch_size=32, max_ongoing_requests=8, target_ongoing_requests=32)
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        ServeConfig(model=tmp_path, max_batch_size=8, target_ongoing_requests=4)


CHROMIUM = Path("/usr/bin/chromium")
# No background traffic: chromium would otherwise try Google's update, sync and QUIC endpoints.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--metrics-recording-only"]


def test_the_upload_page_in_a_real_browser_shows_top3_genres_and_objects(service, shared_data, tmp_path):
    """Debian's chromium (installed by `make test`) driven by Playwright: upload a real poster, read the bars."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "chromium is missing: `make test` installs it (apt-get install chromium)"
    poster = sorted((shared_data / "multilabel-posters" / "Images").glob("*.jpg"))[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{service}/")
            page.set_input_files("#poster", str(poster))
            page.click("#submit")
            page.wait_for_selector("#result.shown", timeout=60_000)
            bars = page.locator("#top3 .row")
            assert bars.count() == 3, page.content()
            shown = [bars.nth(i).get_attribute("data-genre") for i in range(3)]
            expected = post(f"{service}/v1/predict", files=poster_file(poster.read_bytes())).json()
            assert shown == [t["genre"] for t in expected["top3"]]
            assert page.locator("#objects li").count() >= 1
            assert page.locator("#preview").get_attribute("src").startswith("blob:")
            page.screenshot(path=str(tmp_path / "upload.png"))
            # A bad file shows the service's 4xx message, and the page stays usable.
            bad = tmp_path / "notes.jpg"
            bad.write_text("not a poster")
            page.set_input_files("#poster", str(bad))
            page.click("#submit")
            page.wait_for_function("document.getElementById('error').textContent.startsWith('422')")
        finally:
            browser.close()


def test_the_services_own_metrics_reach_prometheus(service):
    """After real traffic, Ray's metrics endpoint on this node exports the project's counters and histograms."""
    import time

    import ray

    for i in range(4):
        post(f"{service}/v1/predict", files=poster_file(noisy_jpeg_bytes(100 + i)))
    post(f"{service}/v1/predict", files=poster_file(b"not an image"))
    port = ray._private.worker._global_node.metrics_export_port
    wanted = ["ray_posterfusion_requests_total", "ray_posterfusion_batch_size_bucket",
              "ray_posterfusion_request_latency_ms_bucket", "ray_posterfusion_rejected_posters_total"]
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(3)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing
    assert 'status="422"' in text and 'status="200"' in text


def multipart(parts: list[tuple[str, bytes, str | None, str | None]], boundary: str = "fz0") -> bytes:
    """Encode (name, payload, filename, content type) parts by hand, so the fuzz can send what httpx would not."""
    out = b""
    for name, payload, filename, content_type in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if content_type:
            out += f"Content-Type: {content_type}\r\n".encode()
        out += b"\r\n" + payload + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def fuzz_cases():
    """Hypothesis strategy: a route and a multipart body of posters (good, broken, foreign) and metadata."""
    from hypothesis import strategies as st

    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                               lambda children: st.lists(children, max_size=4)
                               | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=12)
    fields = st.sampled_from(["year", "runtime", "imdb_score", "num_votes", "budget", "gross", "popularity",
                              "content_rating", "language", "country", "genre"])
    metadata = st.one_of(
        st.dictionaries(fields, json_values | st.integers(min_value=-10**320, max_value=10**320), max_size=5)
        .map(lambda d: json.dumps(d).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64),
        st.sampled_from([b"[" * 3000, b'{"year": ' + b"9" * 5000 + b"}", b'{"budget": NaN}', b"\xff\xfe"]))
    payloads = st.one_of(
        st.sampled_from([jpeg_bytes(), noisy_jpeg_bytes(5), noisy_jpeg_bytes(6)[:700], png_header_bomb(), gif_bytes(),
                         b"", b"\x89PNG\r\n\x1a\n"]),
        st.binary(max_size=256))
    content_types = st.sampled_from(["image/jpeg", "image/png", "image/webp", "text/plain",
                                     "application/octet-stream", "image/jpeg; charset=x", None])
    part = st.one_of(
        st.tuples(st.sampled_from(["poster", "posters"]), payloads, st.sampled_from(["p.jpg", None]), content_types),
        st.tuples(st.just("metadata"), metadata, st.sampled_from([None, "m.json"]), st.sampled_from([None,
                                                                                                      "text/plain"])),
        st.tuples(st.text(max_size=8).filter(lambda t: '"' not in t and "\r" not in t and "\n" not in t),
                  st.binary(max_size=32), st.none(), st.none()))
    route = st.sampled_from(["/v1/predict", "/v1/predict/batch"])
    # most bodies are well-formed multipart with a poster part first, so the fuzz reaches past the parser
    poster = st.tuples(st.sampled_from(["poster", "posters"]), payloads, st.just("p.jpg"),
                       st.sampled_from(["image/jpeg", "image/png", "application/octet-stream"]))
    parts = st.one_of(st.lists(part, max_size=4),
                      st.tuples(poster, st.lists(part, max_size=3)).map(lambda t: [t[0], *t[1]]))
    return st.tuples(route, parts, st.sampled_from(["fz0", "fz0", "fz0", "other"]))


def test_fuzzed_requests_never_get_a_5xx_and_the_service_keeps_serving(service, capsys):
    """Hypothesis-generated multipart requests (bounded count, derandomized) against the running service."""
    from collections import Counter

    from hypothesis import HealthCheck, given, settings

    statuses: Counter[int] = Counter()

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(fuzz_cases())
    def fuzz(case):
        route, parts, boundary = case
        response = httpx.post(f"{service}{route}", content=multipart(parts), timeout=60,
                              headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        statuses[response.status_code] += 1
        assert response.status_code < 500 or response.status_code == 503, (route, parts, response.text)
        assert "error" in response.json() or response.status_code == 200

    fuzz()
    with capsys.disabled():
        print(f"\nfuzz: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}, "
              f"5xx: {sum(n for code, n in statuses.items() if code >= 500 and code != 503)}")
    assert sum(statuses.values()) == 200 and 200 in statuses and len(statuses) > 3
    assert post(f"{service}/v1/predict", files=poster_file(jpeg_bytes())).status_code == 200
