"""The driver's side of the data: labelled rows, vocabulary and encoders, the facts workers need, Ray Datasets.

The genre vocabulary, the metadata encoder and the object-vector statistics are fitted on the
training split only. Head epochs read backbone features extracted once
(:mod:`posterfusion.models.frozen`, cached per catalogue); fine-tuning epochs read posters
decoded once into fixed-size uint8 tensors held in Ray's object store, never the JPEGs again.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
from pydantic import BaseModel, ConfigDict, Field
from ray.data.expressions import col, lit
from ray.data.extensions import ArrowTensorArray

from posterfusion.errors import UserValueError
from posterfusion.features.catalogue import catalogue_files
from posterfusion.features.metadata import INPUT_FIELDS, MetadataEncoder
from posterfusion.features.object_encoding import classes_of_bag, encode_objects, presence_entry
from posterfusion.features.objects import (
    DetectorConfig,
    detector_id,
    load_object_features,
    recorded_detector,
    resolved_detector,
)
from posterfusion.features.presets import decode_poster
from posterfusion.features.vocab import GenreVocabulary
from posterfusion.jobs.train.config import DataFacts, TrainConfig
from posterfusion.models.bundle import load_bundle
from posterfusion.models.frozen import BackboneFeaturesConfig, ensure_backbone_features, load_backbone_features
from posterfusion.models.fusion import fit_text_weights


class Prepared(BaseModel):
    """The driver's view of the labelled data: frame, vocabulary, encoder, per-row side inputs."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    frame: pd.DataFrame
    vocabulary: GenreVocabulary
    encoder: MetadataEncoder
    sides: dict[str, np.ndarray] = Field(description="per row: labels, metadata, objects (zeros when unused)")
    object_dim: int
    detector: DetectorConfig | None
    detector_id: str | None
    skipped: dict[str, int]


def prepare(config: TrainConfig) -> Prepared:
    """Labelled rows, minus those the detector failed on or whose genres the vocabulary drops."""
    frame = load_labelled(config)
    detector, det_id, objects, skipped = resolve_detector(config), None, None, 0
    if detector is not None:
        frame, objects, det_id, skipped = object_matrix(config, frame, detector)
    vocabulary = GenreVocabulary.build(frame[frame["split"] == "train"]["genres"], config.data.vocab)
    if len(vocabulary.genres) < 2:
        raise UserValueError(f"the training split yields {len(vocabulary.genres)} genre(s) "
                             f"({', '.join(vocabulary.genres) or 'none'}) under min_count "
                             f"{config.data.vocab.min_count}: a multi-label model needs at least 2 (more posters, "
                             "or a lower data.vocab.min_count)")
    unlabelled = np.array([not vocabulary.map_genres(g) for g in frame["genres"]])
    if unlabelled.any():  # e.g. only N/A, or a genre the vocabulary keeps no trace of
        frame = frame[~unlabelled].reset_index(drop=True)
        objects = objects[~unlabelled] if objects is not None else None
    encoder = MetadataEncoder.fit(frame[frame["split"] == "train"], text_words=config.model.text_words)
    sides = {"labels": vocabulary.encode_many(frame["genres"]), "metadata": encoder.transform(frame),
             "objects": objects if objects is not None else np.zeros((len(frame), 1), np.float32)}
    return Prepared(frame=frame, vocabulary=vocabulary, encoder=encoder, sides=sides,
                    object_dim=0 if objects is None else objects.shape[1], detector=detector, detector_id=det_id,
                    skipped={"detect_failed": skipped, "no_vocabulary_genre": int(unlabelled.sum())})


