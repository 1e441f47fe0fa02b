"""``posterfusion train``: fine-tune the fusion network with Ray Train.

Driver: read the catalogue's labelled rows, build the genre vocabulary and fit the metadata
encoder on the training split only, join cached object features, decode posters once with
Ray Data into fixed-size uint8 tensors, then hand train/val Datasets to a ``TorchTrainer``.

Workers (``train_loop``): DDP via ``prepare_model``, BCE-with-logits with per-genre
``pos_weight``, AdamW + one-cycle schedule, autocast (bf16 on AMX CPUs, fp16/bf16 on GPU),
validation macro ROC-AUC gathered across workers, early stopping, a checkpoint each epoch
holding model, optimizer, scheduler and history — a restarted worker resumes from it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from posterfusion.features.objects import DetectorConfig
from posterfusion.features.vocab import VocabConfig
from posterfusion.models.fusion import FusionConfig

Variant = Literal["cnn", "cnn+objects", "cnn+metadata", "fused"]
META_COLUMNS = ["year", "runtime", "imdb_score", "num_votes", "budget", "gross", "popularity",
                "content_rating", "language", "country"]


class TrainConfig(BaseModel):
    catalogue: Path
    out: Path = Field(description="bundle directory to write")
    features: Path | None = Field(None, description="object features dir (`posterfusion features --out`)")
    detector: DetectorConfig | None = None
    backbone: str = "densenet121"
    weights: str = "none"
    variant: Variant = "fused"
    fusion: Literal["concat", "gated"] = "concat"
    freeze_backbone: bool = False
    image_size: int = Field(128, ge=32)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = Field(3, ge=1, description="epochs without val macro AUC gain before stopping")
    workers: int = Field(1, ge=1)
    gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0, description="default: a share of the cluster's CPUs")
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    max_failures: int = 2
    storage_path: Path | None = Field(None, description="Ray Train results (default: OUT/../ray_results)")
    vocab: VocabConfig = Field(default_factory=VocabConfig)
    seed: int = 0
    limit: int | None = Field(None, description="use at most this many training rows (quick runs)")
    fail_after_epoch: int | None = Field(None, description="fault injection for tests: fail once after this epoch")

    def fusion_config(self, num_genres: int, object_dim: int, metadata_dim: int) -> FusionConfig:
        return FusionConfig(backbone=self.backbone, weights=self.weights, variant=self.variant,
                            fusion=self.fusion, num_genres=num_genres, object_dim=object_dim,
                            metadata_dim=metadata_dim, freeze_backbone=self.freeze_backbone)


class LoopConfig(BaseModel):
    """What each worker needs: plain values only (it travels to the workers)."""

    model: FusionConfig
    image_size: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    pos_weight: list[float]
    train_rows: int
    threads: int
    amp: str
    seed: int
    fail_after_epoch: int | None
    fail_marker: str


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


def object_lookup(config: TrainConfig, frame: pd.DataFrame) -> tuple[dict, int, str | None]:
    """(movie_id, sha) → object vector; every row must have one when the variant reads objects."""
    if config.variant not in ("cnn+objects", "fused"):
        return {}, 0, None
    if config.features is None or config.detector is None:
        raise ValueError(f"variant {config.variant!r} needs --features and --detector (run `posterfusion features`)")
    from posterfusion.features.objects import detector_id
    from posterfusion.jobs.features import load_object_features

    det_id = detector_id(config.detector)
    table = load_object_features(config.features, det_id)
    lookup = {key: np.asarray(vec, np.float32) for key, vec in table["objects"].items()}
    missing = [k for k in zip(frame["movie_id"], frame["poster_sha256"], strict=True) if k not in lookup]
    if missing:
        raise ValueError(f"{len(missing)} posters have no object features for {det_id} "
                         f"(e.g. {missing[0][0]}): run `posterfusion features` first")
    return lookup, len(next(iter(lookup.values()))), det_id


def build_datasets(config: TrainConfig, frame: pd.DataFrame, vocabulary, encoder, objects: dict):
    """Ray Datasets of decoded uint8 images + labels + side features, per split, materialised."""
    import ray
    from ray.data.expressions import col, lit

    from posterfusion.features.catalogue import catalogue_files

    meta = pd.DataFrame(encoder.transform(frame), index=frame["movie_id"])
    labels = pd.DataFrame(vocabulary.encode_many(frame["genres"]), index=frame["movie_id"])
    splits = dict(zip(frame["movie_id"], frame["split"], strict=True))
    base = ray.data.read_parquet(catalogue_files(config.catalogue), columns=["movie_id", "poster_sha256", "poster"])
    prepared = base.filter(expr=col("movie_id").is_in(sorted(splits))).map_batches(
        _prepare_batch, batch_format="pandas", batch_size=64, num_cpus=0.5,
        fn_kwargs={"size": config.image_size, "labels": labels, "meta": meta, "objects": objects,
                   "splits": splits}).materialize()
    return {split: prepared.filter(expr=col("split") == lit(split)).drop_columns(["split"]).materialize()
            for split in ("train", "val")}


def _prepare_batch(batch: pd.DataFrame, size: int, labels: pd.DataFrame, meta: pd.DataFrame,
                   objects: dict, splits: dict) -> dict:
    from posterfusion.features.presets import decode_poster

    ids = batch["movie_id"].tolist()
    out = {
        "image": np.stack([decode_poster(b, size).numpy() for b in batch["poster"]]),
        "labels": labels.loc[ids].to_numpy(np.float32),
        "metadata": meta.loc[ids].to_numpy(np.float32),
        "split": np.array([splits[i] for i in ids]),
    }
    if objects:
        keys = zip(ids, batch["poster_sha256"], strict=True)
        out["objects"] = np.stack([objects[k] for k in keys])
    else:
        out["objects"] = np.zeros((len(ids), 1), np.float32)
    return out


def pos_weights(labels: np.ndarray, cap: float = 20.0) -> list[float]:
    """negatives/positives per genre, capped: rare genres get more weight, but not unbounded."""
    positives = labels.sum(axis=0)
    return np.clip((len(labels) - positives) / np.maximum(positives, 1), 1.0, cap).tolist()


def _worker_resources(config: TrainConfig) -> tuple[float, int]:
    from posterfusion.cluster import cpu_budget, node_cpus

    total = cpu_budget()
    largest = max(node_cpus(), default=total)  # a worker lives on one node: asking more never schedules
    per_worker = config.cpus_per_worker or max(0.1, min(total * 0.8 / config.workers, largest * 0.8, 8.0))
    return per_worker, max(1, round(total / config.workers))


def run_train(config: TrainConfig) -> dict:
    """Train, pick the best checkpoint, write the bundle; return the run summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from posterfusion.features.metadata import MetadataEncoder
    from posterfusion.features.vocab import GenreVocabulary

    started = time.perf_counter()
    frame = load_labelled(config.catalogue, config.limit)
    train_frame = frame[frame["split"] == "train"]
    vocabulary = GenreVocabulary.build(train_frame["genres"], config.vocab)
    encoder = MetadataEncoder.fit(train_frame)
    objects, object_dim, det_id = object_lookup(config, frame)
    datasets = build_datasets(config, frame, vocabulary, encoder, objects)
    train_labels = vocabulary.encode_many(train_frame["genres"])
    cpus, threads = _worker_resources(config)
    storage = (config.storage_path or config.out.parent / "ray_results").resolve()
    run_name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    loop = LoopConfig(
        model=config.fusion_config(len(vocabulary.genres), object_dim, encoder.dim),
        image_size=config.image_size, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
        weight_decay=config.weight_decay, patience=config.patience, pos_weight=pos_weights(train_labels),
        train_rows=len(train_frame), threads=threads, amp=config.amp, seed=config.seed,
        fail_after_epoch=config.fail_after_epoch, fail_marker=str(storage / run_name / "injected_failure"))
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop.model_dump(mode="json"), datasets=datasets,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=run_name, storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_macro_auc",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=config.max_failures)),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(metric="val_macro_auc", mode="max")
    if best is None:
        raise RuntimeError(f"training reported no checkpoint (error: {result.error})")
    return _write_bundle(config, loop, best, vocabulary, encoder, det_id, result, time.perf_counter() - started)


