"""Serving throughput and latency: the same load against the service with batching and with max_batch_size=1.

Starts the app on 127.0.0.1 (a local Ray, or ``--address``), then for each batch size sends
``--requests`` posters (real posters from ../shared, cycled) from ``--concurrency`` clients
over HTTP, and prints requests/s, p50/p90/p99 latency, the batch sizes the replica formed,
and the ratios. One model replica in both runs, so only batching differs. Then, at low load
(one client, one request at a time, the first batch size's settings), the serving overhead:
end-to-end latency minus the model replica's own time for the batch (``model_ms`` in each
answer) — HTTP, validation, the hops and the batch wait — for the service as deployed (the
model in the ingress replica) and, side by side, with the model in a deployment of its own
(``model_in_ingress=False``: one more hop per poster).

    python benchmarks/serve_load.py --model runs/demo/model
    python benchmarks/serve_load.py --model M --requests 400 --concurrency 32 --batch-sizes 1 4 16
"""

from __future__ import annotations

import argparse
import asyncio
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


def low_load(url: str, posters: list[bytes], requests: int) -> dict:
    """One client, one request at a time: end-to-end latency and what of it is not the model's own time.

    Also ``GET /healthz`` (no body, no model: the route answers from the replica) — the floor any
    request pays for HTTP, Serve's proxy and the hop(s) to the replica on this machine.
    """
    import httpx

    ends, _, _, model = asyncio.run(load(url, posters, requests, 1))
    overhead = [e - m for e, m in zip(ends, model, strict=True)]
    health = []
    with httpx.Client(timeout=60) as client:
        for _ in range(requests):
            started = time.perf_counter()
            client.get(f"{url}/healthz").raise_for_status()
            health.append(time.perf_counter() - started)
    return {"p50": percentile(ends, 50) * 1000, "model_p50": percentile(model, 50) * 1000,
            "overhead_p50": percentile(overhead, 50) * 1000, "overhead_p90": percentile(overhead, 90) * 1000,
            "healthz_p50": percentile(health, 50) * 1000, "requests": len(ends)}


def deploy(model: Path, batch_size: int, posters: list[bytes], args, in_ingress: bool = True) -> str:
    import httpx

    from posterfusion.serving.app import ServeConfig, start_service

    wait = {} if args.wait_ms is None else {"batch_wait_timeout_s": args.wait_ms / 1000}
    config = ServeConfig(model=model.resolve(), max_batch_size=batch_size, **wait, min_replicas=1, max_replicas=1,
                         max_ongoing_requests=max(16, 2 * batch_size), model_in_ingress=in_ingress,
                         max_queued_requests=10_000, replica_cpus=args.replica_cpus,
                         replica_gpus=1.0 if args.device == "cuda" else 0.0)
    url = start_service(config, port=args.port)
    for poster in posters[:4]:  # warm-up: first calls pay for lazy initialisation
        httpx.post(f"{url}/v1/predict", files={"poster": ("p.jpg", poster, "image/jpeg")}, timeout=300)
    return url


def split_low_load(model: Path, batch_size: int, posters: list[bytes], args) -> dict:
    """The low-load figures with the model in a deployment of its own (proxy → ingress → model)."""
    from ray import serve

    url = deploy(model, batch_size, posters, args, in_ingress=False)
    low = low_load(url, posters, args.low_load_requests)
    serve.delete("posterfusion")
    return low


def run(model: Path, batch_size: int, posters: list[bytes], args, measure_low_load: bool = False) -> dict:
    from ray import serve

    url = deploy(model, batch_size, posters, args)
    started = time.perf_counter()
    latencies, sizes, failed, _ = asyncio.run(load(url, posters, args.requests, args.concurrency))
    seconds = time.perf_counter() - started
    replica_rps, replica_sizes = asyncio.run(handle_load(posters, args.requests, args.concurrency, in_ingress=True))
    low = low_load(url, posters, args.low_load_requests) if measure_low_load else None
    serve.delete("posterfusion")
    return {"batch": batch_size, "rps": len(latencies) / seconds, "p50": percentile(latencies, 50) * 1000,
            "p90": percentile(latencies, 90) * 1000, "p99": percentile(latencies, 99) * 1000,
            "failed": failed, "sizes": dict(sorted(sizes.items())), "seconds": seconds, "low": low,
            "replica_rps": replica_rps, "replica_sizes": dict(sorted(replica_sizes.items()))}


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
    parser.add_argument("--address", default=None)
    args = parser.parse_args()
    from posterfusion.cluster.multinode import free_port

    args.port = args.port or free_port()

    from posterfusion.cluster import ClusterConfig, prepare_environment, ray_cluster

    prepare_environment()
    posters = [p.read_bytes() for p in sorted(args.posters.glob("*.jpg"))[:64]]
    with ray_cluster(ClusterConfig(address=args.address)) as cluster:
        results = [run(args.model, b, posters, args, measure_low_load=i == 0) for i, b in enumerate(args.batch_sizes)]
        split = split_low_load(args.model, args.batch_sizes[0], posters, args)
        from ray import serve

        serve.shutdown()
    print(f"bundle {args.model}; {args.requests} requests, {args.concurrency} concurrent, real posters; "
          f"1 replica (ingress + model) × {args.replica_cpus} CPU; Ray: {cluster.cpus:g} CPU, {cluster.gpus:g} GPU")
    print(f"{'max_batch_size':>14}{'req/s':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'failed':>8}  batch sizes formed")
    for r in results:
        print(f"{r['batch']:>14}{r['rps']:>8.1f}{r['p50']:>9.0f}{r['p90']:>9.0f}{r['p99']:>9.0f}{r['failed']:>8}  "
              f"{r['sizes']}")
    print(f"the model replica alone (Serve handle calls, {args.concurrency} concurrent, no HTTP):")
    for r in results:
        print(f"{r['batch']:>14}{r['replica_rps']:>8.1f}  batch sizes formed {r['replica_sizes']}")
    base = next((r for r in results if r["batch"] == 1), None)
    for r in results:
        if base is not None and r is not base:
            print(f"batching gain, max_batch_size {r['batch']} vs 1: throughput {r['rps'] / base['rps']:.2f}x over "
                  f"HTTP (p50 {r['p50'] / base['p50']:.2f}x, p99 {r['p99'] / base['p99']:.2f}x), "
                  f"{r['replica_rps'] / base['replica_rps']:.2f}x at the replica alone")
    for name, low in (("model in the ingress replica", results[0]["low"]), ("model in its own deployment", split)):
        print(f"low load, {name} (1 client, {low['requests']} requests, max_batch_size {results[0]['batch']}): "
              f"end-to-end p50 {low['p50']:.1f} ms, model p50 {low['model_p50']:.1f} ms, serving overhead p50 "
              f"{low['overhead_p50']:.1f} ms (p90 {low['overhead_p90']:.1f} ms); GET /healthz p50 "
              f"{low['healthz_p50']:.1f} ms")


if __name__ == "__main__":
    main()
