"""Serving throughput and latency: the same load against the service with batching and with max_batch_size=1.

Starts the app on 127.0.0.1 (a local Ray, or ``--address``), then for each batch size sends
``--requests`` posters (real posters from ../shared, cycled) from ``--concurrency`` clients
over HTTP, and prints requests/s, p50/p90/p99 latency, the batch sizes the replica formed,
and the ratios. One model replica in both runs, so only batching differs. Every HTTP figure is
taken twice: through Serve's HTTP proxy (the service's URL) and straight to the replica's own
port (Serve's direct ingress, which this benchmark switches on for the Ray it starts; the proxy
keeps serving). Then, at low load
(one client, one request at a time, the first batch size's settings), the serving overhead:
end-to-end latency minus the model replica's own time for the batch (``model_ms`` in each
answer) — HTTP, validation, the hops and the batch wait — taken with two clients in turn: a
plain sequential ``httpx.Client`` (what a caller making one request at a time uses: the
headline figure) and the ``httpx.AsyncClient`` of the load runs (its event loop adds its own
time to every request), for the service as deployed (the
model in the ingress replica) and, side by side, with the model in a deployment of its own
(``model_in_ingress=False``: one more hop per poster). Last, the floor without Serve: the same
client and the ingress's own parsing in a bare FastAPI app under uvicorn, so the part of the
overhead that Serve's proxy and hop add stands beside the part HTTP and parsing cost anyway.

    python benchmarks/serve_load.py --model runs/demo/model
    python benchmarks/serve_load.py --model M --requests 400 --concurrency 32 --batch-sizes 1 4 16

``--timeline`` measures autoscaling instead: the service as an operator runs it (its autoscaling
settings, or ``--upscale-delay-s``/``--downscale-delay-s``/``--look-back-s``), clients added
step by step (``--ramp 1 4 16 32``, ``--step-s`` each), then none, until Serve is back at
``min_replicas`` (at most ``--cooldown-s``); every ``--interval-s`` a row: time, clients, the
replicas Serve counts running and starting (``serve.status()``), requests/s, p50 and p99 of the
requests answered in that interval, and the failed ones.

    python benchmarks/serve_load.py --model M --timeline --max-replicas 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections import Counter
from pathlib import Path

SHARED_POSTERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "multilabel-posters" / "Images"


async def load(url: str, posters: list[bytes], requests: int, concurrency: int
               ) -> tuple[list[float], Counter, int, list[float]]:
    """(latencies of successful requests in s, batch sizes seen, failed requests, model seconds per request)."""
    import httpx

    gate, latencies, sizes, failed, model = asyncio.Semaphore(concurrency), [], Counter(), 0, []

    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int) -> None:
            nonlocal failed
            async with gate:
                started = time.perf_counter()
                response = await client.post(f"{url}/v1/predict",
                                             files={"poster": ("p.jpg", posters[i % len(posters)], "image/jpeg")})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                    sizes[response.json()["batch_size"]] += 1
                    model.append(response.json()["model_ms"] / 1000)
                else:
                    failed += 1

        await asyncio.gather(*(one(i) for i in range(requests)))
    return latencies, sizes, failed, model


async def handle_load(posters: list[bytes], requests: int, concurrency: int, in_ingress: bool
                      ) -> tuple[float, Counter]:
    """(requests/s, batch sizes) of the model replica alone: Serve handle calls, no HTTP proxy, no parsing."""
    from ray import serve

    if in_ingress:
        call = serve.get_deployment_handle("Api", app_name="posterfusion").score
    else:
        call = serve.get_deployment_handle("PosterModel", app_name="posterfusion").predict
    gate, sizes = asyncio.Semaphore(concurrency), Counter()

    async def one(i: int) -> None:
        async with gate:
            sizes[(await call.remote(posters[i % len(posters)], None))["batch_size"]] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return requests / (time.perf_counter() - started), sizes


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def healthz_latencies(url: str, requests: int) -> list[float]:
    """Seconds of each of ``requests`` sequential ``GET /healthz`` on one kept-alive connection."""
    import httpx

    latencies = []
    with httpx.Client(timeout=60) as client:
        for _ in range(requests):
            started = time.perf_counter()
            client.get(f"{url}/healthz").raise_for_status()
            latencies.append(time.perf_counter() - started)
    return latencies


def sequential(url: str, posters: list[bytes], requests: int) -> tuple[list[float], list[float]]:
    """(latencies in s, model seconds) of ``requests`` posters sent one after another on one connection."""
    import httpx

    latencies, model = [], []
    with httpx.Client(timeout=300) as client:
        for i in range(requests):
            started = time.perf_counter()
            response = client.post(f"{url}/v1/predict", files={"poster": ("p.jpg", posters[i % len(posters)],
                                                                          "image/jpeg")})
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            model.append(response.json()["model_ms"] / 1000)
    return latencies, model


def low_load(url: str, posters: list[bytes], requests: int) -> dict:
    """One client, one request at a time: end-to-end latency and what of it is not the model's own time.

    Taken with a sequential ``httpx.Client`` (the headline) and then with the load runs'
    ``httpx.AsyncClient`` (``async_`` keys). Also ``GET /healthz`` (no body, no model: the route
    answers from the replica) — the floor any request pays for HTTP, Serve's proxy and the
    hop(s) to the replica on this machine.
    """
    ends, model = sequential(url, posters, requests)
    async_ends, _, _, async_model = asyncio.run(load(url, posters, requests, 1))
    overhead = [e - m for e, m in zip(ends, model, strict=True)]
    async_overhead = [e - m for e, m in zip(async_ends, async_model, strict=True)]
    health = healthz_latencies(url, requests)
    return {"p50": percentile(ends, 50) * 1000, "model_p50": percentile(model, 50) * 1000,
            "overhead_p50": percentile(overhead, 50) * 1000, "overhead_p90": percentile(overhead, 90) * 1000,
            "async_overhead_p50": percentile(async_overhead, 50) * 1000,
            "healthz_p50": percentile(health, 50) * 1000, "requests": len(ends)}


def plain_floor(model: Path, posters: list[bytes], requests: int, port: int) -> dict:
    """The same client against the same parsing without Ray Serve: what HTTP itself costs here.

    A bare FastAPI app under uvicorn (in a thread of this process, on loopback) that does the
    ingress's own work on a poster — ``read_form`` under its limits, the part checks, the
    metadata field, a ``PredictResponse`` of the real shape (a model's answer, canned) — but no
    proxy, no replica hop and no model. Serving overhead minus this is what Serve adds.
    """
    import threading

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from posterfusion.models.predictor import Predictor
    from posterfusion.serving.app import ServeConfig
    from posterfusion.serving.requests import check_poster_part, parse_metadata, read_form, read_json_field
    from posterfusion.serving.schemas import PredictResponse

    config = ServeConfig(model=model)
    predictor = Predictor(model, detect=False)
    scored = predictor.score(posters[:1], [None], objects=[None] if predictor.model.uses_objects else None)
    answer = predictor.prediction(scored, 0)
    canned = {"model_version": predictor.version, "probabilities": answer.probabilities,
              "top3": [{"genre": g, "probability": q} for g, q in answer.top3], "genres": answer.genres,
              "objects": [], "detections": [], "batch_size": 1, "model_ms": 0.0}

    async def healthz(request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model_version": predictor.version})

    async def predict(request) -> JSONResponse:
        form = await read_form(request, config)
        part = form.get("poster")
        check_poster_part(part, config.max_upload_bytes, "poster")
        assert await part.read()
        parse_metadata(await read_json_field(form.get("metadata"), "metadata", config.max_metadata_bytes))
        return JSONResponse(PredictResponse.model_validate(canned).model_dump(mode="json"))

    app = FastAPI()  # plain routes: this module's postponed annotations would hide Request from FastAPI
    app.router.add_route("/healthz", healthz, methods=["GET"])
    app.router.add_route("/v1/predict", predict, methods=["POST"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}"
        ends, _ = sequential(url, posters, requests)
        async_ends, _, _, _ = asyncio.run(load(url, posters, requests, 1))
        health = healthz_latencies(url, requests)
    finally:
        server.should_exit = True
        thread.join()
    return {"p50": percentile(ends, 50) * 1000, "async_p50": percentile(async_ends, 50) * 1000,
            "healthz_p50": percentile(health, 50) * 1000}


def deploy(model: Path, batch_size: int, posters: list[bytes], args, in_ingress: bool = True) -> tuple[str, str]:
    """(the proxy's URL, the ingress replica's own URL under direct ingress)."""
    import httpx

    from posterfusion.serving.app import ServeConfig, direct_urls, start_service

    wait = {} if args.wait_ms is None else {"batch_wait_timeout_s": args.wait_ms / 1000}
    config = ServeConfig(model=model.resolve(), max_batch_size=batch_size, **wait, min_replicas=1, max_replicas=1,
                         max_ongoing_requests=max(16, 2 * batch_size), model_in_ingress=in_ingress,
                         max_queued_requests=10_000, replica_cpus=args.replica_cpus,
                         replica_gpus=1.0 if args.device == "cuda" else 0.0)
    url = start_service(config, port=args.port)
    replicas = direct_urls()
    if len(replicas) != 1:
        raise RuntimeError(f"expected one ingress replica answering directly, found {replicas}: does this Ray run "
                           "Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1 where it started)?")
    for poster in posters[:4]:  # warm-up: first calls pay for lazy initialisation
        for target in (url, replicas[0]):
            httpx.post(f"{target}/v1/predict", files={"poster": ("p.jpg", poster, "image/jpeg")}, timeout=300)
    return url, replicas[0]


def split_low_load(model: Path, batch_size: int, posters: list[bytes], args) -> dict:
    """The low-load figures with the model in a deployment of its own (ingress → model: one more hop)."""
    from ray import serve

    url, direct = deploy(model, batch_size, posters, args, in_ingress=False)
    low = {"proxy": low_load(url, posters, args.low_load_requests),
           "direct": low_load(direct, posters, args.low_load_requests)}
    serve.delete("posterfusion")
    return low


def run(model: Path, batch_size: int, posters: list[bytes], args, measure_low_load: bool = False) -> dict:
    """One batch size: the same load through Serve's proxy and straight to the replica, then handle calls."""
    from ray import serve

    url, direct = deploy(model, batch_size, posters, args)
    out = {"batch": batch_size}
    for path, target in (("proxy", url), ("direct", direct)):
        started = time.perf_counter()
        latencies, sizes, failed, _ = asyncio.run(load(target, posters, args.requests, args.concurrency))
        seconds = time.perf_counter() - started
        out[path] = {"rps": len(latencies) / seconds, "p50": percentile(latencies, 50) * 1000,
                     "p90": percentile(latencies, 90) * 1000, "p99": percentile(latencies, 99) * 1000,
                     "failed": failed, "sizes": dict(sorted(sizes.items())), "seconds": seconds}
        if measure_low_load:
            out[path]["low"] = low_load(target, posters, args.low_load_requests)
    replica_rps, replica_sizes = asyncio.run(handle_load(posters, args.requests, args.concurrency, in_ingress=True))
    serve.delete("posterfusion")
    return out | {"replica_rps": replica_rps, "replica_sizes": dict(sorted(replica_sizes.items()))}


PATHS = {"proxy": "through Serve's HTTP proxy", "direct": "straight to the replica (Serve's direct ingress)"}


def report(results: list[dict], split: dict, plain: dict, args, cluster) -> None:
    print(f"bundle {args.model}; {args.requests} requests, {args.concurrency} concurrent, real posters; "
          f"1 replica (ingress + model) × {args.replica_cpus} CPU; Ray: {cluster.cpus:g} CPU, {cluster.gpus:g} GPU")
    for path, what in PATHS.items():
        print(f"HTTP {what}:")
        print(f"{'max_batch_size':>14}{'req/s':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'failed':>8}  "
              "batch sizes formed")
        for r in results:
            h = r[path]
            print(f"{r['batch']:>14}{h['rps']:>8.1f}{h['p50']:>9.0f}{h['p90']:>9.0f}{h['p99']:>9.0f}{h['failed']:>8}  "
                  f"{h['sizes']}")
    print(f"the model replica alone (Serve handle calls, {args.concurrency} concurrent, no HTTP):")
    for r in results:
        print(f"{r['batch']:>14}{r['replica_rps']:>8.1f}  batch sizes formed {r['replica_sizes']}")
    base = next((r for r in results if r["batch"] == 1), None)
    for r in results:
        if base is not None and r is not base:
            gains = ", ".join(f"{r[p]['rps'] / base[p]['rps']:.2f}x over HTTP {p} "
                              f"(p99 {r[p]['p99'] / base[p]['p99']:.2f}x)" for p in PATHS)
            print(f"batching gain, max_batch_size {r['batch']} vs 1: throughput {gains}, "
                  f"{r['replica_rps'] / base['replica_rps']:.2f}x at the replica alone")
    layouts = (("model in the ingress replica", {p: results[0][p]["low"] for p in PATHS}),
               ("model in its own deployment", split))
    for name, lows in layouts:
        for path, low in lows.items():
            print(f"low load, {name}, {path} (1 client, {low['requests']} requests, max_batch_size "
                  f"{results[0]['batch']}): end-to-end p50 {low['p50']:.1f} ms, model p50 {low['model_p50']:.1f} ms, "
                  f"serving overhead p50 {low['overhead_p50']:.1f} ms (p90 {low['overhead_p90']:.1f} ms; "
                  f"{low['async_overhead_p50']:.1f} ms with the asyncio client); "
                  f"GET /healthz p50 {low['healthz_p50']:.1f} ms")
    print(f"the same clients and parsing without Ray Serve (bare FastAPI under uvicorn, no model): poster p50 "
          f"{plain['p50']:.1f} ms ({plain['async_p50']:.1f} ms with the asyncio client), "
          f"GET /healthz p50 {plain['healthz_p50']:.1f} ms")


def replica_counts(name: str = "posterfusion") -> tuple[int, int]:
    """The ingress (model) replicas Serve counts as RUNNING, and those on their way (starting, updating)."""
    from ray import serve

    states = serve.status().applications[name].deployments["Api"].replica_states
    return states.get("RUNNING", 0), sum(states.get(s, 0) for s in ("STARTING", "UPDATING", "RECOVERING"))


def timeline_service(model: Path, posters: list[bytes], args):
    """The service with the operator's autoscaling settings (or the flags'); its URL and config."""
    import httpx

    from posterfusion.serving.app import ServeConfig, start_service

    given = {"upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s,
             "autoscaling_look_back_s": args.look_back_s}
    config = ServeConfig(model=model.resolve(), min_replicas=1, max_replicas=args.max_replicas,
                         replica_cpus=args.replica_cpus, replica_gpus=1.0 if args.device == "cuda" else 0.0,
                         max_queued_requests=10_000, **{k: v for k, v in given.items() if v is not None})
    url = start_service(config, port=args.port)
    for poster in posters[:4]:  # warm-up: first calls pay for lazy initialisation
        httpx.post(f"{url}/v1/predict", files={"poster": ("p.jpg", poster, "image/jpeg")}, timeout=300)
    return url, config


async def ramp(url: str, posters: list[bytes], args, min_replicas: int) -> list[dict]:
    """Clients step by step, then none until Serve is back at ``min_replicas``; a row per interval."""
    import httpx

    answered: list[tuple[float, float, bool]] = []  # (when, latency s, ok)
    clients: list[asyncio.Task] = []
    rows: list[dict] = []
    started = time.perf_counter()

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=max(args.ramp))) as client:
        async def one_client(i: int) -> None:
            for n in itertools.count(i, max(args.ramp)):
                sent = time.perf_counter()
                try:
                    response = await client.post(f"{url}/v1/predict", files={"poster": (
                        "p.jpg", posters[n % len(posters)], "image/jpeg")})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                answered.append((time.perf_counter(), time.perf_counter() - sent, ok))

        async def sample() -> None:
            while True:
                await asyncio.sleep(args.interval_s)
                now = time.perf_counter()
                window = [a for a in answered if a[0] > now - args.interval_s]
                rows.append(interval_row(now - started, len(clients), await asyncio.to_thread(replica_counts),
                                         window, args.interval_s))

        sampler = asyncio.create_task(sample())
        for level in args.ramp:
            clients += [asyncio.create_task(one_client(i)) for i in range(len(clients), level)]
            await asyncio.sleep(args.step_s)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        clients.clear()
        stopped = time.perf_counter()
        while time.perf_counter() - stopped < args.cooldown_s and not (
                rows and rows[-1]["clients"] == 0 and rows[-1]["replicas"] + rows[-1]["starting"] <= min_replicas):
            await asyncio.sleep(args.interval_s)
        sampler.cancel()
    return rows


