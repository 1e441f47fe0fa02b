"""What a bundle costs to score with, bundles side by side in one run (e.g. one network against an ensemble).

For each bundle, on the same catalogue posters: the network alone (decoded, preset images in
batches, with the posters' own encoded metadata: a routed bundle runs one of its networks per
poster by it) and the Predictor's whole ``score`` (decode, metadata, network, calibration), both
in posters/s with every thread of the machine, and the ratio to the first bundle. Object vectors
are zeros (the network's cost does not depend on their values, and the detector is the same for
every bundle: ``benchmarks/detector_throughput.py`` measures it).

    python benchmarks/model_cost.py --model runs/a --model runs/b --catalogue C --posters 512
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def read_posters(catalogue: Path, count: int):
    """The first ``count`` catalogue rows: poster bytes and the metadata frame."""

    from posterfusion.features.catalogue import catalogue_files
    from posterfusion.models.inference import PREDICT_COLUMNS

    frame = catalogue_files(catalogue).dataset().head(count, columns=PREDICT_COLUMNS).to_pandas()
    return frame["poster"].tolist(), frame


def measure(model: Path, posters: list[bytes], frame, batch_size: int, device: str | None, repeats: int) -> dict:
    import numpy as np
    import torch

    from posterfusion.features.metadata import INPUT_FIELDS as META_FIELDS
    from posterfusion.features.presets import image_to_tensor
    from posterfusion.models.hardware import autocast
    from posterfusion.models.predictor import Predictor

    predictor = Predictor(model, device=device)
    zeros = np.zeros(predictor.config.model.object_dim, np.float32) if predictor.model.uses_objects else None
    batches = [slice(i, i + batch_size) for i in range(0, len(posters), batch_size)]

    def score_all() -> None:
        for part in batches:
            objects = [zeros] * len(posters[part]) if zeros is not None else None
            predictor.score(posters[part], frame.iloc[part], objects=objects)

    images = [predictor._decode(posters[part], [None] * len(posters[part])) for part in batches]
    tensors = [torch.stack([image_to_tensor(im, predictor.config.model.size) for im in batch]) for batch in images]
    encoded = torch.as_tensor(predictor.encoder.transform(frame.reset_index(drop=True)))
    config = predictor.config.model

    def network_all() -> None:
        with torch.inference_mode(), autocast(predictor.device, predictor.precision):
            for part, batch in zip(batches, tensors, strict=True):
                objects = torch.zeros(len(batch), config.object_dim) if config.uses_objects else None
                metadata = encoded[part] if predictor.model.uses_metadata else None  # a routed bundle routes by it
                inputs = predictor.preset(batch.to(predictor.device)).contiguous(memory_format=torch.channels_last)
                predictor.model(inputs, objects, metadata)

    network_all()  # warm-up: oneDNN picks its kernels on the first batches, the first model's threads start
    score_all()
    return {"model": str(model), "members": predictor.config.model.members,
            "with_metadata": float(frame[list(META_FIELDS)].notna().any(axis=1).mean()),
            "shared_stages": predictor.config.model.shared_stages,
            "network": len(posters) / best_time(network_all, repeats),
            "score": len(posters) / best_time(score_all, repeats)}


def best_time(work, repeats: int) -> float:
    """The fastest of ``repeats`` runs: the least disturbed by whatever else the machine does."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", required=True, help="a bundle (repeat: side by side)")
    parser.add_argument("--catalogue", type=Path, required=True)
    parser.add_argument("--posters", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cuda for the GPU")
    args = parser.parse_args()
    posters, frame = read_posters(args.catalogue, args.posters)
    results = [measure(m, posters, frame, args.batch_size, args.device, args.repeats) for m in args.model]
    print(f"{len(posters)} posters ({results[0]['with_metadata']:.0%} with metadata), batch {args.batch_size}, "
          f"best of {args.repeats}")
    print(f"{'bundle':<44} {'members':>7} {'shared':>6} {'network/s':>10} {'ratio':>6} {'score/s':>8} {'ratio':>6}")
    first = results[0]
    for r in results:
        print(f"{r['model'][-44:]:<44} {r['members']:>7} {r['shared_stages']:>6} {r['network']:>10.1f} "
              f"{r['network'] / first['network']:>5.2f}× {r['score']:>8.1f} {r['score'] / first['score']:>5.2f}×")


if __name__ == "__main__":
    main()
