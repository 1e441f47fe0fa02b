"""Do the detector's own image features add what the object bag lacks? A validation-only probe, and its cost.

The object branch reads a bag of detections (per class: count, best confidence, area share). The
PyTorch YOLOv8n also exposes what it computed on the way: its backbone's last map (SPPF) and its
neck's three outputs (P3–P5). Mean-pooled, they are a 704-d image embedding of a different kind
than the genre CNN's. Before plumbing it into the feature store, the network and the Predictor,
this probe asks whether validation supports it at all:

* every labelled training and validation poster of a catalogue: the ImageNet MobileNetV2's pooled
  features (read from the backbone-feature cache the recipes fill), the metadata (encoder fitted on
  the training split), the stored object bag, and the YOLO embedding computed here;
* one multi-label logistic head per candidate input set, the same fixed settings for all (nothing
  tuned), trained on the training split, scored on the **validation** split: macro ROC-AUC, the six
  main genres, and paired bootstrap differences to ``poster + metadata`` overall and per slice, with
  per genre intervals for the embedding. Nothing reads the test split;
* the cost, side by side on the same posters: the YOLO embedding (PyTorch) against the default
  CPU detector (int8 TFLite, boxes only) in posters/s.

    python benchmarks/object_embedding.py --catalogue runs/q/catalogue --features runs/q/features \\
        --genres-from runs/q/models/quality/cnn-s0 --imgsz 320
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

NECK = (9, 15, 18, 21)  # YOLOv8's SPPF (backbone end) and the neck's P3, P4, P5 outputs
CANDIDATES = {"poster": ("poster",), "poster + metadata": ("poster", "metadata"),
              "+ bag": ("poster", "metadata", "bag"), "+ yolo embedding": ("poster", "metadata", "embedding"),
              "+ bag + yolo embedding": ("poster", "metadata", "bag", "embedding")}
BASE = "poster + metadata"


def read_rows(catalogue: Path):
    """Labelled training and validation rows: ids, poster bytes, genres, split, metadata."""
    import pyarrow.compute as pc

    from posterfusion.features.catalogue import catalogue_files
    from posterfusion.features.metadata import FIELDS

    wanted = pc.field("labelled") & pc.field("split").isin(["train", "val"])
    columns = ["movie_id", "poster_sha256", "poster", "genres", "split", *FIELDS]
    frame = catalogue_files(catalogue).dataset().to_table(columns=columns, filter=wanted).to_pandas()
    return frame.sort_values("movie_id").reset_index(drop=True)


def yolo_model(imgsz: int):
    """The PyTorch YOLOv8n (the shared weights' safetensors twin) and hooks keeping its pooled neck maps."""
    import torch

    from posterfusion.features.objects import DetectorConfig, load_yolo

    model = load_yolo(DetectorConfig(weights="yolov8n_from_int8.safetensors", imgsz=imgsz, device="cpu")).model
    pooled: dict[int, torch.Tensor] = {}
    for index in NECK:
        model.model[index].register_forward_hook(
            lambda module, args, out, index=index: pooled.__setitem__(index, out.float().mean(dim=(2, 3))))
    return model.eval(), pooled


def yolo_embeddings(posters: list[bytes], imgsz: int, batch_size: int = 16) -> np.ndarray:
    import torch

    from posterfusion.features.catalogue import decode_rgb

    model, pooled = yolo_model(imgsz)
    out = []
    with torch.inference_mode():
        for start in range(0, len(posters), batch_size):
            images = [decode_rgb(p).resize((imgsz, imgsz)) for p in posters[start:start + batch_size]]
            batch = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
            model(batch)
            out.append(torch.cat([pooled[i] for i in NECK], dim=1).numpy())
    return np.concatenate(out)


def tflite_rate(posters: list[bytes], batch_size: int = 16) -> float:
    """Posters/s of the default CPU detector (int8 TFLite at 640, boxes only) on the same posters."""
    from posterfusion.features.catalogue import decode_rgb
    from posterfusion.features.objects import DetectorConfig, load_detector

    detector = load_detector(DetectorConfig(device="cpu"))
    started = time.perf_counter()
    for start in range(0, len(posters), batch_size):
        detector.detect([decode_rgb(p) for p in posters[start:start + batch_size]])
    return len(posters) / (time.perf_counter() - started)


def inputs(frame, catalogue: Path, features: Path) -> dict[str, np.ndarray]:
    """Each stored input block, aligned with ``frame``'s rows."""
    from posterfusion.features.metadata import MetadataEncoder
    from posterfusion.features.objects import detector_id, load_object_features, recorded_detector
    from posterfusion.models.frozen import BackboneFeaturesConfig, backbone_store

    cached = backbone_store(catalogue / "cache", BackboneFeaturesConfig(
        backbone="mobilenet_v2", weights="mobilenet_v2_imagenet.safetensors", image_size=224))
    poster = cached.latest(["poster_sha256", "features"])["features"]
    stored = load_object_features(features, detector_id(recorded_detector(features)))
    keys = list(zip(frame["movie_id"], frame["poster_sha256"], strict=True))
    encoder = MetadataEncoder.fit(frame[frame["split"] == "train"])
    return {"poster": np.stack(poster.loc[frame["poster_sha256"]].to_list()),
            "metadata": encoder.transform(frame), "bag": np.stack(stored["objects"].loc[keys].to_list()),
            "detected": stored["detections"].loc[keys].map(len).to_numpy() > 0}


DECAYS = (1e-3, 1e-2, 1e-1, 1.0)  # the head's weight decay, chosen per candidate by 3-fold CV on training


def train_head(x: np.ndarray, y: np.ndarray, decay: float, epochs: int = 300, seed: int = 0):
    """A multi-label logistic head on standardised inputs: Adam, full batch, weight decay ``decay``."""
    import torch

    torch.manual_seed(seed)
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    optimiser = torch.optim.Adam(head.parameters(), lr=3e-3, weight_decay=decay)
    loss = torch.nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        optimiser.zero_grad()
        loss(head(x), y).backward()
        optimiser.step()
    return head


def predict(head, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.sigmoid(head(torch.as_tensor(x, dtype=torch.float32))).numpy()


def fitted_head(x: np.ndarray, y: np.ndarray):
    """The head at the weight decay 3-fold cross-validation on the training rows ranks best (macro ROC-AUC):
    every candidate gets its own regularisation, and validation is never looked at to pick it."""
    from posterfusion.models.metrics import macro_auc

    folds = np.arange(len(x)) % 3
    cv = {decay: np.mean([macro_auc(y[folds == k], predict(train_head(x[folds != k], y[folds != k], decay),
                                                            x[folds == k])) for k in range(3)])
          for decay in DECAYS}
    return train_head(x, y, max(cv, key=cv.get)), max(cv, key=cv.get)


def scores(blocks: dict[str, np.ndarray], names: tuple[str, ...], train: np.ndarray, labels: np.ndarray):
    x = np.concatenate([blocks[n] for n in names], axis=1).astype(np.float64)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-6
    x = (x - mean) / std
    head, decay = fitted_head(x[train], labels[train])
    print(f"  {' + '.join(names)}: {x.shape[1]} inputs, weight decay {decay:g} (CV on training)", flush=True)
    return predict(head, x[~train])


def report(results: dict[str, np.ndarray], labels: np.ndarray, genres: list[str], slices: dict[str, np.ndarray]):
    from posterfusion.models.metrics import macro_auc, main_genre_auc, paired_auc_per_genre, paired_bootstrap

    main6 = main_genre_auc(genres)
    print(f"\nvalidation: {len(labels)} posters; head per candidate trained on the training split")
    print(f"{'candidate':<24} {'macro':>6} {'main6':>6}   − '{BASE}': macro [95 %] per slice")
    for name, probs in results.items():
        line = f"{name:<24} {macro_auc(labels, probs):.4f} {main6(labels, probs):.4f}"
        if name not in (BASE, "poster"):
            for slice_name, rows in ({"all": np.ones(len(labels), bool)} | slices).items():
                gain = paired_bootstrap(labels[rows], probs[rows], results[BASE][rows], macro_auc, n_boot=1000)
                line += f"\n    {slice_name:<18} {gain['diff']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]"
        print(line)
    per_genre = paired_auc_per_genre(labels, results["+ yolo embedding"], results[BASE], n_boot=1000)
    print("\nper genre, + yolo embedding − poster + metadata (ROC-AUC, paired 95 %):")
    for genre, diff, low, high in zip(genres, per_genre["diff"], per_genre["low"], per_genre["high"], strict=True):
        if diff is not None and np.isfinite(diff):
            verdict = "helps" if low > 0 else "hurts" if high < 0 else ""
            print(f"  {genre:<12} {diff:+.3f} [{low:+.3f}, {high:+.3f}] {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalogue", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True, help="the object features of the catalogue")
    parser.add_argument("--genres-from", type=Path, required=True, help="a bundle trained on the catalogue")
    parser.add_argument("--imgsz", type=int, default=320, help="the YOLO embedding's input size")
    parser.add_argument("--cost-posters", type=int, default=128)
    parser.add_argument("--cache", type=Path, help="a .npy file keeping the embeddings between runs")
    args = parser.parse_args()

    from posterfusion.cluster import prepare_environment

    prepare_environment()  # Ultralytics offline, its settings under the project's state folder

    from posterfusion.jobs.evaluate import encode_labels, label_space
    from posterfusion.models.bundle import load_bundle

    frame = read_rows(args.catalogue)
    posters = frame["poster"].tolist()
    vocabulary = load_bundle(args.genres_from).vocabulary
    labels = encode_labels(vocabulary, frame, label_space(vocabulary, frame, same_source=True))
    blocks = inputs(frame, args.catalogue, args.features)  # before the long part: a missing input fails now
    if args.cache and args.cache.is_file():
        blocks["embedding"] = np.load(args.cache)
    else:
        blocks["embedding"] = timed_embeddings(posters, args)
        if args.cache:
            np.save(args.cache, blocks["embedding"])
    train = (frame["split"] == "train").to_numpy()
    results = {name: scores(blocks, parts, train, labels) for name, parts in CANDIDATES.items()}
    present = blocks["metadata"][~train][:, -1] > 0.5  # the encoder's last column: has_metadata
    detected = blocks["detected"][~train]
    slices = {"with metadata": present, "without metadata": ~present,
              "with objects": detected, "without objects": ~detected}
    report(results, labels[~train], vocabulary.genres, slices)


def timed_embeddings(posters: list[bytes], args) -> np.ndarray:
    """Every poster's YOLO embedding, the first ``cost_posters`` timed beside the TFLite detector on them."""
    started = time.perf_counter()
    embedding = yolo_embeddings(posters[: args.cost_posters], args.imgsz)
    yolo_rate = args.cost_posters / (time.perf_counter() - started)
    tflite = tflite_rate(posters[: args.cost_posters])
    print(f"cost on {args.cost_posters} posters: YOLO embedding (PyTorch, {args.imgsz} px) {yolo_rate:.1f} "
          f"posters/s, TFLite detector (int8, 640 px, boxes) {tflite:.1f} posters/s: the embedding takes "
          f"{tflite / yolo_rate:.2f}× the detector's time")
    started = time.perf_counter()
    embedding = np.concatenate([embedding, yolo_embeddings(posters[args.cost_posters:], args.imgsz)])
    print(f"YOLO embeddings of {len(posters)} posters: {time.perf_counter() - started:.0f} s, {embedding.shape[1]}-d")
    return embedding


if __name__ == "__main__":
    main()
