"""What platform teams deploy (``cluster/``) is loaded and checked against the code it runs.

Every command in a manifest must parse with the real CLI, every serve config must validate
against Serve's schema and the app's typed args, and the KubeRay files must be exactly what
``cluster/kuberay/render.py`` makes of the shared cluster spec, ``release.yaml`` and
``serving/serve_config.yaml``. Every rendered object must be one Kubernetes would accept under
``kubectl apply --validate=strict``: ray.io objects against KubeRay's CRDs, core objects and the
pod templates inside the ray.io ones against Kubernetes' own schemas (``kube_schemas``, offline).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import jsonschema
import pytest
import yaml
from kube_schemas import KUBERNETES_VERSION, close, core_errors, crd_errors, pod_template

from posterfusion.serving.app import ServeConfig

from netaudit import read_events
from support import REPO

CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
FILES = ("rayjob-train.yaml", "nightly-score.yaml", "nightly-score-cronjob.yaml", "rayservice.yaml")


def _render():
    spec = importlib.util.spec_from_file_location("render", KUBERAY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documents(name: str) -> list[dict]:
    """The objects of a committed manifest, as kubectl reads them."""
    return list(yaml.safe_load_all((KUBERAY / name).read_text()))


def by_kind(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in documents(name)}


def release() -> dict:
    return yaml.safe_load((KUBERAY / "release.yaml").read_text())


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


def option(command: str, name: str) -> str:
    words = shlex.split(command)
    return words[words.index(name) + 1]


def scoring_template() -> dict:
    """The RayJob the CronJob route creates each night (kept in its ConfigMap)."""
    return yaml.safe_load(by_kind("nightly-score-cronjob.yaml")["ConfigMap"]["data"]["rayjob.yaml"])


def test_the_kuberay_manifests_are_what_render_makes():
    render = _render()
    assert tuple(render.manifests()) == FILES
    for name, expected in render.manifests().items():
        assert (KUBERAY / name).read_text() == render.HEADER + render.dump(expected), \
            f"{name} drifted: run python cluster/kuberay/render.py"


def test_the_training_rayjob_writes_the_release_candidate_on_the_shared_cluster():
    job = by_kind("rayjob-train.yaml")["RayJob"]
    assert job["spec"]["shutdownAfterJobFinishes"]
    [command] = entrypoint_commands(job["spec"]["entrypoint"])
    assert option(command, "--out") == release()["candidate"]
    assert "--set model.backbone=densenet121 --set model.weights=imagenet" in command
    spec = job["spec"]["rayClusterSpec"]
    assert spec == yaml.safe_load((KUBERAY / "raycluster-spec.yaml").read_text())
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["cpu"]["minReplicas"] == 0 and groups["cpu"]["maxReplicas"] > 1  # autoscaling


def test_the_training_rayjobs_command_parses_with_the_real_cli():
    for command in entrypoint_commands(by_kind("rayjob-train.yaml")["RayJob"]["spec"]["entrypoint"]):
        assert_cli_parses(command)


def test_the_training_rayjobs_settings_resolve_with_its_recipe():
    """What ``posterfusion recipes --show`` makes of the job's recipe and ``--set``\\ s (a misspelt setting fails)."""
    from typer.testing import CliRunner

    from posterfusion.jobs.cli import app

    [command] = entrypoint_commands(by_kind("rayjob-train.yaml")["RayJob"]["spec"]["entrypoint"])
    words = shlex.split(command)
    sets = [word for flag, word in pairwise(words) if flag == "--set"]
    shown = CliRunner().invoke(app, ["recipes", "--show", option(command, "--recipe"),
                                     *[arg for s in sets for arg in ("--set", s)]])
    assert shown.exit_code == 0, shown.output
    assert sets and all(f"{s.split('.', 1)[1].replace('=', ': ')}\n" in shown.output for s in sets)


def assert_scores_nightly_with_the_released_bundle(spec: dict) -> None:
    commands = entrypoint_commands(spec["entrypoint"])
    assert [shlex.split(c)[1] for c in commands] == ["features", "score"]
    for command in commands:
        assert_cli_parses(command)
    assert option(commands[1], "--model") == release()["model"]
    assert spec["shutdownAfterJobFinishes"] and spec["activeDeadlineSeconds"] < 24 * 3600


