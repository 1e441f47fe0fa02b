"""Shared fixtures. Tests read as the specification; see each module's docstring."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import REPO, SHARED  # helpers live in tests/support.py

os.environ.setdefault("POSTERFUSION_HOME", str(REPO / ".state"))
os.environ.setdefault("POSTERFUSION_WEIGHTS", str(SHARED / "weights"))  # the recipes' pretrained weights
# every run the tests train or evaluate is tracked, in one store under the project's state dir (not ./mlflow.db)
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / '.state' / 'mlflow-tests.db'}")
# Every Ray the tests start (the session's, the multi-node cluster's, the CLI's) keeps its auth
# token under the project's Ray HOME; the test process must present it to all of them, and
# Ray reads these once, at import, so they are set before anything imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN_PATH", os.path.join(os.environ["POSTERFUSION_HOME"], "ray-home", ".ray",
                                                          "auth_token"))
# Test-session speed, not behaviour (read by every Ray process, so set before any starts): Ray Train's
# controller polls its workers every 0.2 s instead of 2 s (a finished run returns at once), runs no
# preemption watcher (one actor less per run: no test preempts a node), and Ray keeps up to 8 idle
# workers with their imports warm instead of one per CPU (torch and the project load in ~5 s per fresh
# process on 2 CPUs; the suite starts hundreds of short Ray Data tasks).
for key, value in {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                   "RAY_num_workers_soft_limit": "8"}.items():
    os.environ.setdefault(key, value)
from posterfusion.cluster import prepare_environment  # noqa: E402 (after the environment above)

prepare_environment()  # before ray is imported anywhere in the session

LABELLED_SEED = 0  # the sample seed of labelled_sample, and so of small_fused (its first 66 posters)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole test session (a start costs seconds).

    With Serve's direct ingress switched on, so the service tests reach each replica both through
    the proxy (the service's URL, as without it) and on the replica's own port.

    After the session's S3 server (``s3_endpoint``): every Ray process — workers, actors, Serve's
    replicas — takes the environment of the driver that started Ray, when it starts, and the AWS SDK
    in each reads ``AWS_*`` from it. Starting Ray inside that environment gives every process of the
    session the loopback endpoint and the dummy credentials, and nothing else to reach (no instance
    metadata: ``AWS_EC2_METADATA_DISABLED``). A ``runtime_env`` would cover only this job's workers.
    """
    from posterfusion.cluster import ClusterConfig, ray_cluster
    from posterfusion.serving.app import enable_direct_ingress

    enable_direct_ingress()
    with ray_cluster(ClusterConfig(num_cpus=2)) as info:
        yield info


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real posters beside the checkout. Missing data is an error, not a skip."""
    data = SHARED / "data"
    if not (data / "multilabel-posters" / "train.csv").is_file():
        pytest.fail(f"real data not found at {data}: clone with ../shared beside the repo "
                    "or set POSTERFUSION_SHARED")
    return data


@pytest.fixture(scope="session")
def small_fused(quick_bundles, tmp_path_factory) -> Path:
    """A 66-poster catalogue (60 labelled + 6 unlabelled), its YOLO features and a small fused bundle.

    For every test that needs *a* working bundle rather than a good one (scoring, the service, the
    network audit): ``ROOT/catalogue``, ``ROOT/features``, ``ROOT/bundle``. Nothing is detected or
    trained for it: the sample draws its posters in order from its seed, so these 66 are the first 66
    of ``labelled_sample`` (same seed), whose object features cover them, and the bundle is a copy of
    ``quick_bundles``' fused one (tests may copy and alter it; the original stays as trained).
    """
    import shutil

    from support import sample_catalogue

    root = sample_catalogue(tmp_path_factory.mktemp("small-fused"), n=60, unlabelled=6, seed=LABELLED_SEED)
    shutil.copytree(quick_bundles / "features", root / "features")
    shutil.copytree(quick_bundles / "models" / "quick" / "fused-s0", root / "bundle")
    return root


@pytest.fixture(scope="session")
def labelled_sample(ray_session, tmp_path_factory) -> Path:
    """168 posters (160 labelled + 8 unlabelled), their catalogue and YOLO object features, built once.

    The one sample of the tests that train and evaluate networks of their own (training, evaluation,
    similarity): ``ROOT/sample``, ``ROOT/catalogue``, ``ROOT/features``. Each test module writes under
    ROOT with names of its own; nothing writes into the catalogue or the features.
    """
    from support import sample_catalogue

    return sample_catalogue(tmp_path_factory.mktemp("labelled"), n=160, unlabelled=8, seed=LABELLED_SEED, features=True)


@pytest.fixture(scope="session")
def quick_bundles(labelled_sample) -> Path:
    """A small ``cnn`` and ``fused`` bundle (the quick recipe, from scratch) on ``labelled_sample``, trained once.

    At ``ROOT/models/quick/{variant}-s0``, where ``compare --models ROOT/models`` finds them current.
    Returns ROOT (``labelled_sample``).
    """
    from posterfusion.jobs.train import run_train
    from posterfusion.jobs.train.recipes import resolve

    from support import QUICK

    root = labelled_sample
    for variant in ("cnn", "fused"):
        run_train(resolve("quick", {**QUICK, "model": QUICK["model"] | {"variant": variant},
                                    "data": {"catalogue": root / "catalogue", "features": root / "features"},
                                    "run": {"out": root / "models" / "quick" / f"{variant}-s0",
                                            "storage_path": root / "ray_results-quick"}}, from_scratch=True))
    return root


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 API (moto's server) on 127.0.0.1 for the whole session, and the AWS environment pointing at it.

    Dummy credentials, ``AWS_ENDPOINT_URL`` (read by pyarrow and boto3 alike), no instance metadata and
    no user config: nothing the tests do with ``s3://`` can leave loopback. Buckets: ``s3server.new_bucket``.
    """
    from s3server import s3_environment

    with s3_environment() as endpoint:
        yield endpoint
