"""``posterfusion train``: fine-tune the fusion network with Ray Train and write a calibrated bundle.

Driver: read the catalogue's labelled rows, build the genre vocabulary and fit the metadata
encoder and the object-vector statistics on the training split only, then prepare the data
the run needs — backbone features extracted once (:mod:`posterfusion.models.frozen`, cached
per catalogue) for head epochs, posters decoded once into fixed-size uint8 tensors and held in
Ray's object store for fine-tuning epochs — and hand them to a ``TorchTrainer``. After
training it fits the calibration on the best epoch's validation logits
(:mod:`posterfusion.models.calibration`), tunes thresholds on the calibrated probabilities and
writes the bundle.

Fine-tuning as the field does it, in two phases: ``warmup_epochs`` train the head on the
frozen backbone's features (a fresh head's large gradients would otherwise wreck the
pretrained filters), then the whole network trains with the backbone at a lower learning rate
(``backbone_lr``) and the warmed-up head at ``finetune_head_lr`` (restarting it at its warm-up
rate undid the warm-up on 2 of 3 seeds: docs/results.md), on augmented posters
(``TrainPreset``). ``mode="frozen"`` stops after the first phase: every epoch is a head
epoch (the fast CPU path, and the baseline fine-tuning must beat). Each phase warms its
learning rate up, then decays it on a cosine.

Workers (``train_loop``): DDP via ``prepare_model``, BCE-with-logits (optionally with
per-genre ``pos_weight``, undone later by the calibration's logit adjustment), metadata
dropout (a sample's whole metadata block replaced by the encoding of "no metadata", so the
model serves clients who send none), autocast, validation gathered across workers, early
stopping within the last phase, a checkpoint each epoch holding everything needed to resume.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from posterfusion.errors import UserValueError
from posterfusion.features.metadata import FIELDS as META_COLUMNS
from posterfusion.features.objects import DetectorConfig
from posterfusion.features.vocab import VocabConfig
from posterfusion.models.fusion import VARIANTS, FusionConfig, Variant
from posterfusion.models.hardware import Amp


class TrainConfig(BaseModel):
    """Everything a training run is decided by; recipes (:mod:`posterfusion.jobs.recipes`) fill it in."""

    model_config = ConfigDict(extra="forbid")

    catalogue: Path
    out: Path = Field(description="bundle directory to write")
    features: Path | None = Field(None, description="object features dir (`posterfusion features --out`)")
    detector: DetectorConfig | None = Field(None, description="default: the one the features dir recorded")
    recipe: str | None = Field(None, description="the recipe these settings came from (recorded in the bundle)")
    notes: list[str] = Field(default_factory=list, description="what the recipe had to change on this machine")
    backbone: str = "mobilenet_v2"
    weights: str = Field("none", description="'none', 'imagenet' (torchvision download) or a weights file")
    variant: Variant = "fused"
    fusion: Literal["concat", "gated"] = "concat"
    mode: Literal["finetune", "frozen"] = Field("finetune", description="frozen: only the head ever trains")
    image_size: int | None = Field(None, ge=32, description="default: the backbone's native size")
    epochs: int = Field(10, ge=1, description="all epochs, head warm-up included")
    warmup_epochs: int = Field(0, ge=0, description="head-only epochs on frozen backbone features first")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the head")
    backbone_lr: float = Field(2e-4, gt=0, description="peak learning rate of the backbone when it trains")
    finetune_head_lr: float | None = Field(None, gt=0, description="peak learning rate of the head once the "
                                           "backbone trains (None: lr); a head already warmed up on frozen "
                                           "features need not restart at its full rate")
    train_stages: int | None = Field(None, ge=1, description="fine-tune only the backbone's last N stages "
                                     "(None: all); frozen stages cost no gradients")
    members: int = Field(1, ge=1, description="fine-tuning runs from the one warmed-up head (seeds seed + 1000·i)")
    combine: Literal["ensemble", "soup"] = Field(
        "ensemble", description="how several members become one bundle: 'ensemble' keeps them all and averages "
        "their logits (their shared frozen backbone stages run once); 'soup' greedily averages their weights "
        "(one network's inference cost)")
    weight_decay: float = Field(1e-2, ge=0)
    dropout: float = Field(0.3, ge=0, lt=1)
    hidden: int = Field(256, ge=1)
    patience: int = Field(3, ge=1, description="epochs without val macro AUC gain before stopping")
    pos_weight_cap: float = Field(1.0, ge=1.0, description="per-genre neg/pos loss weight cap; 1 = unweighted")
    metadata_dropout: float = Field(0.0, ge=0, le=1, description="share of training samples seen without metadata")
    augment: bool = Field(True, description="random crops, flips and light colour jitter while fine-tuning")
    freeze_bn: bool | None = Field(None, description="keep backbone BatchNorms in eval mode; default: when pretrained")
    workers: int = Field(1, ge=1)
    gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0, description="default: a share of the cluster's CPUs")
    amp: Amp = "auto"
    max_failures: int = Field(2, ge=0)
    storage_path: Path | None = Field(None, description="Ray Train results (default: OUT/../ray_results)")
    cache: Path | None = Field(None, description="backbone-feature cache (default: CATALOGUE/cache)")
    vocab: VocabConfig = Field(default_factory=VocabConfig)
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="use at most this many training rows (quick runs)")

    @model_validator(mode="after")
    def _stored_features_need_fixed_weights(self) -> TrainConfig:
        """Head epochs train on features extracted once; a random backbone would differ in every process."""
        if self.weights == "none" and (self.mode == "frozen" or self.warmup_epochs):
            raise ValueError("frozen mode and head warm-up train on stored backbone features, which need "
                             "pretrained weights (--weights FILE or imagenet); from scratch, use mode finetune "
                             "with no warm-up")
        return self

    @model_validator(mode="after")
    def _members_need_a_shared_warm_up(self) -> TrainConfig:
        """Members start from one warmed-up head: weights average well only between runs that left one
        starting point, and an ensemble's members share the stages that checkpoint froze."""
        if self.members > 1 and not (self.mode == "finetune" and 0 < self.warmup_epochs < self.epochs):
            raise ValueError("members > 1 fine-tune from one warmed-up head: they need mode finetune and "
                             "0 < warmup_epochs < epochs")
        return self

    @model_validator(mode="after")
    def _only_what_the_variant_reads(self) -> TrainConfig:
        """A variant without objects reads no features: record none, so equal runs have equal configs."""
        if not VARIANTS[self.variant].objects:
            self.features = self.detector = None
        return self

    @property
    def size(self) -> int:
        from posterfusion.models.backbones import backbone_class

        return self.image_size or backbone_class(self.backbone).native_size

    @property
    def head_epochs(self) -> int:
        return self.epochs if self.mode == "frozen" else min(self.warmup_epochs, self.epochs)

    @property
    def cache_dir(self) -> Path:
        return self.cache or self.catalogue / "cache"

    def fusion_config(self, num_genres: int, object_dim: int, metadata_dim: int, flags: list[int]) -> FusionConfig:
        return FusionConfig(backbone=self.backbone, weights=self.weights, variant=self.variant, fusion=self.fusion,
                            num_genres=num_genres, object_dim=object_dim, metadata_dim=metadata_dim,
                            metadata_flags=flags, hidden=self.hidden, dropout=self.dropout,
                            freeze_backbone=self.mode == "frozen",
                            freeze_bn=self.weights != "none" if self.freeze_bn is None else self.freeze_bn)


