"""What platform teams deploy (``cluster/``) is loaded and checked against the code it runs.

Every command in a manifest must parse with the real CLI, every serve config must validate
against Serve's schema and the app's typed args, and the KubeRay files must be exactly what
``cluster/kuberay/render.py`` makes of the shared cluster spec and ``serving/serve_config.yaml``.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from posterfusion.serving.app import ServeConfig

from support import REPO

CLUSTER = REPO / "cluster"


def _render():
    spec = importlib.util.spec_from_file_location("render", CLUSTER / "kuberay" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_cli_parses(command: str) -> None:
    """``posterfusion SUB --opt …`` is accepted by the real Typer app (parsed, not run)."""
    import typer

    from posterfusion.jobs.cli import app

    words = shlex.split(command)
    assert words[0] == "posterfusion", command
    group = typer.main.get_command(app)
    sub = group.get_command(None, words[1])
    assert sub is not None, f"no subcommand {words[1]!r}"
    sub.make_context(words[1], words[2:])


def entrypoint_commands(entrypoint: str) -> list[str]:
    return [part.strip() for part in entrypoint.split("&&")]


def test_the_kuberay_manifests_are_what_render_makes():
    render = _render()
    expected = {"rayjob-train.yaml": [render.rayjob_train()], "nightly-score.yaml": render.nightly_scoring(),
                "rayservice.yaml": [render.rayservice()]}
    for name, documents in expected.items():
        assert (CLUSTER / "kuberay" / name).read_text() == render.HEADER + render.dump(documents), \
            f"{name} drifted: run python cluster/kuberay/render.py"


def test_the_training_rayjob_runs_a_real_train_command_on_the_shared_cluster():
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-train.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"]
    for command in entrypoint_commands(job["spec"]["entrypoint"]):
        assert_cli_parses(command)
    spec = job["spec"]["rayClusterSpec"]
    assert spec == yaml.safe_load((CLUSTER / "kuberay" / "raycluster-spec.yaml").read_text())
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["cpu"]["minReplicas"] == 0 and groups["cpu"]["maxReplicas"] > 1  # autoscaling


def test_the_nightly_schedule_creates_a_scoring_rayjob():
    documents = list(yaml.safe_load_all((CLUSTER / "kuberay" / "nightly-score.yaml").read_text()))
    kinds = {d["kind"]: d for d in documents}
    assert {"CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= set(kinds)
    cron = kinds["CronJob"]["spec"]
    assert cron["schedule"] == "0 2 * * *" and cron["concurrencyPolicy"] == "Forbid"
    template = yaml.safe_load(kinds["ConfigMap"]["data"]["rayjob.yaml"])
    assert template["kind"] == "RayJob" and template["metadata"]["generateName"]
    commands = entrypoint_commands(template["spec"]["entrypoint"])
    assert [shlex.split(c)[1] for c in commands] == ["features", "score"]
    for command in commands:
        assert_cli_parses(command)
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    assert "create" in kinds["Role"]["rules"][0]["verbs"]


def _validate_serve(config: dict):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    for app in schema.applications:
        assert app.import_path == "posterfusion.serving.app:build_app"
        ServeConfig.model_validate(app.args)
    return schema


def test_the_rayservice_serves_the_projects_serve_config():
    service = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    _validate_serve(embedded)
    _validate_serve(local)
    assert embedded["applications"][0]["args"] | {"model": None} == local["applications"][0]["args"] | {"model": None}
    assert embedded["http_options"]["host"] == "0.0.0.0"  # in a pod; the local file stays on loopback
    assert local["http_options"]["host"] == "127.0.0.1"


def test_the_cluster_launcher_yaml_is_valid_for_ray_up():
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((CLUSTER / "launcher.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types and {"cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["max_workers"] > types["gpu_worker"]["min_workers"] == 0
    assert "--gpus all" in types["gpu_worker"]["docker"]["worker_run_options"]


def test_the_launched_cluster_requires_ray_token_auth_on_every_node():
    """Its dashboard and job API listen on 0.0.0.0: no node may start without the shared token."""
    config = yaml.safe_load((CLUSTER / "launcher.yaml").read_text())
    token = "/tmp/ray_auth_token"
    assert token in config["file_mounts"]
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token" in c and f"RAY_AUTH_TOKEN_PATH={token}" in c for c in starts)


def test_the_runtime_env_is_a_valid_ray_runtime_env_without_heavy_files():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert {".venv/", ".git/", "*.safetensors", "*.parquet"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.parametrize("line", [line for line in (CLUSTER / "Dockerfile").read_text().splitlines()
                                  if line.startswith("COPY ")])
def test_every_path_the_dockerfile_copies_exists(line):
    for source in line.split()[1:-1]:
        assert (REPO / source).exists(), source


def test_the_dockerfile_installs_the_package_with_the_extras_it_names():
    text = (CLUSTER / "Dockerfile").read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert 'pip install ".[tflite]"' in text and "tflite" in extras["project"]["optional-dependencies"]
    assert "RAY_USAGE_STATS_ENABLED=0" in text and "YOLO_OFFLINE=1" in text
