"""Training throughput (samples/s): the Ray Train job vs a plain loop, same model, batch, image size and data.

Both run :func:`posterfusion.jobs.train.loop.train_epoch` — the one training step of the project —
over the same posters decoded once into ``size × size`` uint8 tensors: the plain loop from a
list in memory, the Ray Train worker from its dataset shard in Ray's object store (the job's
decoded-image cache). The Ray figure is the job's own per-epoch training samples/s (validation
excluded, the first epoch skipped as warm-up); ``ray.init`` and the decode are excluded from
both.

    python benchmarks/train_throughput.py                        # MobileNetV2 at 224, real posters
    python benchmarks/train_throughput.py --size 160 --posters 800
    python benchmarks/train_throughput.py --device cuda --workers 1
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def real_catalogue(root: Path, posters: int) -> Path:
    """The first ``posters`` labelled real posters as a catalogue (the plain loop reads the same rows)."""
    import csv
    import shutil

    from posterfusion.jobs.ingest import IngestConfig, run_ingest

    source, target = SHARED / "data" / "multilabel-posters", root / "source"
    (target / "Images").mkdir(parents=True)
    with open(source / "train.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    header, rows = rows[0], rows[1:posters + 1]
    with open(target / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    for row in rows:
        shutil.copy(source / "Images" / f"{row[0]}.jpg", target / "Images")
    run_ingest(IngestConfig(sources=[f"multilabel:{target}"], out=root / "catalogue"))
    return root / "catalogue"


def settings(args, catalogue: Path, out: Path):
    from posterfusion.jobs.train.recipes import resolve

    return resolve("quality", {
        "model": {"variant": "cnn+metadata", "image_size": args.size},
        "optim": {"warmup_epochs": 0, "epochs": args.epochs, "batch_size": args.batch,
                  "train_stages": args.train_stages, "patience": args.epochs},
        "data": {"catalogue": str(catalogue), "vocab": {"min_count": 5}},
        "run": {"out": str(out), "workers": args.workers, "gpu": args.device == "cuda",
                "storage_path": str(out.parent / "ray_results")},
        "combine": {"members": 1}})


def plain_loop(config, device: str, epochs: int) -> float:
    """samples/s of train_epoch over the decoded posters in memory (mean over epochs after the first)."""
    import numpy as np
    import torch

    from posterfusion.jobs.train.config import WorkerArgs
    from posterfusion.jobs.train.data import data_facts, prepare
    from posterfusion.jobs.train.loop import lr_schedules, make_optimizer, train_epoch, training_model
    from posterfusion.jobs.train.run import plan

    data = prepare(config)
    args = WorkerArgs(config=config, facts=data_facts(config, data), plan=plan(config))
    torch.set_num_threads(args.plan.threads)
    batch = config.optim.batch_size
    rows = np.flatnonzero((data.frame["split"] == "train").to_numpy())
    images = _decoded(config, data.frame.iloc[rows])
    sides = {k: v[rows] for k, v in data.sides.items()}
    model = training_model(args).to(device)
    optimizer = make_optimizer(model, args)
    steps = math.ceil(len(rows) / batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedules(args, steps))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=False)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rates = []
    for epoch in range(1, epochs + 1):
        order = np.random.default_rng(epoch).permutation(len(rows))
        batches = ({"image": torch.from_numpy(images[order[i:i + batch]]).to(device),
                    **{k: torch.from_numpy(v[order[i:i + batch]]).to(device) for k, v in sides.items()}}
                   for i in range(0, len(rows), batch))
        started = time.perf_counter()
        _, seen = train_epoch(model, optimizer, scheduler, scaler, loss_fn, args, torch.device(device), "full",
                              epoch, batches)
        rates.append(seen / (time.perf_counter() - started))
    return sum(rates[1:]) / max(1, len(rates) - 1) if len(rates) > 1 else rates[0]


def _decoded(config, frame):
    import numpy as np

    from posterfusion.features.catalogue import catalogue_files
    from posterfusion.features.presets import decode_poster

    table = catalogue_files(config.data.catalogue).read(["movie_id", "poster"]).to_pandas().set_index("movie_id")
    return np.stack([decode_poster(table.loc[m, "poster"], config.model.size).numpy() for m in frame["movie_id"]])


def ray_train(config) -> tuple[float, float]:
    """(training samples/s of the job, mean over epochs after the first; its validation seconds per epoch)."""
    from posterfusion.jobs.train import run_train

    history = run_train(config)["history"]
    later = history[1:] or history
    return (sum(h["samples_per_s"] for h in later) / len(later),
            sum(h["seconds"] - h["train_seconds"] for h in later) / len(later))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posters", type=int, default=600)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--train-stages", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--address", default=None)
    args = parser.parse_args()

    from posterfusion.cluster import ClusterConfig, prepare_environment, ray_cluster

    prepare_environment()
    with tempfile.TemporaryDirectory() as tmp, ray_cluster(ClusterConfig(address=args.address)) as cluster:
        root = Path(tmp)
        catalogue = real_catalogue(root, args.posters)
        plain = plain_loop(settings(args, catalogue, root / "plain"), args.device, args.epochs)
        ray_rate, validation = ray_train(settings(args, catalogue, root / "ray"))
    stages = "all" if args.train_stages is None else f"last {args.train_stages}"
    print(f"mobilenet_v2 cnn+metadata, {args.size} px, batch {args.batch}, backbone stages trained: {stages}; "
          f"{args.posters} real posters (~80 % train); Ray: {cluster.nodes} node(s), {cluster.cpus:g} CPU, "
          f"{cluster.gpus:g} GPU, {args.workers} worker(s); device {args.device}")
    print(f"{'loop':<34}{'samples/s':>10}")
    print(f"{'plain train_epoch over memory':<34}{plain:>10.1f}")
    print(f"{'Ray Train epoch (object store)':<34}{ray_rate:>10.1f}")
    print(f"ratio Ray / plain: {ray_rate / plain:.2f}x (the job also validates: {validation:.1f} s per epoch)")


if __name__ == "__main__":
    main()
