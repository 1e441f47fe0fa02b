"""Autoscaling, as Serve itself counts it: load past one replica's target adds a replica, its end removes it.

The service's own settings make it quick (``upscale_delay_s``, ``downscale_delay_s``,
``autoscaling_look_back_s`` are operator settings of ``ServeConfig``, short here): one poster per
model call and a target of one request per replica, so eight clients ask for more replicas than
the two allowed. What is asserted is Serve's replica count (``serve.status()``), not a guess from
latencies. Without Ray: those settings, and the rollout surge, reach the deployment that scores.
"""

from __future__ import annotations

import time

import pytest
from steady_load import SteadyLoad

from posterfusion.cluster.multinode import free_port
from posterfusion.serving.app import ServeConfig, start_service

pytestmark = pytest.mark.slow

APP = "autoscale"


@pytest.fixture(scope="module")
def service(small_fused, ray_session):
    from ray import serve

    config = ServeConfig(model=small_fused / "bundle", max_batch_size=1, batch_wait_timeout_s=0, min_replicas=1,
                         max_replicas=2, target_ongoing_requests=1, max_ongoing_requests=4, max_queued_requests=256,
                         replica_cpus=0.25, upscale_delay_s=0.5, downscale_delay_s=2, autoscaling_look_back_s=1.5)
    url = start_service(config, port=free_port(), name=APP, route_prefix=f"/{APP}")
    yield url
    serve.shutdown()


def running_replicas() -> int:
    from ray import serve

    return serve.status().applications[APP].deployments["Api"].replica_states.get("RUNNING", 0)


def watch(timeline: list[tuple[float, int]], until: int, timeout_s: float) -> None:
    """Record Serve's running-replica count every 0.2 s until it is ``until``."""
    deadline = time.monotonic() + timeout_s
    while True:
        timeline.append((time.monotonic(), running_replicas()))
        if timeline[-1][1] == until:
            return
        assert time.monotonic() < deadline, f"no {until} running replicas after {timeout_s} s: {timeline[-5:]}"
        time.sleep(0.2)


@pytest.mark.slow
def test_load_past_one_replica_scales_to_two_and_back_to_one_by_serves_own_count(service):
    timeline: list[tuple[float, int]] = []
    watch(timeline, until=1, timeout_s=30)
    with SteadyLoad(service, clients=8) as load:
        load.wait_for(8)
        loaded = time.monotonic()
        watch(timeline, until=2, timeout_s=90)
        up = time.monotonic()
    stopped = time.monotonic()
    watch(timeline, until=1, timeout_s=90)
    down = time.monotonic()
    counts = [n for i, (_, n) in enumerate(timeline) if i == 0 or n != timeline[i - 1][1]]
    failed = [a for a in load.answers if a.status != 200]
    print(f"\nautoscaling: 2 replicas {up - loaded:.1f} s after the load began, 1 again {down - stopped:.1f} s after "
          f"it stopped; {len(load.answers)} requests, {len(failed)} not 2xx; running replicas {counts}")
    assert counts == [1, 2, 1]
    assert not failed, failed[:5]