def test_the_nightly_raycronjob_creates_a_scoring_rayjob_at_two_utc():
    cron = by_kind("nightly-score.yaml")["RayCronJob"]
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == ("0 2 * * *", "Etc/UTC")
    assert_scores_nightly_with_the_released_bundle(cron["spec"]["jobTemplate"])


def test_the_cronjob_route_creates_the_same_scoring_rayjob_for_older_operators():
    kinds = by_kind("nightly-score-cronjob.yaml")
    assert set(kinds) == {"CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"}
    cron = kinds["CronJob"]["spec"]
    assert (cron["schedule"], cron["timeZone"], cron["concurrencyPolicy"]) == ("0 2 * * *", "Etc/UTC", "Forbid")
    template = scoring_template()
    assert template["kind"] == "RayJob" and template["metadata"]["generateName"]
    assert template["spec"] == by_kind("nightly-score.yaml")["RayCronJob"]["spec"]["jobTemplate"]
    assert_scores_nightly_with_the_released_bundle(template["spec"])
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    assert "create" in kinds["Role"]["rules"][0]["verbs"]


def test_one_file_names_the_bundle_the_service_serves_and_the_nightly_job_scores():
    model = release()["model"]
    served = yaml.safe_load(by_kind("rayservice.yaml")["RayService"]["spec"]["serveConfigV2"])
    assert served["applications"][0]["args"]["model"] == model
    for spec in (by_kind("nightly-score.yaml")["RayCronJob"]["spec"]["jobTemplate"], scoring_template()["spec"]):
        assert option(entrypoint_commands(spec["entrypoint"])[1], "--model") == model
    assert "models/current" not in "".join((KUBERAY / name).read_text() for name in FILES)


@pytest.mark.parametrize("release_yaml, problem", [
    ("model: s3://posterfusion/models/a\ncandidate: s3://posterfusion/models/a/\n", "new version"),
    ("model: s3://posterfusion/models/current/../a\ncandidate: s3://posterfusion/models/b\n", "version URI"),
    ("model: s3://posterfusion/models/a\ncandidates: s3://posterfusion/models/b\n", "exactly the keys"),
], ids=["candidate-is-the-served-model", "not-a-version-uri", "misspelt-key"])
def test_render_refuses_a_release_that_is_not_two_distinct_bundle_versions(tmp_path, release_yaml, problem):
    render = _render()
    (tmp_path / "release.yaml").write_text(release_yaml)
    render.HERE = tmp_path
    with pytest.raises(ValueError, match=problem):
        render.release()


def ray_objects() -> list[dict]:
    return [d for name in FILES for d in documents(name) if d["apiVersion"].startswith("ray.io/")] \
        + [scoring_template()]