class LoopConfig(BaseModel):
    """What each worker needs: plain values only (it travels to the workers)."""

    model: FusionConfig
    image_size: int
    epochs: int
    head_epochs: int
    batch_size: int
    lr: float
    backbone_lr: float
    finetune_head_lr: float
    train_stages: int | None
    weight_decay: float
    patience: int
    pos_weight: list[float]
    label_prior: list[float]
    train_rows: int
    threads: int
    amp: Amp
    augment: bool
    seed: int
    metadata_dropout: float
    missing_metadata: list[float]
    object_mean: list[float]
    object_std: list[float]
    stop_after: int | None = Field(None, description="stop after this epoch (the members' shared head warm-up)")
    start_from: str | None = Field(None, description="checkpoint to continue from (a member: the shared warm-up's)")
    log_level: str = Field("WARNING", description="the workers' root logger (Ray Train sets it to INFO)")


class Prepared(BaseModel, arbitrary_types_allowed=True):
    """The driver's view of the labelled data: frame, vocabulary, encoders, side features."""

    frame: pd.DataFrame
    vocabulary: object
    encoder: object
    objects: np.ndarray | None
    sides: dict[str, np.ndarray] = Field(description="per row: labels, metadata, objects (see _side_inputs)")
    detector: DetectorConfig | None
    detector_id: str | None
    skipped: dict[str, int]


# --- driver side -----------------------------------------------------------------------------