def _write_bundle(config, loop, checkpoint, vocabulary, encoder, det_id, result, seconds) -> dict:
    import torch

    from posterfusion.models.bundle import BundleConfig, save_bundle

    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / "state.pt", weights_only=True, map_location="cpu")
        thresholds = json.loads((Path(directory) / "thresholds.json").read_text())
    thresholds = dict(zip(vocabulary.genres, thresholds, strict=True))
    with result.checkpoint.as_directory() as directory:  # the latest holds the whole history
        history = torch.load(Path(directory) / "state.pt", weights_only=True, map_location="cpu")["history"]
    best = max(history, key=lambda h: h["val_macro_auc"])
    metrics = {"best": best, "history": history, "seconds": round(seconds, 1),
               "label_prior": state["label_prior"], "run_path": result.path,
               "train_rows": loop.train_rows, "workers": config.workers}
    bundle = BundleConfig(model=loop.model, image_size=config.image_size,
                          detector=config.detector if det_id else None, detector_id=det_id)
    save_bundle(config.out, config=bundle, state_dict=state["model"], vocabulary=vocabulary, encoder=encoder,
                thresholds=thresholds, metrics=metrics)
    return metrics | {"bundle": str(config.out), "genres": vocabulary.genres, "final_epoch": history[-1]["epoch"]}


