"""A new model reaches a running service with no failed request; a bundle that cannot load never replaces one.

One service for the module (in the test session's Ray) serves bundle A, the small fused bundle;
B is A with other thresholds (another ``model_version``, the same network: cheap). While clients
keep requests in flight, ``switch_model`` moves the service to B (in this process, as
``posterfusion deploy`` does), then the real ``posterfusion deploy`` command attaches to the
session's Ray and rolls it back to A. Two broken copies of A (no weights; a config whose hidden
width is not the weights') are refused with exit status 2 before any replica switches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from steady_load import SteadyLoad

from posterfusion.cluster.multinode import free_port
from posterfusion.models.bundle import model_version
from posterfusion.serving.app import ServeConfig, check_bundle, running_settings, start_service, switch_model

APP = "rollout"


def deploy_command(*args: str, address: str | None) -> subprocess.CompletedProcess:
    env = os.environ | {"RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "posterfusion", "deploy", "--name", APP, *args]
    command += ["--address", address] if address else []
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def replica_ids(name: str) -> set[str]:
    """Every replica Serve holds for app ``name`` (starting, running or stopping)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    app = ServeInstanceDetails(**_get_global_client().get_serve_details()).applications[name]
    return {replica.replica_id for deployment in app.deployments.values() for replica in deployment.replicas}


def copy_bundle(source: Path, out: Path, change) -> Path:
    shutil.copytree(source, out)
    change(out)
    return out


def other_thresholds(bundle: Path) -> None:
    path = bundle / "thresholds.json"
    path.write_text(json.dumps({genre: min(0.9, t + 0.05) for genre, t in json.loads(path.read_text()).items()}))


def no_weights(bundle: Path) -> None:
    (bundle / "model.safetensors").unlink()


def wider_hidden_layer(bundle: Path) -> None:
    path = bundle / "config.json"
    config = json.loads(path.read_text())
    config["model"]["hidden"] *= 2
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def bundles(small_fused, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rollout")
    a = small_fused / "bundle"
    return {"a": a, "b": copy_bundle(a, root / "b", other_thresholds),
            "no weights": copy_bundle(a, root / "no-weights", no_weights),
            "wider hidden layer": copy_bundle(a, root / "wider", wider_hidden_layer)}


@pytest.fixture(scope="module")
def service(bundles, ray_session):
    """Bundle A behind its own route; one model replica (a switch surges to two for a moment)."""
    from ray import serve

    config = ServeConfig(model=bundles["a"], max_batch_size=4, batch_wait_timeout_s=0.01, min_replicas=1,
                         max_replicas=1, replica_cpus=0.25, max_queued_requests=256)
    url = start_service(config, port=free_port(), name=APP, route_prefix=f"/{APP}")
    yield url
    serve.shutdown()


def test_deploy_without_the_services_ray_address_is_a_user_error(tmp_path):
    run = deploy_command("--model", str(tmp_path), address=None)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "posterfusion: error: deploy switches a running service: pass --address (posterfusion serve prints it) "
        "or set RAY_ADDRESS"]


def serving(url: str) -> str:
    return httpx.get(f"{url}/healthz", timeout=60).json()["model_version"]


def switch_under_load(url: str, switch, old: str, new: str, what: str) -> None:
    """``switch()`` while four clients keep requests in flight: no answer fails, each carries ``old``'s or ``new``'s
    version, and every request sent once ``switch()`` returned is answered by ``new``."""
    with SteadyLoad(url, clients=4) as load:
        load.wait_for(20)
        started = time.monotonic()
        switch()
        switched = time.monotonic()
        load.wait_for(len(load.answers) + 20)
    answers = load.answers
    failed = [x for x in answers if x.status != 200]
    during = [x for x in answers if x.sent < switched and x.done > started]
    before = {x.version for x in answers if x.sent < started}
    after = {x.version for x in answers if x.sent > switched}
    print(f"\n{what} {old} -> {new}: {len(answers)} requests, {len(during)} of them in flight during the switch "
          f"({switched - started:.1f} s), {len(failed)} not 2xx; versions answered to requests sent before it "
          f"{sorted(before)}, after it {sorted(after)}")
    assert not failed, failed[:5]
    assert {x.version for x in answers} <= {old, new} and before == {old}
    assert during, "no request was in flight while the model switched"
    assert after == {new}


def assert_settings_kept(before: ServeConfig, now: ServeConfig, model: Path) -> None:
    assert str(now.model) == str(model)
    assert now.model_dump(exclude={"model"}) == before.model_dump(exclude={"model"})


@pytest.mark.slow
def test_a_new_model_reaches_the_running_service_with_no_failed_request(service, bundles):
    a, b = model_version(bundles["a"]), model_version(bundles["b"])
    assert serving(service) == a
    settings, _ = running_settings(APP)

    def switch() -> None:  # what posterfusion deploy does, in this process
        check_bundle(bundles["b"])
        switch_model(bundles["b"], name=APP)

    switch_under_load(service, switch, old=a, new=b, what="switch")
    assert_settings_kept(settings, now=running_settings(APP)[0], model=bundles["b"])


@pytest.mark.slow
def test_the_deploy_command_rolls_the_service_back_the_same_way(service, bundles, ray_session):
    a, b = model_version(bundles["a"]), model_version(bundles["b"])
    if serving(service) != b:  # run alone, B is not in service yet
        switch_model(bundles["b"], name=APP)
    settings, _ = running_settings(APP)

    def switch() -> None:
        run = deploy_command("--model", str(bundles["a"]), address=ray_session.address)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip().endswith(f"(model_version {a}); other settings kept"), run.stdout

    switch_under_load(service, switch, old=b, new=a, what="rollback by posterfusion deploy")
    assert_settings_kept(settings, now=running_settings(APP)[0], model=bundles["a"])


@pytest.mark.slow
@pytest.mark.parametrize("broken, says", [("no weights", "missing model.safetensors"),
                                          ("wider hidden layer", "size mismatch")])
def test_a_bundle_that_cannot_load_is_refused_before_any_replica_switches(service, bundles, ray_session, broken,
                                                                         says):
    version = serving(service)
    before = replica_ids(APP)
    run = deploy_command("--model", str(bundles[broken]), address=ray_session.address)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("posterfusion: error: refused") and says in lines[0], run.stderr
    assert replica_ids(APP) == before
    assert serving(service) == version
