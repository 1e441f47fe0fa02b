"""``posterfusion score`` with its catalogue and output in an S3 bucket, beside the same run on local disk.

One run, one machine, the same bundle and posters: the catalogue is built once (a slice of the
real posters in ``../shared/data`` when present, else a synthetic sample), copied into a bucket of
an S3 API on loopback (moto's server, as the tests use), and scored twice by the real job — once
with catalogue and predictions on local disk, once with both in the bucket. Each figure is the
whole ``run_score`` (planning, lease, actor start, model loads, reads, commits); the ratio is what
object storage costs (or not) when it sits on this machine. The bundle is trained here (a small
``cnn``, so no detector runs) unless ``--model`` names one.

    python benchmarks/score_storage.py                      # 300 real posters (or a sample)
    python benchmarks/score_storage.py --posters 1000 --model runs/demo/model
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

SHARED = Path(os.environ.get("POSTERFUSION_SHARED", Path(__file__).resolve().parents[2] / "shared"))
S3_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                  "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def poster_source(root: Path, posters: int) -> tuple[str, str]:
    """(the source folder, what it is): the first ``posters`` labelled real posters, else a synthetic sample."""
    real = SHARED / "data" / "multilabel-posters"
    folder = root / "source"
    if not (real / "train.csv").is_file():
        from posterfusion.jobs.sample import SampleConfig, write_sample

        write_sample(SampleConfig(out=folder, n=posters, unlabelled=0, seed=0))
        return str(folder), f"{posters} synthetic sample posters (no ../shared/data here)"
    (folder / "Images").mkdir(parents=True)
    with open(real / "train.csv", newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header, rows = next(reader), []
        for row in reader:
            if (real / "Images" / f"{row[0]}.jpg").is_file():
                rows.append(row)
                shutil.copyfile(real / "Images" / f"{row[0]}.jpg", folder / "Images" / f"{row[0]}.jpg")
            if len(rows) == posters:
                break
    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return str(folder), f"{len(rows)} real posters (../shared/data/multilabel-posters)"


def small_bundle(catalogue: Path, out: Path) -> Path:
    """A small poster-only bundle (keras_cnn, 64 px, one epoch): a real model whose scoring runs no detector."""
    from posterfusion.jobs.train import TrainConfig, run_train

    run_train(TrainConfig.model_validate({
        "model": {"variant": "cnn", "backbone": "keras_cnn", "image_size": 64},
        "optim": {"epochs": 1, "batch_size": 32}, "data": {"catalogue": str(catalogue), "vocab": {"min_count": 3}},
        "run": {"out": str(out), "storage_path": str(out.parent / "ray_results")}}))
    return out


def copy_catalogue(local: Path, bucket: str) -> str:
    """The catalogue's files into the bucket, its ``_PUBLISHED`` manifest last (what ingest writes there)."""
    from posterfusion.features.catalogue import catalogue_files
    from posterfusion.locations import Location

    target = Location(f"s3://{bucket}/catalogue")
    files = []
    for file in catalogue_files(local).locations:
        files.append(target / "data" / file.name)
        files[-1].upload_file(file.local_path)
    target.mark_published(files)
    return str(target)


def timed_score(model: Path, catalogue: str, out: str) -> tuple[int, float]:
    from posterfusion.jobs.score import ScoreConfig, run_score

    started = time.perf_counter()
    summary = run_score(ScoreConfig(model=model, catalogue=catalogue, out=out, batch_size=32))
    if not summary["reconciles"]:
        raise RuntimeError(f"the scorer did not reconcile: {summary}")
    return summary["scored"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posters", type=int, default=300, help="posters in the catalogue (default 300)")
    parser.add_argument("--model", type=Path, default=None, help="a bundle (default: a small one trained here)")
    args = parser.parse_args()

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # loopback only
    server.start()
    host, port = server.get_host_and_port()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    os.environ.update(S3_ENVIRONMENT | {"AWS_ENDPOINT_URL": f"http://{host}:{port}"})  # before Ray starts

    from posterfusion.cluster import ClusterConfig, prepare_environment, ray_cluster

    prepare_environment()
    import boto3

    boto3.session.Session().client("s3").create_bucket(Bucket="bench")
    try:
        with tempfile.TemporaryDirectory() as tmp, ray_cluster(ClusterConfig()) as cluster:
            from posterfusion.jobs.ingest import IngestConfig, run_ingest

            root = Path(tmp)
            source, what = poster_source(root, args.posters)
            run_ingest(IngestConfig(sources=[f"multilabel:{source}"], out=root / "catalogue"))
            model = args.model or small_bundle(root / "catalogue", root / "model")
            remote = copy_catalogue(root / "catalogue", "bench")
            n_local, t_local = timed_score(model, str(root / "catalogue"), str(root / "predictions"))
            n_s3, t_s3 = timed_score(model, remote, "s3://bench/predictions")
    finally:
        server.stop()
    print(f"{what}; bundle {args.model or 'keras_cnn cnn 64 px (trained here)'}; "
          f"Ray: {cluster.nodes} node(s), {cluster.cpus:g} CPU; S3: moto on 127.0.0.1:{port}")
    print(f"{'catalogue and output':<32}{'posters':>8}{'seconds':>10}{'posters/s':>11}")
    print(f"{'local disk':<32}{n_local:>8}{t_local:>10.1f}{n_local / t_local:>11.1f}")
    print(f"{'S3 bucket (loopback moto)':<32}{n_s3:>8}{t_s3:>10.1f}{n_s3 / t_s3:>11.1f}")
    print(f"ratio S3 / local: {(n_s3 / t_s3) / (n_local / t_local):.2f}x")


if __name__ == "__main__":
    main()
