"""Bulk scoring throughput (posters/s): the Ray Data scorer vs a plain single-process loop.

Both do the same work with the same bundle on the same posters: decode → object vectors
(cached features when ``--features`` is given, else the detector runs) → CNN + fusion →
the prediction rows (top-3, thresholded set, object summary) → Parquet. The Ray figure is
``posterfusion score``'s whole run (planning, actor start, model loads, writes), with
``ray.init`` excluded and reported apart.

    python benchmarks/score_throughput.py --model M --catalogue C [--features F] [--posters 600]
    python benchmarks/score_throughput.py --posters 200     # self-contained: sample + tiny bundle

On a GPU machine the plain loop and the actors put the CNN on the GPU (``torch.cuda``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

SHARED_DETECTOR = Path(__file__).resolve().parents[2] / "shared" / "weights" / "yolov8n_int8.tflite"


def subset_catalogue(catalogue: Path, posters: int, out: Path) -> Path:
    """The first ``posters`` catalogue rows as a one-file catalogue, so both sides read the same rows."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from posterfusion.features.catalogue import catalogue_files

    table = pads.dataset(catalogue_files(catalogue), format="parquet").head(posters)
    (out / "data").mkdir(parents=True)
    pq.write_table(table, out / "data" / "part-0.parquet", row_group_size=256)
    return out


def plain_loop(model: Path, catalogue: Path, features: Path | None, out: Path, batch_size: int) -> tuple[int, float]:
    """One process, one Predictor, the same row format and Parquet output as the scorer."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from posterfusion.features.catalogue import catalogue_files
    from posterfusion.jobs.batch_predict import PREDICT_COLUMNS, PredictBatch, cached_objects
    from posterfusion.jobs.score import format_rows, predictions_schema

    started = time.perf_counter()
    actor = PredictBatch(str(model), detect=features is None)
    predictor = actor.predictor
    frame = pads.dataset(catalogue_files(catalogue), format="parquet").to_table(columns=PREDICT_COLUMNS).to_pandas()
    if features is not None and predictor.config.detector_id:
        cached = cached_objects(features, predictor.config.detector_id)
        found = [cached.get(k, (None, None)) for k in zip(frame["movie_id"], frame["poster_sha256"], strict=True)]
        frame["objects"] = [None if v is None else np.asarray(v, np.float32) for v, _ in found]
        frame["cached_detections"] = [d for _, d in found]
    schema = predictions_schema(predictor.genres)
    tables = []
    for start in range(0, len(frame), batch_size):
        scored = actor(frame.iloc[start:start + batch_size].reset_index(drop=True))
        tables.append(format_rows(scored, predictor.genres, predictor.thresholds, predictor.version, "plain", schema))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), out / "plain.parquet")
    return len(frame), time.perf_counter() - started


def ray_scorer(model: Path, catalogue: Path, features: Path | None, out: Path, batch_size: int,
               actors: int | None) -> tuple[int, float]:
    from posterfusion.jobs.score import ScoreConfig, run_score

    started = time.perf_counter()
    summary = run_score(ScoreConfig(model=model, catalogue=catalogue, out=out, features=features,
                                    batch_size=batch_size, actors=actors))
    assert summary["reconciles"], summary
    return summary["scored"], time.perf_counter() - started


def tiny_setup(root: Path, posters: int, detector: str | None) -> tuple[Path, Path, Path | None]:
    """Synthetic sample → catalogue (→ features) → a 1-epoch bundle, when no real bundle is given."""
    from posterfusion.features.objects import DetectorConfig
    from posterfusion.jobs.features import FeaturesConfig, run_features
    from posterfusion.jobs.ingest import IngestConfig, run_ingest
    from posterfusion.jobs.sample import SampleConfig, write_sample
    from posterfusion.jobs.train import TrainConfig, run_train

    sample = write_sample(SampleConfig(out=root / "sample", n=posters, unlabelled=0))
    run_ingest(IngestConfig(sources=[f"multilabel:{root / 'sample'}"], metadata=[sample["metadata"]],
                            out=root / "catalogue"))
    features = None
    if detector:
        features = root / "features"
        run_features(FeaturesConfig(catalogue=root / "catalogue", out=features,
                                    detector=DetectorConfig(weights=detector)))
    run_train(TrainConfig(catalogue=root / "catalogue", out=root / "bundle", features=features,
                          detector=DetectorConfig(weights=detector) if detector else None,
                          variant="fused" if detector else "cnn+metadata", backbone="densenet121", image_size=64,
                          epochs=1, storage_path=root / "ray_results"))
    return root / "bundle", root / "catalogue", features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--catalogue", type=Path)
    parser.add_argument("--features", type=Path, help="cached object features (else both sides run the detector)")
    parser.add_argument("--detector", default=str(SHARED_DETECTOR), help="detector for the self-contained setup")
    parser.add_argument("--posters", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--address", default=None)
    args = parser.parse_args()

    from posterfusion.cluster import ClusterConfig, prepare_environment, ray_cluster

    prepare_environment()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        with ray_cluster(ClusterConfig(address=args.address)) as cluster:
            init = time.perf_counter() - started
            if args.model is None:
                detector = args.detector if Path(args.detector).is_file() else None
                args.model, args.catalogue, args.features = tiny_setup(root / "setup", args.posters, detector)
            catalogue = subset_catalogue(args.catalogue, args.posters, root / "subset")
            n_ray, t_ray = ray_scorer(args.model, catalogue, args.features, root / "ray", args.batch_size, args.actors)
        n_plain, t_plain = plain_loop(args.model, catalogue, args.features, root / "plain", args.batch_size)
    objects = "cached object features" if args.features else "detector run on every poster"
    print(f"bundle {args.model}; {n_ray} posters; {objects}; batch {args.batch_size}; "
          f"Ray: {cluster.nodes} node(s), {cluster.cpus:g} CPU, {cluster.gpus:g} GPU (ray.init {init:.1f} s, excluded)")
    print(f"{'scorer':<28}{'posters':>8}{'seconds':>10}{'posters/s':>11}")
    print(f"{'plain single-process loop':<28}{n_plain:>8}{t_plain:>10.1f}{n_plain / t_plain:>11.1f}")
    print(f"{'Ray Data scorer':<28}{n_ray:>8}{t_ray:>10.1f}{n_ray / t_ray:>11.1f}")
    print(f"ratio Ray / plain: {(n_ray / t_ray) / (n_plain / t_plain):.2f}x")


if __name__ == "__main__":
    main()