def interval_row(t: float, clients: int, replicas: tuple[int, int], window: list[tuple[float, float, bool]],
                 interval_s: float) -> dict:
    latencies = [latency for _, latency, ok in window if ok]
    return {"t": t, "clients": clients, "replicas": replicas[0], "starting": replicas[1],
            "rps": len(latencies) / interval_s,
            "p50": percentile(latencies, 50) * 1000 if latencies else float("nan"),
            "p99": percentile(latencies, 99) * 1000 if latencies else float("nan"),
            "failed": sum(1 for _, _, ok in window if not ok)}


def report_timeline(rows: list[dict], config, args, cluster) -> None:
    print(f"autoscaling timeline: bundle {args.model}; {config.min_replicas}..{config.max_replicas} replicas × "
          f"{config.replica_cpus} CPU, target_ongoing_requests {config.target_ongoing_requests:g}, max_batch_size "
          f"{config.max_batch_size}; upscale_delay_s {config.upscale_delay_s:g}, downscale_delay_s "
          f"{config.downscale_delay_s:g}, autoscaling_look_back_s {config.autoscaling_look_back_s:g}; clients "
          f"{args.ramp} for {args.step_s:g} s each, then none; Ray: {cluster.cpus:g} CPU, {cluster.gpus:g} GPU")
    print(f"{'t s':>7}{'clients':>9}{'running':>9}{'starting':>10}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}")
    for r in rows:
        print(f"{r['t']:>7.1f}{r['clients']:>9}{r['replicas']:>9}{r['starting']:>10}{r['rps']:>8.1f}{r['p50']:>9.0f}"
              f"{r['p99']:>9.0f}{r['failed']:>8}")
    changes = [r for i, r in enumerate(rows) if i and r["replicas"] != rows[i - 1]["replicas"]]
    print("running replicas: " + (", ".join(f"{r['replicas']} at {r['t']:.0f} s ({r['clients']} clients)"
                                            for r in changes) or "no change"))