def cluster_of(document: dict) -> dict:
    spec = document["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec["jobTemplate"]["rayClusterSpec"]


def pod_specs(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def test_no_ray_pod_mounts_a_volume_and_every_ray_container_takes_the_s3_credentials():
    for document in ray_objects():
        for pod in pod_specs(cluster_of(document)):
            assert "volumes" not in pod, document["kind"]
            for container in pod["containers"]:
                assert "volumeMounts" not in container
                assert {"secretRef": {"name": "posterfusion-s3"}} in container["envFrom"]


def job_specs() -> list[dict]:
    """The RayJob specs: training, the RayCronJob's template and the CronJob route's template."""
    return [d["spec"].get("jobTemplate", d["spec"]) for d in ray_objects() if d["kind"] != "RayService"]


def test_every_location_a_job_reads_or_writes_is_in_object_storage():
    commands = [c for spec in job_specs() for c in entrypoint_commands(spec["entrypoint"])]
    assert len(commands) == 5  # train; features and score in each of the two nightly routes
    for command in commands:
        words = shlex.split(command)
        for flag in ("--catalogue", "--features", "--out", "--model", "--detector"):
            if flag in words:
                assert option(command, flag).startswith("s3://posterfusion/"), (flag, command)


def test_score_now_prints_one_scoring_rayjob_for_kubectl_create(capsys):
    _render().main(["--score-now"])
    [job] = yaml.safe_load_all(capsys.readouterr().out)
    assert job == scoring_template() and crd_errors(job) == []


# --- strict schema validation: every object KubeRay or Kubernetes would be handed ---------------------------

@dataclass(frozen=True)
class Target:
    """One object to validate: where it comes from, against what (``kuberay`` CRD or ``kubernetes``)."""

    label: str
    schema: str
    document: dict

    @property
    def kind(self) -> str:
        return self.document["kind"]


def ray_targets(label: str, document: dict) -> list[Target]:
    """A ray.io object, what it makes (a RayCronJob's RayJob), and its pod templates."""
    if document["kind"] == "RayCronJob":
        name = document["metadata"]["name"]
        created = {"apiVersion": "ray.io/v1", "kind": "RayJob",  # as KubeRay's RayCronJob controller makes it
                   "metadata": {"name": f"{name}-x7k9q", "labels": {"ray.io/cronjob-name": name}},
                   "spec": document["spec"]["jobTemplate"]}
        return [Target(label, "kuberay", document), *ray_targets(f"{label} > its RayJob", created)]
    cluster = cluster_of(document)
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [Target(label, "kuberay", document)] + [
        Target(f"{label} > {group} pods", "kubernetes", pod_template(spec["template"], f"ray-{group}"))
        for group, spec in groups]


def targets() -> list[Target]:
    """Every rendered object, and the objects inside them that reach the API server on their own."""
    found = []
    for name in FILES:
        for document in documents(name):
            label = f"{name}: {document['kind']}"
            if document["apiVersion"].startswith("ray.io/"):
                found += ray_targets(label, document)
                continue
            found.append(Target(label, "kubernetes", document))
            if document["kind"] == "ConfigMap":
                found += ray_targets(f"{label} > rayjob.yaml", yaml.safe_load(document["data"]["rayjob.yaml"]))
    return found


def errors(target: Target) -> list[str]:
    return crd_errors(target.document) if target.schema == "kuberay" else core_errors(target.document)


@pytest.mark.parametrize("target", targets(), ids=lambda t: t.label)
def test_every_rendered_object_validates_strictly(target):
    assert errors(target) == [], f"{target.label} is not a valid {target.kind}"


def test_exactly_these_objects_are_validated(capsys):
    counts = Counter((t.schema, t.kind) for t in targets())
    with capsys.disabled():
        print(f"\nvalidated (kuberay = KubeRay CRDs, kubernetes = Kubernetes {KUBERNETES_VERSION}): "
              + ", ".join(f"{kind} {n} ({schema})" for (schema, kind), n in sorted(counts.items())))
    assert counts == {
        ("kuberay", "RayJob"): 3,  # training; the RayCronJob's; the CronJob route's template
        ("kuberay", "RayCronJob"): 1, ("kuberay", "RayService"): 1,
        ("kubernetes", "CronJob"): 1, ("kubernetes", "ConfigMap"): 1, ("kubernetes", "ServiceAccount"): 1,
        ("kubernetes", "Role"): 1, ("kubernetes", "RoleBinding"): 1,
        ("kubernetes", "PodTemplate"): 12,  # head, cpu and gpu groups of the 4 Ray clusters
    }


def renamed(document: dict, path: str, new: str) -> dict:
    """A copy of ``document`` whose field at dotted ``path`` is spelt ``new``."""
    document = copy.deepcopy(document)
    *parents, old = path.split(".")
    node = document
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[new] = node.pop(old)
    return document


@pytest.mark.parametrize("file, kind, path, typo", [
    ("rayjob-train.yaml", "RayJob", "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinishe"),
    ("rayjob-train.yaml", "RayJob", "spec.entrypoint", "entrypont"),
    ("nightly-score.yaml", "RayCronJob", "spec.jobTemplate.entrypoint", "entryPoint"),
    ("nightly-score.yaml", "RayCronJob", "spec.timeZone", "timezone"),
    ("rayservice.yaml", "RayService", "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.envFrom",
     "envfrom"),
    ("nightly-score-cronjob.yaml", "CronJob", "spec.concurrencyPolicy", "concurencyPolicy"),
    ("nightly-score-cronjob.yaml", "CronJob", "spec.jobTemplate.spec.template.spec.serviceAccountName",
     "serviceAccount_name"),
])
def test_a_misspelt_field_fails_validation(file, kind, path, typo):
    document = renamed(by_kind(file)[kind], path, typo)
    found = crd_errors(document) if document["apiVersion"].startswith("ray.io/") else core_errors(document)
    assert any(f"'{typo}' was unexpected" in error for error in found), found


def test_a_pod_template_field_misspelt_inside_a_ray_cluster_fails_both_schemas():
    job = renamed(by_kind("rayjob-train.yaml")["RayJob"],
                  "spec.rayClusterSpec.workerGroupSpecs.1.template.spec.tolerations", "toleration")
    template = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]
    assert any("'toleration' was unexpected" in e for e in crd_errors(job))
    assert any("'toleration' was unexpected" in e for e in core_errors(pod_template(template, "ray-gpu")))


def test_object_metadata_is_checked_as_kubernetes_checks_it():
    job = by_kind("rayjob-train.yaml")["RayJob"]
    assert crd_errors(job | {"metadata": {"name": "Posterfusion_Train"}})  # not a DNS subdomain
    assert crd_errors(job | {"metadata": {"labels": {"app": "x"}}})  # neither name nor generateName
    assert crd_errors(job | {"metadata": {"name": "a", "labels": {"app": 3}}})  # label values are strings
    assert crd_errors(job | {"metadata": {"name": "a", "nmae": "b"}})
    assert crd_errors(job | {"apiVersion": "ray.io/v1alpha2"}) and crd_errors(job | {"kind": "RayCluster"})


def validator(schema: dict) -> jsonschema.protocols.Validator:
    from kube_schemas import KubernetesValidator

    return KubernetesValidator(close(schema))


def test_the_closed_schema_gives_the_kubernetes_extensions_their_meaning():
    port = validator({"type": "object", "properties": {"port": {"x-kubernetes-int-or-string": True}}})
    assert port.is_valid({"port": 8080}) and port.is_valid({"port": "http"})
    assert not port.is_valid({"port": 1.5}) and not port.is_valid({"port": True})
    assert not port.is_valid({"port": 80, "host": "x"})  # named fields only
    assert validator({"type": "object", "properties": {"a": {"type": "string"}},
                      "x-kubernetes-preserve-unknown-fields": True}).is_valid({"b": 1})
    assert validator({"type": "object", "additionalProperties": {"type": "string"}}).is_valid({"b": "1"})
    listed = validator({"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                        "items": {"type": "object", "properties": {"name": {"type": "string"}}}})
    assert listed.is_valid([{"name": "a"}, {"name": "b"}]) and not listed.is_valid([{"name": "a"}, {"name": "a"}])
    assert not validator({"type": "array", "x-kubernetes-list-type": "set"}).is_valid([1, 1])
    assert validator({"type": "string", "nullable": True}).is_valid(None)
    cel = validator({"type": "object", "properties": {"managedBy": {
        "type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf"}]}}})
    assert cel.is_valid({}) and "not evaluated" in next(cel.iter_errors({"managedBy": "x"})).message


def test_kubernetes_validate_reads_only_the_schemas_it_ships(tmp_path):
    """No socket is opened and no name looked up while every core object validates (the audit hook records all)."""
    core = [t.document for t in targets() if t.schema == "kubernetes"]
    script = ("import json, sys, kubernetes_validate as kv\n"
              f"[kv.validate(d, {KUBERNETES_VERSION!r}, strict=True) for d in json.load(sys.stdin)]\n")
    env = os.environ | {"PYTHONPATH": str(REPO / "tests" / "netaudit"), "POSTERFUSION_NET_AUDIT_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-P", "-c", script], input=json.dumps(core), text=True, env=env, check=True,
                   timeout=120)
    events = [e["event"] for e in read_events(tmp_path)]
    assert events == ["audit.loaded"]


# --- serve configs, ray up, runtime env, image -------------------------------------------------------------

def _validate_serve(config: dict):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    for app in schema.applications:
        assert app.import_path == "posterfusion.serving.app:build_app"
        ServeConfig.model_validate(app.args)
    return schema


def test_the_rayservice_serves_the_projects_serve_config():
    service = by_kind("rayservice.yaml")["RayService"]
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    _validate_serve(embedded)
    _validate_serve(local)
    assert embedded["applications"][0]["args"] | {"model": None} == local["applications"][0]["args"] | {"model": None}
    assert embedded["http_options"]["host"] == "0.0.0.0"  # in a pod; the local file stays on loopback
    assert local["http_options"]["host"] == "127.0.0.1"


def test_the_cluster_launcher_yaml_is_valid_for_ray_up():
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