def format_train_summary(summary: dict) -> str:
    best, prior = summary["best"], summary["label_prior"]
    return (f"train: best epoch {best['epoch']}/{summary['final_epoch']} val macro ROC-AUC "
            f"{best['val_macro_auc']:.3f} (label prior {prior['val_macro_auc']:.3f}), micro "
            f"{best['val_micro_auc']:.3f} (prior {prior['val_micro_auc']:.3f}); "
            f"{summary['train_rows']} train posters, {len(summary['genres'])} genres, "
            f"{summary['seconds']:.0f} s → {summary['bundle']}")


# --- worker side -----------------------------------------------------------------------------


def train_loop(raw_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import torch

    config = LoopConfig.model_validate(raw_config)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    context = ray.train.get_context()
    model, device = _prepare_model(config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = max(1, math.ceil(config.train_rows / (config.batch_size * context.get_world_size())))
    # At least 10 steps: OneCycleLR's warm-up phase (20 %) must span a whole step, or tiny runs fail.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                    total_steps=max(10, config.epochs * steps + 1), pct_start=0.2)
    state = _resume(model, optimizer, scheduler)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(config.pos_weight, device=device))
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        started = time.perf_counter()
        train_loss, seen = _train_epoch(model, optimizer, scheduler, loss_fn, config, device)
        val = _validate(model, loss_fn, config, device)
        prior, thresholds = val.pop("label_prior"), val.pop("thresholds")
        state["label_prior"] = state.get("label_prior") or prior
        seconds = time.perf_counter() - started
        record = {"epoch": epoch, "train_loss": train_loss, **val, "lr": scheduler.get_last_lr()[0],
                  "samples_per_s": seen * context.get_world_size() / seconds, "seconds": seconds}
        state = _advance(state, record, thresholds)
        _report(model, optimizer, scheduler, state, context)
        _maybe_fail(config, epoch)
        if state["bad_epochs"] >= config.patience:
            break


def _prepare_model(config: LoopConfig):
    import ray.train.torch

    from posterfusion.models.fusion import build_model

    model = ray.train.torch.prepare_model(build_model(config.model))
    return model, ray.train.torch.get_device()


def _unwrap(model):
    return getattr(model, "module", model)


def _resume(model, optimizer, scheduler) -> dict:
    """Continue from the last checkpoint (after a worker failure) or start at epoch 0."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"epoch": 0, "best": -1.0, "bad_epochs": 0, "history": [], "thresholds": None}
    with checkpoint.as_directory() as directory:
        saved = torch.load(Path(directory) / "state.pt", weights_only=True, map_location="cpu")
        thresholds = json.loads((Path(directory) / "thresholds.json").read_text())
    _unwrap(model).load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    print(f"[train] resumed from the epoch-{saved['epoch']} checkpoint", flush=True)
    return {k: saved[k] for k in ("epoch", "best", "bad_epochs", "history", "label_prior")} | {
        "thresholds": thresholds, "resumed_from": saved["epoch"]}


def _autocast(config: LoopConfig, device):
    import contextlib

    import torch

    if config.amp == "off":
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.float16 if config.amp == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)
    if config.amp == "bf16" or (config.amp == "auto" and _cpu_has_amx()):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _cpu_has_amx() -> bool:
    """bf16 autocast pays off on CPUs with AMX (measured ~2x here); elsewhere it can be slower."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _batches(name: str, config: LoopConfig, device, shuffle: bool):
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    return shard.iter_torch_batches(batch_size=config.batch_size, device=device,
                                    local_shuffle_buffer_size=config.batch_size * 8 if shuffle else None)


def _inputs(model, batch):
    net = _unwrap(model)
    return (batch["objects"] if net.uses_objects else None, batch["metadata"] if net.uses_metadata else None)


def _train_epoch(model, optimizer, scheduler, loss_fn, config: LoopConfig, device) -> tuple[float, int]:
    from posterfusion.features.presets import TrainPreset

    preset = TrainPreset(size=config.image_size)
    model.train()
    total, seen = 0.0, 0
    for batch in _batches("train", config, device, shuffle=True):
        with _autocast(config, device):
            logits = model(preset(batch["image"]), *_inputs(model, batch))
        loss = loss_fn(logits.float(), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(batch["labels"])
        seen += len(batch["labels"])
    return total / max(seen, 1), seen


def _validate(model, loss_fn, config: LoopConfig, device) -> dict:
    """Validation on this worker's shard, gathered so every worker computes the same metrics."""
    import torch

    from posterfusion.features.presets import EvalPreset
    from posterfusion.models.metrics import macro_auc, micro_auc, tune_thresholds

    preset = EvalPreset(size=config.image_size)
    model.eval()
    scores, labels, loss_sum = [], [], 0.0
    with torch.inference_mode():
        for batch in _batches("val", config, device, shuffle=False):
            with _autocast(config, device):
                logits = model(preset(batch["image"]), *_inputs(model, batch)).float()
            loss_sum += float(loss_fn(logits, batch["labels"])) * len(logits)
            scores.append(torch.sigmoid(logits).cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
    y, p, loss_sum = _gather(labels, scores, loss_sum)
    prior = np.broadcast_to(y.mean(axis=0), y.shape)
    return {"val_loss": loss_sum / max(len(y), 1), "val_macro_auc": macro_auc(y, p), "val_micro_auc": micro_auc(y, p),
            "thresholds": tune_thresholds(y, p).tolist(),
            "label_prior": {"val_macro_auc": macro_auc(y, prior), "val_micro_auc": micro_auc(y, prior)}}


def _gather(labels: list, scores: list, loss_sum: float):
    import torch.distributed as dist

    local = (np.concatenate(labels) if labels else np.zeros((0, 0)), np.concatenate(scores) if scores else None,
             loss_sum)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    parts = [p for p in parts if p[1] is not None]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            sum(p[2] for p in parts))


def _advance(state: dict, record: dict, thresholds: list[float]) -> dict:
    """Append the epoch and its tuned thresholds; count epochs without improvement."""
    improved = record["val_macro_auc"] > state["best"] + 1e-4
    return state | {
        "epoch": record["epoch"], "history": [*state["history"], record],
        "best": record["val_macro_auc"] if improved else state["best"],
        "bad_epochs": 0 if improved else state["bad_epochs"] + 1,
        "thresholds": thresholds,
    }


def _report(model, optimizer, scheduler, state: dict, context) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (all state needed to resume)."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    record = state["history"][-1]
    if context.get_world_rank() != 0:
        ray.train.report(dict(record))
        return
    print(f"[train] epoch {record['epoch']}: loss {record['train_loss']:.4f} val loss {record['val_loss']:.4f} "
          f"val macro AUC {record['val_macro_auc']:.4f} ({record['samples_per_s']:.1f} samples/s)", flush=True)
    with tempfile.TemporaryDirectory() as directory:
        saved = {k: state[k] for k in ("epoch", "best", "bad_epochs", "history", "label_prior")}
        torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), **saved}, Path(directory) / "state.pt")
        (Path(directory) / "thresholds.json").write_text(json.dumps(state["thresholds"]))
        ray.train.report(dict(record), checkpoint=Checkpoint.from_directory(directory))


def _maybe_fail(config: LoopConfig, epoch: int) -> None:
    """Fault injection for the resume test: fail once, after this epoch's checkpoint."""
    if config.fail_after_epoch != epoch or os.path.exists(config.fail_marker):
        return
    Path(config.fail_marker).parent.mkdir(parents=True, exist_ok=True)
    Path(config.fail_marker).write_text(f"failed after epoch {epoch}\n")
    raise RuntimeError(f"injected failure after epoch {epoch}")