def load_labelled(config: TrainConfig) -> pd.DataFrame:
    """Labelled rows without the poster bytes (those are read later by Ray Data)."""
    columns = ["movie_id", "poster_sha256", "genres", "labelled", "split", *INPUT_FIELDS]
    table = catalogue_files(config.data.catalogue).read(columns)
    frame = table.to_pandas()
    frame = frame[frame["labelled"]].reset_index(drop=True)
    limit = config.data.limit
    if limit is not None:
        train = frame[frame["split"] == "train"].head(limit)
        frame = pd.concat([train, frame[frame["split"] != "train"].head(max(8, limit // 4))])
    return frame.reset_index(drop=True)


def resolve_detector(config: TrainConfig) -> DetectorConfig | None:
    """The detector whose features a variant reads: as given, else the one the features dir recorded."""
    if not config.model.uses_objects:
        return None
    config.check_ready()  # the variant reads objects: the features dir must be given
    given = config.data.detector
    return resolved_detector(given) if given is not None else recorded_detector(config.data.features)


def object_matrix(config: TrainConfig, frame: pd.DataFrame, detector: DetectorConfig):
    """(frame without posters the detector failed on, their object vectors, detector id, skipped count).

    A poster without any stored row means the features job has not run on it: an error. One
    whose detection failed (an error row) is left out of training and counted in the summary.
    """
    det_id = detector_id(detector)
    table = load_object_features(config.data.features, det_id, include_errors=True)
    keys = list(zip(frame["movie_id"], frame["poster_sha256"], strict=True))
    missing = [k for k in keys if k not in table.index]
    if missing:
        raise UserValueError(f"{len(missing)} posters have no object features for {det_id} "
                             f"(e.g. {missing[0][0]}): run `posterfusion features` first")
    rows = table.loc[keys]
    keep = rows["objects"].notna().to_numpy()
    encoding, classes = config.model.object_encoding, classes_of_bag(len(rows["objects"][keep].iloc[0]))
    matrix = np.stack([np.asarray(bag, np.float32) if encoding == "bag" else encode_objects(found, classes, encoding)
                       for bag, found in zip(rows["objects"][keep], rows["detections"][keep], strict=True)])
    return frame[keep].reset_index(drop=True), matrix, det_id, int((~keep).sum())


def data_facts(config: TrainConfig, data: Prepared) -> DataFacts:
    """Label statistics, input widths and the 'no metadata' encoding, from the training split."""
    train = (data.frame["split"] == "train").to_numpy()
    labels, objects = data.sides["labels"][train], data.sides["objects"][train]
    names = data.encoder.feature_names()
    flags = [i for i, name in enumerate(names) if name.endswith("_missing") or name == "has_metadata"]
    fields = [([i for i, name in enumerate(names) if name == field or name.startswith(f"{field}=")],
               names.index(f"{field}_missing")) for field in data.encoder.fields]
    return DataFacts(genres=data.vocabulary.genres, object_dim=data.object_dim, metadata_dim=data.encoder.dim,
                     metadata_flags=flags, metadata_presence=names.index("has_metadata"), metadata_fields=fields,
                     text_span=data.encoder.text_span, text_weights=text_weights(config, data, train),
                     object_presence=presence_entry(data.object_dim, config.model.object_encoding)
                     if data.object_dim else None,
                     train_rows=int(train.sum()),
                     pos_weight=pos_weights(labels, config.optim.pos_weight_cap),
                     label_prior=labels.mean(axis=0).tolist(),
                     missing_metadata=data.encoder.transform_records([None])[0].tolist(),
                     object_mean=objects.mean(axis=0).tolist(), object_std=objects.std(axis=0).tolist(),
                     poster_version=poster_bundle_version(config, data.vocabulary.genres))


def text_weights(config: TrainConfig, data: Prepared, train: np.ndarray) -> list[list[float]] | None:
    """The overview's linear correction, fitted on the training split (residual fusion reading words only)."""
    span = data.encoder.text_span
    if span is None or config.model.fusion != "residual":
        return None
    words = data.sides["metadata"][train][:, span[0]:span[1]]
    return fit_text_weights(words, data.sides["labels"][train]).tolist()


def poster_bundle_version(config: TrainConfig, genres: list[str]) -> str | None:
    """The version of ``model.poster_from``'s bundle, once it is known to fit this run (else one clear error).

    It must be a ``cnn`` bundle of the same backbone, input size, hidden width and genres, with as many
    networks as this run has members (member i keeps its network i).
    """
    if not (source := config.model.poster_from):
        return None
    bundle, model = load_bundle(source), config.model
    theirs = bundle.config.model
    members = config.combine.members
    checks = [(theirs.variant == "cnn", f"its variant is {theirs.variant!r}, not 'cnn'"),
              (theirs.members == members, f"it holds {theirs.members} network(s), this run combine.members {members}"),
              (theirs.backbone == model.backbone, f"backbone {theirs.backbone!r} (this run: {model.backbone!r})"),
              (theirs.size == model.size, f"image size {theirs.size} (this run: {model.size})"),
              (theirs.hidden == model.hidden, f"hidden width {theirs.hidden} (this run: {model.hidden})"),
              (bundle.genres == genres, "it predicts other genres than this catalogue's")]
    if problems := [message for fine, message in checks if not fine]:
        raise UserValueError(f"model.poster_from {source}: {'; '.join(problems)}")
    return bundle.version


def backbone_features(config: TrainConfig, poster_version: str | None, member: int = 0) -> BackboneFeaturesConfig:
    """The stored features head epochs read: the starting weights' — or, under a kept poster path whose
    backbone trained, that network's own (member ``member`` of an ensemble), extracted once per bundle version."""
    model = config.model
    start = BackboneFeaturesConfig(backbone=model.backbone, weights=model.weights, image_size=model.size)
    if not model.poster_from:
        return start
    theirs = load_bundle(model.poster_from).config.model
    if theirs.freeze_backbone and theirs.weights == model.weights:
        return start  # its backbone is the starting weights: the same features, stored already
    return start.model_copy(update={"bundle": model.poster_from, "bundle_version": poster_version, "member": member})


def pos_weights(labels: np.ndarray, cap: float) -> list[float]:
    """negatives/positives per genre, capped (1 = no weighting): rare genres get more weight, but not unbounded."""
    positives = labels.sum(axis=0)
    return np.clip((len(labels) - positives) / np.maximum(positives, 1), 1.0, cap).tolist()


def feature_datasets(config: TrainConfig, data: Prepared, facts: DataFacts, member: int = 0) -> dict:
    """Ray Datasets of stored backbone features (plain + flipped) and side inputs, per split."""
    features = backbone_features(config, facts.poster_version, member)
    cache = config.data.cache_dir
    done = ensure_backbone_features(config.data.catalogue, cache, features)
    print(f"[train] backbone features {done['key']}: {done['computed']} extracted, "
          f"{done['catalogue_rows'] - done['computed']} cached ({done['seconds']:.0f} s)", flush=True)
    plain, flipped = load_backbone_features(cache, features, data.frame["poster_sha256"].tolist())
    out = {}
    for split in ("train", "val"):
        rows = np.flatnonzero((data.frame["split"] == split).to_numpy())
        columns = {"features": plain[rows], "flipped": flipped[rows], **{k: v[rows] for k, v in data.sides.items()}}
        out[f"{split}_features"] = _tensor_dataset(columns)
    return out


def _tensor_dataset(columns: dict[str, np.ndarray]):
    """A one-block Ray Dataset of numpy columns (a few MB of vectors: no need to spread them)."""
    return ray.data.from_arrow(pa.table({k: ArrowTensorArray.from_numpy(v) for k, v in columns.items()}))


def image_datasets(config: TrainConfig, data: Prepared) -> dict:
    """Ray Datasets of posters decoded once into uint8 ``size × size`` tensors + side inputs, per split.

    Materialised: every epoch iterates the decoded tensors in Ray's object store, never the JPEGs.
    """
    started = time.perf_counter()
    index = pd.Series(np.arange(len(data.frame)), index=data.frame["movie_id"].to_numpy())
    files = catalogue_files(config.data.catalogue)
    base = ray.data.read_parquet(files.paths, filesystem=files.filesystem, columns=["movie_id", "poster"],
                                 num_cpus=0.1)
    prepared = base.filter(expr=col("movie_id").is_in(data.frame["movie_id"].tolist())).map_batches(
        _decode_batch, batch_format="pandas", batch_size=64, num_cpus=0.5,
        fn_kwargs={"size": config.model.size, "index": index, "sides": data.sides,
                   "splits": data.frame["split"].to_numpy()}).materialize()
    out = {split: prepared.filter(expr=col("split") == lit(split)).drop_columns(["split"]).materialize()
           for split in ("train", "val")}
    print(f"[train] {prepared.count()} posters decoded once at {config.model.size} px for the fine-tuning epochs "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return out


def _decode_batch(batch: pd.DataFrame, size: int, index: pd.Series, sides: dict, splits: np.ndarray) -> dict:
    rows = index.loc[batch["movie_id"].to_numpy()].to_numpy()
    return {"image": np.stack([decode_poster(b, size).numpy() for b in batch["poster"]]),
            **{k: v[rows] for k, v in sides.items()}, "split": splits[rows]}
