"""Bulk scoring throughput (posters/s): the Ray Data scorer vs a plain single-process loop, in one run.

Both do the same work with the same bundle on the same posters: decode → object vectors
(cached features when ``--features`` is given, else the detector runs) → CNN + fusion →
calibrated probabilities → the prediction rows (top-3, thresholded set, object summary) →
Parquet. The plain loop is one process holding one ``PredictBatch`` with all the machine's
threads; the Ray figure is ``posterfusion score``'s whole run (planning, lease, actor start,
model loads, commits), with ``ray.init`` excluded and reported apart. After the figures it
prints where Ray's time went: Ray Data's own per-operator account of the run.

    python benchmarks/score_throughput.py --model M --catalogue C --features F      # every poster of C
    python benchmarks/score_throughput.py --model M --catalogue C --posters 2000     # detector on each
    python benchmarks/score_throughput.py --model M --catalogue C --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def subset_catalogue(catalogue: Path, posters: int | None, out: Path) -> Path:
    """The first ``posters`` catalogue rows (all: None) as a catalogue, so both sides read the same rows."""
    import pyarrow.parquet as pq

    from posterfusion.features.catalogue import catalogue_files

    dataset = catalogue_files(catalogue).dataset()
    table = dataset.head(posters) if posters else dataset.to_table()
    (out / "data").mkdir(parents=True)
    for i in range(0, table.num_rows, 2000):  # files of ingest's size, so Ray reads them in parallel
        pq.write_table(table.slice(i, 2000), out / "data" / f"part-{i // 2000}.parquet", row_group_size=256)
    return out


def plain_loop(model: Path, catalogue: Path, features: Path | None, out: Path, batch_size: int,
               device: str | None) -> tuple[int, float]:
    """One process, one ScoreBatch with all the machine's threads: the same rows and Parquet output as the scorer."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from posterfusion.features.catalogue import catalogue_files
    from posterfusion.jobs.score import ScoreBatch
    from posterfusion.models.bundle import load_bundle
    from posterfusion.models.inference import PREDICT_COLUMNS, CachedObjects

    started = time.perf_counter()
    detector_id = load_bundle(model).config.detector_id
    objects = CachedObjects.load(features, detector_id, strict=False) if features and detector_id else None
    actor = ScoreBatch(str(model), detect=True, run_id="plain", threads=os.cpu_count(), objects=objects,
                       device=device)
    batches = catalogue_files(catalogue).dataset().to_batches(columns=PREDICT_COLUMNS, batch_size=batch_size)
    tables = [actor(pa.Table.from_batches([batch])) for batch in batches]
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), out / "plain.parquet")
    return sum(len(t) for t in tables), time.perf_counter() - started


def ray_scorer(model: Path, catalogue: Path, features: Path | None, out: Path, batch_size: int,
               actors: int | None) -> dict:
    from posterfusion.jobs.score import ScoreConfig, run_score

    started = time.perf_counter()
    summary = run_score(ScoreConfig(model=model, catalogue=catalogue, out=out, features=features,
                                    batch_size=batch_size, actors=actors))
    if not summary["reconciles"]:
        raise RuntimeError(f"the scorer did not reconcile: {summary}")
    return summary | {"wall": time.perf_counter() - started}


def operator_lines(stats: str) -> list[str]:
    """The per-operator headline lines of Ray Data's stats (wall time, rows, tasks/actors)."""
    keep = ("Operator", "* Remote wall time", "* UDF time", "* Output num rows", "Dataset iterator time",
            "* Total time overall", "* In Ray Data", "* In user code", "* Total execution time")
    return [line.rstrip() for line in stats.splitlines() if line.strip().startswith(keep)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--catalogue", type=Path, required=True)
    parser.add_argument("--features", type=Path, help="cached object features (else both sides run the detector)")
    parser.add_argument("--posters", type=int, default=None, help="the first N rows (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--device", default=None, help="cuda for the GPU (both sides)")
    parser.add_argument("--address", default=None)
    args = parser.parse_args()

    from posterfusion.cluster import ClusterConfig, prepare_environment, ray_cluster

    prepare_environment()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalogue = subset_catalogue(args.catalogue, args.posters, root / "subset")
        started = time.perf_counter()
        with ray_cluster(ClusterConfig(address=args.address)) as cluster:
            init = time.perf_counter() - started
            summary = ray_scorer(args.model, catalogue, args.features, root / "ray", args.batch_size, args.actors)
        n_plain, t_plain = plain_loop(args.model, catalogue, args.features, root / "plain", args.batch_size,
                                      args.device)
    objects = "cached object features" if args.features else "detector run on every poster"
    n_ray, t_ray = summary["scored"], summary["wall"]
    print(f"bundle {args.model}; {n_ray} posters; {objects}; batch {args.batch_size}; "
          f"Ray: {cluster.nodes} node(s), {cluster.cpus:g} CPU, {cluster.gpus:g} GPU (ray.init {init:.1f} s, excluded)")
    print(f"{'scorer':<28}{'posters':>8}{'seconds':>10}{'posters/s':>11}")
    print(f"{'plain single-process loop':<28}{n_plain:>8}{t_plain:>10.1f}{n_plain / t_plain:>11.1f}")
    print(f"{'Ray Data scorer':<28}{n_ray:>8}{t_ray:>10.1f}{n_ray / t_ray:>11.1f}")
    print(f"ratio Ray / plain: {(n_ray / t_ray) / (n_plain / t_plain):.2f}x")
    print("where Ray's time went (Ray Data's stats of the run):")
    print("\n".join("  " + line for line in operator_lines(summary["ray_data_stats"] or "")))


if __name__ == "__main__":
    main()