def timeline(posters: list[bytes], args) -> None:
    from ray import serve

    from posterfusion.cluster import ClusterConfig, ray_cluster

    with ray_cluster(ClusterConfig(address=args.address)) as cluster:
        url, config = timeline_service(args.model, posters, args)
        rows = asyncio.run(ramp(url, posters, args, config.min_replicas))
        serve.shutdown()
    report_timeline(rows, config, args, cluster)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--posters", type=Path, default=SHARED_POSTERS)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--wait-ms", type=float, default=None, help="batch wait (default: the service's own)")
    parser.add_argument("--low-load-requests", type=int, default=50)
    parser.add_argument("--replica-cpus", type=float, default=0.5)
    parser.add_argument("--device", default="cpu", help="cuda: the model replica takes one GPU")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--address", default=None, help="a cluster started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1")
    parser.add_argument("--timeline", action="store_true", help="the autoscaling timeline under a ramp instead")
    parser.add_argument("--max-replicas", type=int, default=2, help="--timeline: the autoscaling ceiling")
    parser.add_argument("--ramp", type=int, nargs="+", default=[1, 4, 16, 32], help="--timeline: clients per step")
    parser.add_argument("--step-s", type=float, default=30.0, help="--timeline: seconds per step")
    parser.add_argument("--cooldown-s", type=float, default=180.0,
                        help="--timeline: most seconds to watch after the load stops")
    parser.add_argument("--interval-s", type=float, default=2.0, help="--timeline: seconds per row")
    parser.add_argument("--upscale-delay-s", type=float, default=None, help="--timeline (default: the service's)")
    parser.add_argument("--downscale-delay-s", type=float, default=None, help="--timeline (default: the service's)")
    parser.add_argument("--look-back-s", type=float, default=None, help="--timeline (default: the service's)")
    args = parser.parse_args()
    from posterfusion.cluster.multinode import free_port

    args.port = args.port or free_port()

    from posterfusion.cluster import ClusterConfig, prepare_environment, ray_cluster
    from posterfusion.serving.app import enable_direct_ingress

    prepare_environment()
    enable_direct_ingress()  # the local Ray below: the proxy keeps its URL, each replica gets one of its own
    posters = [p.read_bytes() for p in sorted(args.posters.glob("*.jpg"))[:64]]
    if args.timeline:
        return timeline(posters, args)
    with ray_cluster(ClusterConfig(address=args.address)) as cluster:
        results = [run(args.model, b, posters, args, measure_low_load=i == 0) for i, b in enumerate(args.batch_sizes)]
        split = split_low_load(args.model, args.batch_sizes[0], posters, args)
        from ray import serve

        serve.shutdown()
    plain = plain_floor(args.model, posters, args.low_load_requests, free_port())
    report(results, split, plain, args, cluster)


if __name__ == "__main__":
    main()