def load_labelled(catalogue: Path, limit: int | None) -> pd.DataFrame:
    """Labelled rows without the poster bytes (those are read later by Ray Data)."""
    import pyarrow.dataset as pads

    from posterfusion.features.catalogue import catalogue_files

    columns = ["movie_id", "poster_sha256", "genres", "labelled", "split", *META_COLUMNS]
    frame = pads.dataset(catalogue_files(catalogue), format="parquet").to_table(columns=columns).to_pandas()
    frame = frame[frame["labelled"]].reset_index(drop=True)
    if limit is not None:
        train = frame[frame["split"] == "train"].head(limit)
        frame = pd.concat([train, frame[frame["split"] != "train"].head(max(8, limit // 4))])
    return frame.reset_index(drop=True)


def resolve_detector(config: TrainConfig) -> DetectorConfig | None:
    """The detector whose features a variant reads: as given, else the one the features dir recorded."""
    if not VARIANTS[config.variant].objects:
        return None
    if config.features is None:
        raise UserValueError(f"variant {config.variant!r} reads object features: pass --features "
                         "(run `posterfusion features` first)")
    from posterfusion.features.objects import recorded_detector, resolved_detector

    return resolved_detector(config.detector) if config.detector is not None else recorded_detector(config.features)


def object_matrix(config: TrainConfig, frame: pd.DataFrame, detector: DetectorConfig):
    """(frame without posters the detector failed on, their object vectors, detector id, skipped count).

    A poster without any stored row means the features job has not run on it: an error. One
    whose detection failed (an error row) is left out of training and counted in the summary.
    """
    from posterfusion.features.objects import detector_id, load_object_features

    det_id = detector_id(detector)
    table = load_object_features(config.features, det_id, include_errors=True)
    keys = list(zip(frame["movie_id"], frame["poster_sha256"], strict=True))
    missing = [k for k in keys if k not in table.index]
    if missing:
        raise UserValueError(f"{len(missing)} posters have no object features for {det_id} "
                         f"(e.g. {missing[0][0]}): run `posterfusion features` first")
    vectors = table.loc[keys, "objects"].to_list()
    keep = np.array([v is not None for v in vectors])
    matrix = np.stack([np.asarray(v, np.float32) for v, k in zip(vectors, keep, strict=True) if k])
    return frame[keep].reset_index(drop=True), matrix, det_id, int((~keep).sum())


def prepare(config: TrainConfig) -> Prepared:
    from posterfusion.features.metadata import MetadataEncoder
    from posterfusion.features.vocab import GenreVocabulary

    frame = load_labelled(config.catalogue, config.limit)
    detector, det_id, objects, skipped = resolve_detector(config), None, None, 0
    if detector is not None:
        frame, objects, det_id, skipped = object_matrix(config, frame, detector)
    train = frame[frame["split"] == "train"]
    vocabulary = GenreVocabulary.build(train["genres"], config.vocab)
    if len(vocabulary.genres) < 2:
        raise UserValueError(f"the training split yields {len(vocabulary.genres)} genre(s) "
                             f"({', '.join(vocabulary.genres) or 'none'}) under min_count {config.vocab.min_count}: "
                             "a multi-label model needs at least 2 (more posters, or a lower vocab min_count)")
    unlabelled = np.array([not vocabulary.map_genres(g) for g in frame["genres"]])
    if unlabelled.any():  # e.g. only N/A, or a genre the vocabulary keeps no trace of
        frame = frame[~unlabelled].reset_index(drop=True)
        objects = objects[~unlabelled] if objects is not None else None
    encoder = MetadataEncoder.fit(frame[frame["split"] == "train"])
    return Prepared(frame=frame, vocabulary=vocabulary, encoder=encoder, objects=objects,
                    sides=_side_inputs(frame, vocabulary, encoder, objects), detector=detector, detector_id=det_id,
                    skipped={"detect_failed": skipped, "no_vocabulary_genre": int(unlabelled.sum())})


def pos_weights(labels: np.ndarray, cap: float) -> list[float]:
    """negatives/positives per genre, capped (1 = no weighting): rare genres get more weight, but not unbounded."""
    positives = labels.sum(axis=0)
    return np.clip((len(labels) - positives) / np.maximum(positives, 1), 1.0, cap).tolist()


def _side_inputs(frame: pd.DataFrame, vocabulary, encoder, objects: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per labelled row: multi-hot labels, encoded metadata, object vectors (zeros when unused)."""
    return {"labels": vocabulary.encode_many(frame["genres"]), "metadata": encoder.transform(frame),
            "objects": objects if objects is not None else np.zeros((len(frame), 1), np.float32)}


def feature_datasets(config: TrainConfig, data: Prepared) -> dict:
    """Ray Datasets of stored backbone features (plain + flipped) and side inputs, per split."""
    from posterfusion.models.frozen import BackboneFeaturesConfig, ensure_backbone_features, load_backbone_features

    features = BackboneFeaturesConfig(backbone=config.backbone, weights=config.weights, image_size=config.size)
    done = ensure_backbone_features(config.catalogue, config.cache_dir, features)
    print(f"[train] backbone features {done['key']}: {done['computed']} extracted, "
          f"{done['catalogue_rows'] - done['computed']} cached ({done['seconds']:.0f} s)", flush=True)
    plain, flipped = load_backbone_features(config.cache_dir, features, data.frame["poster_sha256"].tolist())
    sides = data.sides
    out = {}
    for split in ("train", "val"):
        rows = np.flatnonzero((data.frame["split"] == split).to_numpy())
        columns = {"features": plain[rows], "flipped": flipped[rows], **{k: v[rows] for k, v in sides.items()}}
        out[f"{split}_features"] = _tensor_dataset(columns)
    return out


def _tensor_dataset(columns: dict[str, np.ndarray]):
    """A one-block Ray Dataset of numpy columns (a few MB of vectors: no need to spread them)."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    return ray.data.from_arrow(pa.table({k: ArrowTensorArray.from_numpy(v) for k, v in columns.items()}))


def image_datasets(config: TrainConfig, data: Prepared) -> dict:
    """Ray Datasets of posters decoded once into uint8 ``size × size`` tensors + side inputs, per split.

    Materialised: every epoch iterates the decoded tensors in Ray's object store, never the JPEGs.
    """
    import ray
    from ray.data.expressions import col, lit

    from posterfusion.features.catalogue import catalogue_files

    started = time.perf_counter()
    sides = data.sides
    by_id = {"index": pd.Series(np.arange(len(data.frame)), index=data.frame["movie_id"].to_numpy())}
    base = ray.data.read_parquet(catalogue_files(config.catalogue), columns=["movie_id", "poster"], num_cpus=0.1)
    prepared = base.filter(expr=col("movie_id").is_in(data.frame["movie_id"].tolist())).map_batches(
        _decode_batch, batch_format="pandas", batch_size=64, num_cpus=0.5,
        fn_kwargs={"size": config.size, "index": by_id["index"], "sides": sides,
                   "splits": data.frame["split"].to_numpy()}).materialize()
    out = {split: prepared.filter(expr=col("split") == lit(split)).drop_columns(["split"]).materialize()
           for split in ("train", "val")}
    print(f"[train] {prepared.count()} posters decoded once at {config.size} px for the fine-tuning epochs "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return out


def _decode_batch(batch: pd.DataFrame, size: int, index: pd.Series, sides: dict, splits: np.ndarray) -> dict:
    from posterfusion.features.presets import decode_poster

    rows = index.loc[batch["movie_id"].to_numpy()].to_numpy()
    return {"image": np.stack([decode_poster(b, size).numpy() for b in batch["poster"]]),
            **{k: v[rows] for k, v in sides.items()}, "split": splits[rows]}


def _worker_resources(config: TrainConfig) -> tuple[float, int]:
    from posterfusion.cluster import cpu_budget, node_cpus

    total = cpu_budget()
    largest = max(node_cpus(), default=total)  # a worker lives on one node: asking more never schedules
    per_worker = config.cpus_per_worker or max(0.1, min(total * 0.8 / config.workers, largest * 0.8, 8.0))
    return per_worker, max(1, round(min(total / config.workers, largest)))


def loop_config(config: TrainConfig, data: Prepared) -> LoopConfig:
    from posterfusion.cluster.console import train_logging_level

    sides = data.sides
    train = (data.frame["split"] == "train").to_numpy()
    labels = sides["labels"][train]
    objects = sides["objects"][train]
    flags = [i for i, name in enumerate(data.encoder.feature_names())
             if name.endswith("_missing") or name == "has_metadata"]
    model = config.fusion_config(len(data.vocabulary.genres), data.objects.shape[1] if data.objects is not None else 0,
                                 data.encoder.dim, flags)
    return LoopConfig(
        model=model, image_size=config.size, epochs=config.epochs, head_epochs=config.head_epochs,
        batch_size=config.batch_size, lr=config.lr, backbone_lr=config.backbone_lr,
        finetune_head_lr=config.finetune_head_lr or config.lr, train_stages=config.train_stages,
        weight_decay=config.weight_decay, patience=config.patience,
        pos_weight=pos_weights(labels, config.pos_weight_cap), label_prior=labels.mean(axis=0).tolist(),
        train_rows=int(train.sum()), threads=_worker_resources(config)[1], amp=config.amp, augment=config.augment,
        seed=config.seed, metadata_dropout=config.metadata_dropout,
        missing_metadata=data.encoder.transform_records([None])[0].tolist(),
        object_mean=objects.mean(axis=0).tolist(), object_std=objects.std(axis=0).tolist(),
        log_level=train_logging_level())


def run_train(config: TrainConfig) -> dict:
    """Train, pick the best checkpoint (or combine the members'), calibrate, write the bundle; return the summary."""
    started = time.perf_counter()
    data = prepare(config)
    loop = loop_config(config, data)
    datasets = feature_datasets(config, data) if loop.head_epochs else {}
    if loop.head_epochs < loop.epochs:
        datasets |= image_datasets(config, data)
    if config.members == 1:
        result = fit(config, loop, datasets)
        trained = best_of(result) | {"run_path": result.path}
    else:
        combine = soup if config.combine == "soup" else ensemble
        trained = combine(loop, datasets, data.vocabulary.genres, *train_members(config, loop, datasets))
    return _write_bundle(config, loop, data, trained, time.perf_counter() - started)


def fit(config: TrainConfig, loop: LoopConfig, datasets: dict):
    """One Ray Train run of ``train_loop`` (a fresh run name: Ray Train resumes a name it has seen)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from posterfusion.cluster.console import train_logging_level

    storage = (config.storage_path or config.out.parent / "ray_results").resolve()
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop.model_dump(mode="json"), datasets=datasets,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpu,
                                     resources_per_worker={"CPU": _worker_resources(config)[0]}),
        run_config=RunConfig(
            name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_macro_auc",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=config.max_failures),
            logging_config=LoggingConfig(log_level=train_logging_level())),
    )
    return trainer.fit()


def best_of(result) -> dict:
    """The run's best epoch: its weights, validation logits and labels, and the whole history."""
    import torch

    best = result.get_best_checkpoint(metric="val_macro_auc", mode="max")
    if best is None:
        raise RuntimeError(f"training reported no checkpoint (error: {result.error})")
    with best.as_directory() as directory:
        saved = torch.load(Path(directory) / "state.pt", weights_only=True, map_location="cpu")
        with np.load(Path(directory) / "validation.npz") as val:
            logits, labels = val["logits"], val["labels"]
    with result.checkpoint.as_directory() as directory:  # the latest holds the whole history
        history = torch.load(Path(directory) / "state.pt", weights_only=True, map_location="cpu")["history"]
    # the chosen checkpoint's own epoch: a soup member's history also holds the warm-up epochs it started from
    return {"state": saved["model"], "logits": logits, "labels": labels, "history": history,
            "best": saved["history"][-1]}


def train_members(config: TrainConfig, loop: LoopConfig, datasets: dict) -> tuple[str, list[dict]]:
    """The head warms up once on frozen features; each of ``config.members`` runs fine-tunes from that
    one checkpoint with its own seed (data order, augmentation, dropout, metadata dropout).

    Returns the warm-up's run path and the members (best checkpoint of each, in seed order).
    """
    warm = fit(config, loop.model_copy(update={"stop_after": loop.head_epochs}), datasets)
    if warm.checkpoint is None:
        raise RuntimeError(f"the members' head warm-up reported no checkpoint (error: {warm.error})")
    members = []
    for i in range(config.members):
        seed = loop.seed + 1000 * i
        result = fit(config, loop.model_copy(update={"seed": seed, "start_from": warm.checkpoint.path}), datasets)
        members.append(best_of(result) | {"seed": seed, "run_path": result.path})
    return warm.path, members


def soup(loop: LoopConfig, datasets: dict, genres: list[str], warm_path: str, members: list[dict]) -> dict:
    """A greedy model soup (Wortsman et al., 2022) of the members.

    Members sorted by their validation macro AUC, the best is the soup; each next one is averaged
    in only if the averaged weights score higher on validation. Models fine-tuned from one
    starting point often average into one better than each, at one model's inference cost; on
    this project's posters the average landed between its two members (docs/results.md), so no
    recipe uses it.
    """
    members = sorted(members, key=lambda m: -m["best"]["val_macro_auc"])
    chosen, current = [members[0]], members[0]
    for member in members[1:]:
        candidate = average_states([m["state"] for m in [*chosen, member]])
        record, logits, labels = validate_model(_loaded(training_model(loop), candidate), loop, datasets["val"])
        _say(f"[train] soup of seeds {[m['seed'] for m in [*chosen, member]]}: val macro AUC "
             f"{record['val_macro_auc']:.4f} (so far {current['best']['val_macro_auc']:.4f})")
        if record["val_macro_auc"] > current["best"]["val_macro_auc"]:
            chosen.append(member)
            current = {"state": candidate, "logits": logits, "labels": labels,
                       "best": record | {"epoch": f"soup of {len(chosen)}", "phase": "soup"}}
    return current | {"history": members[0]["history"], "run_path": warm_path,
                      "members": {"combine": "soup", "chosen": [m["seed"] for m in chosen],
                                  "runs": [_member_summary(m, loop, genres) for m in members]}}


def ensemble(loop: LoopConfig, datasets: dict, genres: list[str], warm_path: str, members: list[dict]) -> dict:
    """All members in one bundle, their logits averaged (:class:`~posterfusion.models.ensemble.EnsembleNet`).

    The stages every member left frozen are found in their weights and run once; the
    ensemble is validated on the driver as it will be bundled, and calibration is fitted on
    those logits (an average of calibrated members would not be calibrated itself).
    """
    import torch

    from posterfusion.models.ensemble import EnsembleNet, ensemble_state, members_shared_stages

    states = [m["state"] for m in members]
    model_config = loop.model.model_copy(update={"members": len(members),
                                                 "shared_stages": members_shared_stages(loop.model, states)})
    model = _loaded(EnsembleNet(model_config, load_weights=False), ensemble_state(states))
    record, logits, labels = validate_model(model.to(memory_format=torch.channels_last), loop, datasets["val"])
    alone = ", ".join(f"{m['best']['val_macro_auc']:.4f}" for m in members)
    _say(f"[train] ensemble of seeds {[m['seed'] for m in members]} ({model_config.shared_stages} backbone stages "
         f"shared): val macro AUC {record['val_macro_auc']:.4f} (members alone {alone})")
    return {"state": model.state_dict(), "logits": logits, "labels": labels, "model": model_config,
            "best": record | {"epoch": f"ensemble of {len(members)}", "phase": "ensemble"},
            "history": members[0]["history"], "run_path": warm_path,
            "members": {"combine": "ensemble", "chosen": [m["seed"] for m in members],
                        "runs": [_member_summary(m, loop, genres) for m in members]}}


def average_states(states: list[dict]) -> dict:
    """The element-wise mean of state dicts of one architecture (integer buffers: the first's)."""
    return {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


def _loaded(model, state: dict):
    model.load_state_dict(state)
    return model


def validate_model(model, loop: LoopConfig, val_dataset):
    """``validate`` on the driver, on the decoded validation posters (a soup or an ensemble is in no worker)."""
    import torch

    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(loop.pos_weight))
    batches = val_dataset.iter_torch_batches(batch_size=loop.batch_size)
    return validate(model, loss_fn, loop, torch.device("cpu"), "full", batches)


def _member_summary(member: dict, loop: LoopConfig, genres: list[str]) -> dict:
    """A member alone, as it would have been bundled: best epoch, calibrated validation metrics."""
    _, calibrated = calibrate(member["logits"], member["labels"], loop)
    validation = validation_summary(member["labels"], calibrated, np.asarray(loop.label_prior), genres)
    return {"seed": member["seed"], "best": member["best"], "history": member["history"],
            "run_path": member["run_path"], "validation": validation}


def calibrate(logits: np.ndarray, labels: np.ndarray, loop: LoopConfig):
    """(the calibration fitted on validation logits, after undoing the loss's pos_weight shift; their probabilities)."""
    from posterfusion.models.calibration import Calibration

    calibration = Calibration.fit(logits, labels, np.log(np.asarray(loop.pos_weight)))
    return calibration, calibration.probabilities(logits)


def _write_bundle(config: TrainConfig, loop: LoopConfig, data: Prepared, trained: dict, seconds: float) -> dict:
    from posterfusion.features.catalogue import catalogue_identity
    from posterfusion.models.bundle import BundleConfig, save_bundle
    from posterfusion.models.metrics import tune_thresholds

    logits, labels, history = trained["logits"], trained["labels"], trained["history"]
    calibration, calibrated = calibrate(logits, labels, loop)
    genres = data.vocabulary.genres
    thresholds = dict(zip(genres, tune_thresholds(labels, calibrated).tolist(), strict=True))
    metrics = {"best": trained["best"], "history": history, "seconds": round(seconds, 1),
               "validation": validation_summary(labels, calibrated, np.asarray(loop.label_prior), genres),
               "run_path": trained["run_path"], "train_rows": loop.train_rows, "workers": config.workers,
               "pos_weight": loop.pos_weight, "skipped": data.skipped}
    if "members" in trained:
        metrics["members"] = trained["members"]
    bundle = BundleConfig(model=trained.get("model", loop.model), image_size=loop.image_size, detector=data.detector,
                          detector_id=data.detector_id, recipe=config.recipe,
                          train=config.model_dump(mode="json"), catalogue=catalogue_identity(config.catalogue))
    save_bundle(config.out, config=bundle, state_dict=trained["state"], vocabulary=data.vocabulary,
                encoder=data.encoder, thresholds=thresholds, calibration=calibration, metrics=metrics)
    return metrics | {"bundle": str(config.out), "genres": genres, "final_epoch": history[-1]["epoch"],
                      "recipe": config.recipe, "notes": config.notes}


def validation_summary(labels: np.ndarray, probabilities: np.ndarray, prior: np.ndarray, genres: list[str]) -> dict:
    """The calibrated best model on validation beside the label prior: ranking metrics and ECE."""
    from posterfusion.models.calibration import expected_calibration_error
    from posterfusion.models.evaluation import main_genre_auc, ranking_metrics

    prior_scores = np.tile(prior, (len(labels), 1))
    model, baseline = ranking_metrics(labels, probabilities), ranking_metrics(labels, prior_scores)
    keys = ("roc_auc_macro", "roc_auc_micro", "hit@3", "top_n_ratio")
    return {"model": {k: model[k] for k in keys} | {"ece": expected_calibration_error(labels, probabilities)[0],
                                                    "roc_auc_main6": main_genre_auc(genres)(labels, probabilities)},
            "label_prior": {k: baseline[k] for k in keys}}


def format_train_summary(summary: dict) -> str:
    best, val = summary["best"], summary["validation"]
    model, prior = val["model"], val["label_prior"]
    skipped = {k: v for k, v in summary.get("skipped", {}).items() if v}
    return "\n".join([
        f"train{' [' + summary['recipe'] + ']' if summary.get('recipe') else ''}: best epoch "
        f"{best['epoch']}/{summary['final_epoch']}, {summary['train_rows']} train posters, "
        f"{len(summary['genres'])} genres, {summary['seconds']:.0f} s → {summary['bundle']}",
        f"  validation (calibrated): macro ROC-AUC {model['roc_auc_macro']:.3f} (6 main genres "
        f"{model['roc_auc_main6']:.3f}), hit@3 {model['hit@3']:.3f} "
        f"(label prior {prior['hit@3']:.3f}), top-n {model['top_n_ratio']:.3f} (prior {prior['top_n_ratio']:.3f}), "
        f"ECE {model['ece']:.3f}" + (f"; skipped {skipped}" if skipped else ""),
        *[f"  note: {note}" for note in summary.get("notes", [])],
    ])


# --- worker side -----------------------------------------------------------------------------


def train_loop(raw_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import torch

    config = LoopConfig.model_validate(raw_config)
    # Ray Train logs every report at INFO through a logger outside ``ray.train`` (its file path),
    # so only the root level keeps those lines off a quiet console.
    logging.getLogger().setLevel(config.log_level)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    context = ray.train.get_context()
    model, device = _prepare_model(config)
    optimizer = make_optimizer(model, config)
    steps = max(1, math.ceil(config.train_rows / (config.batch_size * context.get_world_size())))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedules(config, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and config.amp == "fp16")
    state = _resume(model, optimizer, scheduler, scaler, config.start_from)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(config.pos_weight, device=device))
    for epoch in range(state["epoch"] + 1, (config.stop_after or config.epochs) + 1):
        phase = "head" if epoch <= config.head_epochs else "full"
        started = time.perf_counter()
        train = _batches("train_features" if phase == "head" else "train", config, device, shuffle=True)
        train_loss, seen = train_epoch(model, optimizer, scheduler, scaler, loss_fn, config, device, phase, epoch,
                                       train)
        trained = time.perf_counter()
        val = _batches("val_features" if phase == "head" else "val", config, device, shuffle=False)
        metrics, logits, labels = validate(model, loss_fn, config, device, phase, val)
        record = {"epoch": epoch, "phase": phase, "train_loss": train_loss, **metrics,
                  "lr": scheduler.get_last_lr()[-1],
                  "samples_per_s": seen * context.get_world_size() / (trained - started),  # training alone
                  "train_seconds": trained - started, "seconds": time.perf_counter() - started}
        state = _advance(state, record, last_phase=epoch > config.head_epochs or config.head_epochs == config.epochs)
        _report(model, optimizer, scheduler, scaler, state, context, logits, labels)
        if state["bad_epochs"] >= config.patience:
            break


def training_model(config: LoopConfig):
    """The network as training starts it: object statistics set, only the trained stages with gradients.

    In channels-last memory: the convolution layout oneDNN and cuDNN are fastest in (with bf16,
    2.8× the fp32 contiguous fine-tuning speed of MobileNetV2 on this project's CPU, measured).
    """
    import torch

    from posterfusion.models.fusion import build_model

    model = build_model(config.model).to(memory_format=torch.channels_last)
    model.set_object_statistics(config.object_mean, config.object_std)
    if not config.model.freeze_backbone:
        model.backbone.train_last_stages(config.train_stages)
    return model


def _prepare_model(config: LoopConfig):
    import ray.train.torch

    # head epochs leave the backbone without gradients: DDP must be told some parameters may be unused
    kwargs = {"find_unused_parameters": True} if 0 < config.head_epochs < config.epochs else {}
    model = ray.train.torch.prepare_model(training_model(config), parallel_strategy_kwargs=kwargs)
    return model, ray.train.torch.get_device()


def _unwrap(model):
    return getattr(model, "module", model)


def make_optimizer(model, config: LoopConfig):
    """AdamW with two groups: the backbone (its own, lower rate) and everything else (the head)."""
    import torch

    net = _unwrap(model)
    backbone = [p for p in net.backbone.parameters() if p.requires_grad]
    head = [p for name, p in net.named_parameters() if not name.startswith("backbone.") and p.requires_grad]
    return torch.optim.AdamW([{"params": backbone, "lr": config.backbone_lr}, {"params": head, "lr": config.lr}],
                             weight_decay=config.weight_decay)


def lr_schedules(config: LoopConfig, steps_per_epoch: int):
    """Per-group LR multipliers over global steps: each phase warms up (5 %), then decays on a cosine.

    The backbone's multiplier is 0 during head epochs (it receives no gradients there anyway); the
    head's peak in the fine-tuning phase is ``finetune_head_lr`` (a multiplier of its base rate ``lr``).
    """
    finetune_scale = config.finetune_head_lr / config.lr
    head_steps = config.head_epochs * steps_per_epoch
    full_steps = (config.epochs - config.head_epochs) * steps_per_epoch

    def phase(step: int, length: int) -> float:
        if length == 0:  # past the last step (the scheduler steps once more than it is read)
            return 0.02
        warm = max(1, int(0.05 * length))
        if step < warm:
            return (step + 1) / warm
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, length - warm))))

    def head(step: int) -> float:
        return phase(step, head_steps) if step < head_steps else finetune_scale * phase(step - head_steps, full_steps)

    def backbone(step: int) -> float:
        return 0.0 if step < head_steps else phase(step - head_steps, full_steps)

    return [backbone, head]


def _resume(model, optimizer, scheduler, scaler, start_from: str | None = None) -> dict:
    """Continue from this run's last checkpoint (after a worker failure), else from ``start_from`` (a
    member: the shared warm-up's), else start at epoch 0."""
    import ray.train
    import torch

    checkpoint, origin = ray.train.get_checkpoint(), "resumed from"
    if checkpoint is None and start_from is not None:
        checkpoint, origin = ray.train.Checkpoint(start_from), "fine-tunes from the warmed-up head of"
    if checkpoint is None:
        return {"epoch": 0, "best": -1.0, "bad_epochs": 0, "history": []}
    with checkpoint.as_directory() as directory:
        saved = torch.load(Path(directory) / "state.pt", weights_only=True, map_location="cpu")
    _unwrap(model).load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    _say(f"[train] {origin} the epoch-{saved['epoch']} checkpoint")
    return {k: saved[k] for k in ("epoch", "best", "bad_epochs", "history")} | {"resumed_from": saved["epoch"]}


def _say(line: str) -> None:
    """A progress line from rank 0, printed once.

    Ray Train wraps ``print`` in its workers to tee it into its logger *and* the replaced
    ``sys.stdout``, which shows every line twice on the driver; the process's own stdout does
    not go through that wrapper (Ray still forwards it to the driver).
    """
    import sys

    print(line, file=sys.__stdout__, flush=True)


def _batches(name: str, config: LoopConfig, device, shuffle: bool):
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    return shard.iter_torch_batches(batch_size=config.batch_size, device=device,
                                    local_shuffle_buffer_size=config.batch_size * 8 if shuffle else None,
                                    local_shuffle_seed=config.seed if shuffle else None)


def batch_side_inputs(model, batch, config: LoopConfig, train: bool):
    """(objects, metadata) for the variant; in training, metadata dropout blanks whole metadata blocks."""
    import torch

    net = _unwrap(model)
    objects = batch["objects"] if net.uses_objects else None
    metadata = batch["metadata"] if net.uses_metadata else None
    if metadata is not None and train and config.metadata_dropout > 0:
        drop = torch.rand(len(metadata), 1, device=metadata.device) < config.metadata_dropout
        missing = torch.tensor(config.missing_metadata, dtype=metadata.dtype, device=metadata.device)
        metadata = torch.where(drop, missing.expand_as(metadata), metadata)
    return objects, metadata


def _inputs(batch, phase: str, config: LoopConfig, preset, train: bool):
    """Backbone features (head phase: stored, flipped at random while training) or preset images."""
    import torch

    if phase == "head":
        if not train:
            return batch["features"]
        flip = torch.rand(len(batch["features"]), 1, device=batch["features"].device) < 0.5
        return torch.where(flip, batch["flipped"], batch["features"])
    import torch

    return preset(batch["image"]).contiguous(memory_format=torch.channels_last)


def _forward(model, inputs, objects, metadata, phase: str):
    """Through DDP's own forward (so gradients synchronise), pooled features or images."""
    return model(inputs, objects, metadata, pooled=phase == "head")


def train_epoch(model, optimizer, scheduler, scaler, loss_fn, config: LoopConfig, device, phase: str, epoch: int,
                batches) -> tuple[float, int]:
    """One pass over ``batches`` (dicts of tensors: image or features/flipped, labels, metadata, objects).

    The Ray Train worker passes its dataset shard; ``benchmarks/train_throughput.py`` passes the
    same decoded posters from memory, so both time exactly this function.
    """
    import torch

    from posterfusion.models.fusion import input_preset
    from posterfusion.models.hardware import autocast

    stage = "train" if config.augment else "eval"
    preset = input_preset(config.model, config.image_size, stage)
    model.train()
    torch.manual_seed(config.seed * 1000 + epoch)  # augmentation and dropout draws, reproducible per epoch
    total, seen = 0.0, 0
    for batch in batches:
        objects, metadata = batch_side_inputs(model, batch, config, train=True)
        inputs = _inputs(batch, phase, config, preset, train=True)  # in full precision: under autocast the
        with autocast(device, config.amp if phase == "full" else "off"):  # preset's bf16 output slows the net ~1.5×
            logits = _forward(model, inputs, objects, metadata, phase)
        loss = loss_fn(logits.float(), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item() * len(batch["labels"])
        seen += len(batch["labels"])
    return total / max(seen, 1), seen


def validate(model, loss_fn, config: LoopConfig, device, phase: str, batches):
    """Validation on this worker's shard, gathered so every worker computes the same metrics.

    Returns the metrics and the raw (uncalibrated) logits with their labels: the driver fits the
    calibration on the best epoch's.
    """
    import torch

    from posterfusion.models.evaluation import hit_at_k, top_n_ratio
    from posterfusion.models.fusion import input_preset
    from posterfusion.models.hardware import autocast
    from posterfusion.models.metrics import macro_auc, micro_auc

    preset = input_preset(config.model, config.image_size, "eval")
    model.eval()
    logits_out, labels, loss_sum = [], [], 0.0
    with torch.inference_mode():
        for batch in batches:
            objects, metadata = batch_side_inputs(model, batch, config, train=False)
            inputs = _inputs(batch, phase, config, preset, train=False)
            with autocast(device, config.amp if phase == "full" else "off"):
                logits = _forward(model, inputs, objects, metadata, phase).float()
            loss_sum += float(loss_fn(logits, batch["labels"])) * len(logits)
            logits_out.append(logits.cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
    y, z, loss_sum = _gather(labels, logits_out, loss_sum)
    adjusted = 1 / (1 + np.exp(-(z - np.log(np.asarray(config.pos_weight)))))
    return ({"val_loss": loss_sum / max(len(y), 1), "val_macro_auc": macro_auc(y, z), "val_micro_auc": micro_auc(y, z),
             "val_hit@3": hit_at_k(y, adjusted, 3), "val_top_n_ratio": top_n_ratio(y, adjusted)}, z, y)


def _gather(labels: list, logits: list, loss_sum: float):
    import torch.distributed as dist

    local = (np.concatenate(labels) if labels else np.zeros((0, 0)), np.concatenate(logits) if logits else None,
             loss_sum)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    parts = [p for p in parts if p[1] is not None]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            sum(p[2] for p in parts))


def _advance(state: dict, record: dict, last_phase: bool) -> dict:
    """Append the epoch; count epochs without improvement (only in the last phase: a warm-up may plateau)."""
    improved = record["val_macro_auc"] > state["best"] + 1e-4
    return state | {
        "epoch": record["epoch"], "history": [*state["history"], record],
        "best": record["val_macro_auc"] if improved else state["best"],
        "bad_epochs": 0 if improved or not last_phase else state["bad_epochs"] + 1,
    }


def _report(model, optimizer, scheduler, scaler, state: dict, context, logits: np.ndarray, labels: np.ndarray) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (all state needed to resume + validation logits)."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    record = state["history"][-1]
    if context.get_world_rank() != 0:
        ray.train.report(dict(record))
        return
    _say(f"[train] epoch {record['epoch']} ({record['phase']}): loss {record['train_loss']:.4f} "
         f"val macro AUC {record['val_macro_auc']:.4f} hit@3 {record['val_hit@3']:.3f} "
         f"({record['samples_per_s']:.1f} samples/s)")
    with tempfile.TemporaryDirectory() as directory:
        saved = {k: state[k] for k in ("epoch", "best", "bad_epochs", "history")}
        torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **saved},
                   Path(directory) / "state.pt")
        np.savez(Path(directory) / "validation.npz", logits=logits, labels=labels)
        ray.train.report(dict(record), checkpoint=Checkpoint.from_directory(directory))

