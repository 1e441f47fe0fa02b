"""Detector benchmark: posters/s and agreement with the TFLite reference, per detector and image size.

The shared COCO YOLOv8n exists twice: the int8 TFLite export (LiteRT, CPU, fixed 640 input, the
reference the object features were first computed with) and the same weights dequantized into a
PyTorch model (``yolov8n_from_int8.safetensors``: batches, any ``imgsz``, GPU, half precision).
Posters here are at most 224 px on their short side, so a smaller ``imgsz`` may lose nothing.
For each setting it prints posters/s (batches of ``--batch``) and, against the TFLite reference,
the share of posters with the same set of detected classes and with the same class counts, and
detections per class for the most frequent classes.

    python benchmarks/detector_throughput.py --posters 400
    python benchmarks/detector_throughput.py --device cuda --sizes 320 640
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def posters(n: int) -> list:
    from posterfusion.features.catalogue import decode_rgb

    files = sorted((SHARED / "data" / "multilabel-posters" / "Images").glob("*.jpg"))[:n]
    return [decode_rgb(f.read_bytes()) for f in files]


def run(config, images: list, batch: int) -> tuple[list[list], float]:
    """(detections per poster, posters/s) after one warm-up batch."""
    from posterfusion.features.objects import Detector

    detector = Detector(config)
    detector.detect(images[:batch])
    started = time.perf_counter()
    found = []
    for i in range(0, len(images), batch):
        found += detector.detect(images[i:i + batch])
    return found, len(images) / (time.perf_counter() - started)


def agreement(reference: list[list], found: list[list]) -> tuple[float, float]:
    """(share of posters with the same class set, share with the same count per class)."""
    same_set = same_counts = 0
    for a, b in zip(reference, found, strict=True):
        ca, cb = Counter(d.name for d in a), Counter(d.name for d in b)
        same_set += set(ca) == set(cb)
        same_counts += ca == cb
    return same_set / len(reference), same_counts / len(reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posters", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 320, 416, 640])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from posterfusion.cluster import prepare_environment
    from posterfusion.features.objects import DetectorConfig

    prepare_environment()
    images = posters(args.posters)
    tflite = DetectorConfig(weights=str(SHARED / "weights" / "yolov8n_int8.tflite"), device="cpu")
    reference, reference_speed = run(tflite, images, args.batch)
    rows = [("tflite int8", 640, "cpu", reference_speed, 1.0, 1.0, reference)]
    for size in args.sizes:
        config = DetectorConfig(weights=str(SHARED / "weights" / "yolov8n_from_int8.safetensors"), imgsz=size,
                                device=args.device)
        found, speed = run(config, images, args.batch)
        rows.append(("pytorch", size, args.device, speed, *agreement(reference, found), found))
    classes = [name for name, _ in Counter(d.name for ds in reference for d in ds).most_common(5)]
    print(f"{len(images)} real posters, batch {args.batch}; agreement with the TFLite reference (640, int8)")
    header = f"{'detector':<12}{'imgsz':>6}{'device':>8}{'posters/s':>11}{'same classes':>14}{'same counts':>13}"
    print(header + "".join(f"{c:>10}" for c in classes))
    for name, size, device, speed, same_set, same_counts, found in rows:
        counts = Counter(d.name for ds in found for d in ds)
        print(f"{name:<12}{size:>6}{device:>8}{speed:>11.1f}{same_set:>14.1%}{same_counts:>13.1%}"
              + "".join(f"{counts[c]:>10}" for c in classes))
    fastest = max(rows[1:], key=lambda r: r[3])
    print(f"fastest PyTorch setting: imgsz {fastest[1]} at {fastest[3]:.1f} posters/s = "
          f"{fastest[3] / reference_speed:.2f}x the TFLite reference")


if __name__ == "__main__":
    main()
