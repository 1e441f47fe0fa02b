"""The worker loop: what every Ray Train worker runs, from the :class:`WorkerArgs` it receives.

DDP via ``prepare_model``, BCE-with-logits (optionally with per-genre ``pos_weight``, undone
later by the calibration's logit adjustment), metadata dropout (a sample's whole metadata block
replaced by the encoding of "no metadata", so the model serves clients who send none), autocast,
validation gathered across workers, early stopping within the last phase, and a checkpoint each
epoch holding everything needed to resume. Each phase warms its learning rate up, then decays it
on a cosine.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from posterfusion.jobs.train.config import WorkerArgs, network_config
from posterfusion.models.bundle import load_bundle
from posterfusion.models.fusion import residual_logits
from posterfusion.models.hardware import autocast
from posterfusion.models.metrics import hit_at_k, macro_auc, micro_auc, top_n_ratio
from posterfusion.models.network import build_model, input_preset


def train_loop(raw: dict) -> None:
    """Runs on every Ray Train worker."""
    args = WorkerArgs.model_validate(raw)
    # Ray Train logs every report at INFO through a logger outside ``ray.train`` (its file path),
    # so only the root level keeps those lines off a quiet console.
    logging.getLogger().setLevel(args.plan.log_level)
    torch.set_num_threads(args.plan.threads)
    torch.manual_seed(args.plan.seed)
    context = ray.train.get_context()
    model, device = _prepare_model(args)
    optim = args.config.optim
    optimizer = make_optimizer(model, args)
    steps = max(1, math.ceil(args.facts.train_rows / (optim.batch_size * context.get_world_size())))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedules(args, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and optim.amp == "fp16")
    state = _resume(model, optimizer, scheduler, scaler, args.plan.start_from)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(args.facts.pos_weight, device=device))
    for epoch in range(state["epoch"] + 1, (args.plan.stop_after or optim.epochs) + 1):
        phase = "head" if epoch <= optim.head_epochs else "full"
        started = time.perf_counter()
        train = _batches("train_features" if phase == "head" else "train", args, device, shuffle=True)
        train_loss, seen = train_epoch(model, optimizer, scheduler, scaler, loss_fn, args, device, phase, epoch, train)
        trained = time.perf_counter()
        val = _batches("val_features" if phase == "head" else "val", args, device, shuffle=False)
        metrics, logits, labels, branches = validate(model, loss_fn, args, device, phase, val)
        record = {"epoch": epoch, "phase": phase, "train_loss": train_loss, **metrics,
                  "lr": scheduler.get_last_lr()[-1],
                  "samples_per_s": seen * context.get_world_size() / (trained - started),  # training alone
                  "train_seconds": trained - started, "seconds": time.perf_counter() - started}
        last_phase = epoch > optim.head_epochs or optim.head_epochs == optim.epochs
        state = _advance(state, record, last_phase)
        _report(model, optimizer, scheduler, scaler, state, context, logits, labels, branches)
        if state["bad_epochs"] >= optim.patience:
            break


def training_model(args: WorkerArgs):
    """The network as training starts it: object statistics set, a kept poster path loaded, only the trained
    stages with gradients.

    In channels-last memory: the convolution layout oneDNN and cuDNN are fastest in (with bf16,
    2.8× the fp32 contiguous fine-tuning speed of MobileNetV2 on this project's CPU, measured).
    """
    network = network_config(args.config, args.facts)
    model = build_model(network).to(memory_format=torch.channels_last)
    model.set_object_statistics(args.facts.object_mean, args.facts.object_std)
    model.set_text_weights(args.facts.text_weights)
    if network.poster_from:  # checked on the driver (data.poster_bundle_version); read here, a URI too
        poster = load_bundle(network.poster_from)
        if poster.version != network.poster_version:
            raise RuntimeError(f"{network.poster_from} changed while this run started (version {poster.version}, "
                               f"checked {network.poster_version})")
        model.keep_poster_path(poster.network_state(args.plan.poster_member))
    if not network.freeze_backbone:
        model.backbone.train_last_stages(args.config.optim.train_stages)
    return model


def _prepare_model(args: WorkerArgs):
    optim = args.config.optim
    # head epochs leave the backbone without gradients: DDP must be told some parameters may be unused
    kwargs = {"find_unused_parameters": True} if 0 < optim.head_epochs < optim.epochs else {}
    model = ray.train.torch.prepare_model(training_model(args), parallel_strategy_kwargs=kwargs)
    return model, ray.train.torch.get_device()


def unwrap(model):
    """The network inside DDP's wrapper (or the network itself)."""
    return getattr(model, "module", model)


def make_optimizer(model, args: WorkerArgs):
    """AdamW with two groups: the backbone (its own, lower rate) and everything else (the head)."""
    net, optim = unwrap(model), args.config.optim
    backbone = [p for p in net.backbone.parameters() if p.requires_grad]
    head = [p for name, p in net.named_parameters() if not name.startswith("backbone.") and p.requires_grad]
    return torch.optim.AdamW([{"params": backbone, "lr": optim.backbone_lr}, {"params": head, "lr": optim.lr}],
                             weight_decay=optim.weight_decay)


def lr_schedules(args: WorkerArgs, steps_per_epoch: int):
    """Per-group LR multipliers over global steps: each phase warms up (5 %), then decays on a cosine.

    The backbone's multiplier is 0 during head epochs (it receives no gradients there anyway); the
    head's peak in the fine-tuning phase is ``finetune_head_lr`` (a multiplier of its base rate ``lr``).
    """
    optim = args.config.optim
    finetune_scale = optim.head_lr_finetuning / optim.lr
    head_steps = optim.head_epochs * steps_per_epoch
    full_steps = (optim.epochs - optim.head_epochs) * steps_per_epoch

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
    checkpoint, origin = ray.train.get_checkpoint(), "resumed from"
    if checkpoint is None and start_from is not None:
        checkpoint, origin = ray.train.Checkpoint(start_from), "fine-tunes from the warmed-up head of"
    if checkpoint is None:
        return {"epoch": 0, "best": -1.0, "bad_epochs": 0, "history": []}
    with checkpoint.as_directory() as directory:
        saved = torch.load(Path(directory) / "state.pt", weights_only=True, map_location="cpu")
    unwrap(model).load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    say(f"[train] {origin} the epoch-{saved['epoch']} checkpoint")
    return {k: saved[k] for k in ("epoch", "best", "bad_epochs", "history")} | {"resumed_from": saved["epoch"]}


def say(line: str) -> None:
    """A progress line, printed once.

    Ray Train wraps ``print`` in its workers to tee it into its logger *and* the replaced
    ``sys.stdout``, which shows every line twice on the driver; the process's own stdout does
    not go through that wrapper (Ray still forwards it to the driver).
    """
    print(line, file=sys.__stdout__, flush=True)


def _batches(name: str, args: WorkerArgs, device, shuffle: bool):
    size = args.config.optim.batch_size
    return ray.train.get_dataset_shard(name).iter_torch_batches(
        batch_size=size, device=device, local_shuffle_buffer_size=size * 8 if shuffle else None,
        local_shuffle_seed=args.plan.seed if shuffle else None)


def batch_side_inputs(model, batch, args: WorkerArgs, train: bool):
    """(objects, metadata) for the variant; in training, metadata dropout blanks fields, then whole blocks."""
    net, optim = unwrap(model), args.config.optim
    objects = batch["objects"] if net.uses_objects else None
    metadata = batch["metadata"] if net.uses_metadata else None
    if metadata is not None and train and optim.metadata_field_dropout > 0:
        metadata = drop_fields(metadata, args.facts, optim.metadata_field_dropout)
    if metadata is not None and train and optim.metadata_dropout > 0:
        drop = torch.rand(len(metadata), 1, device=metadata.device) < optim.metadata_dropout
        missing = torch.tensor(args.facts.missing_metadata, dtype=metadata.dtype, device=metadata.device)
        metadata = torch.where(drop, missing.expand_as(metadata), metadata)
    return objects, metadata


def drop_fields(metadata: torch.Tensor, facts, rate: float) -> torch.Tensor:
    """Each field of each row blanked with probability ``rate`` as the encoder blanks a missing field (values
    0, its missing flag 1); a row left with no field at all becomes 'no metadata' (has_metadata 0)."""
    out = metadata.clone()
    for columns, flag in facts.metadata_fields:
        drop = torch.rand(len(out), device=out.device) < rate
        out[drop.nonzero(as_tuple=True)[0][:, None], torch.tensor(columns, device=out.device)] = 0.0
        out[drop, flag] = 1.0
    flags = torch.tensor([flag for _, flag in facts.metadata_fields], device=out.device)
    out[:, facts.metadata_presence] = (out[:, flags] < 0.5).any(dim=1).to(out.dtype)
    return out


def _inputs(batch, phase: str, preset, train: bool):
    """Backbone features (head phase: stored, flipped at random while training) or preset images."""
    if phase == "head":
        if not train:
            return batch["features"]
        flip = torch.rand(len(batch["features"]), 1, device=batch["features"].device) < 0.5
        return torch.where(flip, batch["flipped"], batch["features"])
    return preset(batch["image"]).contiguous(memory_format=torch.channels_last)


def train_epoch(model, optimizer, scheduler, scaler, loss_fn, args: WorkerArgs, device, phase: str, epoch: int,
                batches) -> tuple[float, int]:
    """One pass over ``batches`` (dicts of tensors: image or features/flipped, labels, metadata, objects).

    The Ray Train worker passes its dataset shard; ``benchmarks/train_throughput.py`` passes the
    same decoded posters from memory, so both time exactly this function.
    """
    optim = args.config.optim
    preset = input_preset(args.config.model, "train" if optim.augment else "eval")
    model.train()
    torch.manual_seed(args.plan.seed * 1000 + epoch)  # augmentation and dropout draws, reproducible per epoch
    total, seen = 0.0, 0
    for batch in batches:
        objects, metadata = batch_side_inputs(model, batch, args, train=True)
        inputs = _inputs(batch, phase, preset, train=True)  # in full precision: under autocast the
        with autocast(device, optim.amp if phase == "full" else "off"):  # preset's bf16 output slows the net ~1.5×
            logits, correction = model(inputs, objects, metadata, pooled=phase == "head", split=True)  # DDP's forward
        loss = fusion_loss(loss_fn, logits, correction, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item() * len(batch["labels"])
        seen += len(batch["labels"])
    return total / max(seen, 1), seen


def fusion_loss(loss_fn, logits, correction, labels):
    """The loss of one batch. Residual fusion: the poster path learns as a CNN-only model would (its own
    loss), and the side inputs' correction learns on top of the poster path's logits, held fixed."""
    loss = loss_fn(logits.float(), labels)
    if correction is None:
        return loss
    return loss + loss_fn((logits.detach() + correction).float(), labels)


def validate(model, loss_fn, args: WorkerArgs, device, phase: str, batches):
    """Validation on this worker's shard, gathered so every worker computes the same metrics.

    Returns the metrics, the raw (uncalibrated) logits with their labels, and for residual fusion
    the logits' parts (:meth:`~posterfusion.models.fusion.FusionNet.branch_logits`; else empty):
    the driver fits the side corrections' weights and the calibration on the best epoch's.
    """
    preset = input_preset(args.config.model, "eval")
    net = unwrap(model)
    residual = net.config.fusion == "residual" and (net.uses_objects or net.uses_metadata)
    model.eval()
    gathered, loss_sum = {}, 0.0
    with torch.inference_mode():
        for batch in batches:
            objects, metadata = batch_side_inputs(model, batch, args, train=False)
            inputs = _inputs(batch, phase, preset, train=False)
            with autocast(device, args.config.optim.amp if phase == "full" else "off"):
                if residual:
                    parts = {k: v.float() for k, v in net.branch_logits(inputs, objects, metadata,
                                                                        pooled=phase == "head").items()}
                    logits = residual_logits(parts, net.config.correction_scale)
                else:
                    parts, logits = {}, model(inputs, objects, metadata, pooled=phase == "head").float()
            loss_sum += float(loss_fn(logits, batch["labels"])) * len(logits)
            for name, value in {"logits": logits, "labels": batch["labels"], **parts}.items():
                gathered.setdefault(name, []).append(value.cpu().numpy())
    arrays, loss_sum = _gather(gathered, loss_sum)
    y, z = arrays.pop("labels"), arrays.pop("logits")
    adjusted = 1 / (1 + np.exp(-(z - np.log(np.asarray(args.facts.pos_weight)))))
    return ({"val_loss": loss_sum / max(len(y), 1), "val_macro_auc": macro_auc(y, z), "val_micro_auc": micro_auc(y, z),
             "val_hit@3": hit_at_k(y, adjusted, 3), "val_top_n_ratio": top_n_ratio(y, adjusted)}, z, y, arrays)


def _gather(parts: dict[str, list], loss_sum: float) -> tuple[dict[str, np.ndarray], float]:
    """Each named array concatenated over this worker's batches, then over every worker's (rank order)."""
    local = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local, loss_sum
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (local, loss_sum))
    shards = [shard for shard, _ in everyone if shard]
    return ({name: np.concatenate([shard[name] for shard in shards]) for name in shards[0]},
            sum(total for _, total in everyone))


def _advance(state: dict, record: dict, last_phase: bool) -> dict:
    """Append the epoch; count epochs without improvement (only in the last phase: a warm-up may plateau)."""
    improved = record["val_macro_auc"] > state["best"] + 1e-4
    return state | {
        "epoch": record["epoch"], "history": [*state["history"], record],
        "best": record["val_macro_auc"] if improved else state["best"],
        "bad_epochs": 0 if improved or not last_phase else state["bad_epochs"] + 1,
    }


def _report(model, optimizer, scheduler, scaler, state: dict, context, logits: np.ndarray, labels: np.ndarray,
            branches: dict[str, np.ndarray]) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (all state needed to resume + validation logits)."""
    record = state["history"][-1]
    if context.get_world_rank() != 0:
        ray.train.report(dict(record))
        return
    say(f"[train] epoch {record['epoch']} ({record['phase']}): loss {record['train_loss']:.4f} "
        f"val macro AUC {record['val_macro_auc']:.4f} hit@3 {record['val_hit@3']:.3f} "
        f"({record['samples_per_s']:.1f} samples/s)")
    with tempfile.TemporaryDirectory() as directory:
        saved = {k: state[k] for k in ("epoch", "best", "bad_epochs", "history")}
        torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **saved},
                   Path(directory) / "state.pt")
        np.savez(Path(directory) / "validation.npz", logits=logits, labels=labels,
                 **{f"branch_{name}": value for name, value in branches.items()})
        ray.train.report(dict(record), checkpoint=ray.train.Checkpoint.from_directory(directory))
