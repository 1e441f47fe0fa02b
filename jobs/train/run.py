"""``posterfusion train``: Ray Train runs of the worker loop, then the bundle.

Fine-tuning as the field does it, in two phases: ``optim.warmup_epochs`` train the head on the
frozen backbone's features (a fresh head's large gradients would otherwise wreck the pretrained
filters), then the network trains with the backbone at a lower rate (``optim.backbone_lr``) and
the warmed-up head at ``optim.finetune_head_lr``, on augmented posters. ``optim.mode frozen``
stops after the first phase. With ``combine.members N`` the head warms up once and N runs
fine-tune from that checkpoint (:mod:`.combine` makes them one bundle). Under a kept poster path
(``model.poster_from``) nothing fine-tunes: only side corrections train, on stored features, one run per
network of that bundle (:func:`kept_members`).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from posterfusion.cluster import cpu_budget, node_cpus
from posterfusion.cluster.console import train_logging_level
from posterfusion.jobs.tracking import tracked
from posterfusion.jobs.train.combine import ensemble, soup
from posterfusion.jobs.train.config import DataFacts, TrainConfig, WorkerArgs, WorkerPlan
from posterfusion.jobs.train.data import Prepared, data_facts, feature_datasets, image_datasets, prepare
from posterfusion.jobs.train.finish import write_bundle
from posterfusion.jobs.train.loop import train_loop
from posterfusion.locations import Location


def run_train(config: TrainConfig) -> dict:
    """Train, pick the best checkpoint (or combine the members'), calibrate, write the bundle; return the summary.

    The run is recorded in MLflow (:mod:`posterfusion.jobs.tracking`): the configuration, each epoch's
    validation figures (each member's too), the calibrated validation summary, where the bundle is.
    """
    config.check_ready()
    name = f"{config.recipe or 'train'}/{config.model.variant}-s{config.run.seed}"
    with tracked("train", name, config.model_dump(mode="json"), {"posterfusion.bundle": str(config.run.out)}) as run:
        summary = _train(config)
        run.history(summary["history"])
        for member in summary.get("members", {}).get("runs", []):
            run.history(member["history"], prefix=f"member-{member['seed']}.")
        run.metrics(summary["validation"], prefix="validation.")
        run.metrics({"train_seconds": summary["seconds"], "train_rows": summary["train_rows"]})
    return summary


def _train(config: TrainConfig) -> dict:
    started = time.perf_counter()
    check_outputs(config)
    data = prepare(config)
    facts = data_facts(config, data)
    optim, members = config.optim, config.combine.members
    kept_ensemble = config.model.poster_from is not None and members > 1  # each member reads its own features
    datasets = feature_datasets(config, data, facts) if optim.head_epochs and not kept_ensemble else {}
    if optim.head_epochs < optim.epochs or kept_ensemble:  # an ensemble validates on the posters
        datasets |= image_datasets(config, data)
    args = WorkerArgs(config=config, facts=facts, plan=plan(config))
    if members == 1:
        result = fit(config, facts, plan(config), datasets)
        trained = best_of(result) | {"run_path": run_location(config, result.path)}
    elif kept_ensemble:
        trained = ensemble(args, datasets, *kept_members(config, facts, data))
    else:
        combine = soup if config.combine.method == "soup" else ensemble
        trained = combine(args, datasets, *train_members(config, facts, datasets))
    return write_bundle(config, facts, data, trained, time.perf_counter() - started)


def plan(config: TrainConfig, **changes) -> WorkerPlan:
    """The plain plan of a run: the configured seed, every epoch, threads from the worker's CPU share."""
    return WorkerPlan(**({"seed": config.run.seed, "threads": worker_resources(config)[1],
                          "log_level": train_logging_level()} | changes))


def worker_resources(config: TrainConfig) -> tuple[float, int]:
    """(CPUs each worker asks for, torch threads it runs): a share that leaves room for Ray Data's reads."""
    total, run = cpu_budget(), config.run
    largest = max(node_cpus(), default=total)  # a worker lives on one node: asking more never schedules
    per_worker = run.cpus_per_worker or max(0.1, min(total * 0.8 / run.workers, largest * 0.8, 8.0))
    return per_worker, max(1, round(min(total / run.workers, largest)))


def storage(config: TrainConfig) -> Location:
    """Where Ray Train keeps checkpoints and results: ``run.storage_path``, else ``ray_results`` beside the bundle.

    A URI (``s3://bucket/ray_results``) too: every worker writes its checkpoints there, so a run over
    several nodes needs no shared volume, and the driver reads the best one back from there.
    """
    return (config.run.storage_path or config.run.out.parent / "ray_results").absolute()


def check_outputs(config: TrainConfig) -> None:
    """Refuse, before any training, a bundle or checkpoint store that could not be written (one line)."""
    config.run.out.check_store()
    storage(config).check_store()


def fit(config: TrainConfig, facts: DataFacts, worker_plan: WorkerPlan, datasets: dict):
    """One Ray Train run of ``train_loop`` (a fresh run name: Ray Train resumes a name it has seen)."""
    run, where = config.run, storage(config)
    args = WorkerArgs(config=config, facts=facts, plan=worker_plan)
    trainer = TorchTrainer(
        train_loop, train_loop_config=args.model_dump(mode="json"), datasets=datasets,
        dataset_config=data_config(run.workers),
        scaling_config=ScalingConfig(num_workers=run.workers, use_gpu=run.gpu,
                                     resources_per_worker={"CPU": worker_resources(config)[0]}),
        run_config=RunConfig(
            name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", storage_path=where.fs_path,
            storage_filesystem=None if where.is_local else where.filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_macro_auc",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=run.max_failures),
            logging_config=LoggingConfig(log_level=train_logging_level())),
    )
    return trainer.fit()


def data_config(workers: int) -> DataConfig:
    """Datasets are split between workers; a lone worker reads each whole.

    A split is served by a coordinator actor per dataset (a fresh process, ~2.5 s each here before the
    first batch); one worker has nothing to split, so it runs each dataset's pipeline itself.
    """
    return DataConfig(datasets_to_split="all" if workers > 1 else [])


def best_of(result) -> dict:
    """The run's best epoch: its weights, validation logits, their parts (residual fusion) and labels, and the
    whole history."""
    best = result.get_best_checkpoint(metric="val_macro_auc", mode="max")
    if best is None:
        raise RuntimeError(f"training reported no checkpoint (error: {result.error})")
    with best.as_directory() as directory:
        saved = torch.load(Path(directory) / "state.pt", weights_only=True, map_location="cpu")
        with np.load(Path(directory) / "validation.npz") as val:
            logits, labels = val["logits"], val["labels"]
            branches = {key.removeprefix("branch_"): val[key] for key in val.files if key.startswith("branch_")}
    with result.checkpoint.as_directory() as directory:  # the latest holds the whole history
        history = torch.load(Path(directory) / "state.pt", weights_only=True, map_location="cpu")["history"]
    # the chosen checkpoint's own epoch: a member's history also holds the warm-up epochs it started from
    return {"state": saved["model"], "logits": logits, "labels": labels, "branches": branches, "history": history,
            "best": saved["history"][-1]}


def train_members(config: TrainConfig, facts: DataFacts, datasets: dict) -> tuple[str, list[dict]]:
    """The head warms up once on frozen features; each of ``combine.members`` runs fine-tunes from that
    one checkpoint with its own seed (data order, augmentation, dropout, metadata dropout).

    Returns the warm-up's run path and the members (best checkpoint of each, in seed order).
    """
    warm = fit(config, facts, plan(config, stop_after=config.optim.head_epochs), datasets)
    if warm.checkpoint is None:
        raise RuntimeError(f"the members' head warm-up reported no checkpoint (error: {warm.error})")
    members = []
    for i in range(config.combine.members):
        seed = config.run.seed + 1000 * i
        start = run_location(config, warm.checkpoint.path)  # a URI where storage is one: workers open it by it
        result = fit(config, facts, plan(config, seed=seed, start_from=start), datasets)
        members.append(best_of(result) | {"seed": seed, "run_path": run_location(config, result.path)})
    return run_location(config, warm.path), members


def kept_members(config: TrainConfig, facts: DataFacts, data: Prepared) -> tuple[str, list[dict]]:
    """Side corrections on an ensemble's kept poster path: member i trains them on network i of
    ``model.poster_from`` (frozen), on that network's own stored features, with seed ``seed + 1000·i``;
    there is nothing to warm up. Returns the first member's run path and the members, as
    :func:`train_members` does."""
    members = []
    for i in range(config.combine.members):
        seed = config.run.seed + 1000 * i
        own = feature_datasets(config, data, facts, member=i)  # all a run of head epochs reads
        result = fit(config, facts, plan(config, seed=seed, poster_member=i), own)
        members.append(best_of(result) | {"seed": seed, "run_path": run_location(config, result.path)})
    return members[0]["run_path"], members


def run_location(config: TrainConfig, path: str) -> str:
    """A run's or checkpoint's path in the storage's file system, as its location (a URI on an object store)."""
    where = storage(config)
    return str(where / path[len(where.fs_path):].lstrip("/")) if path.startswith(where.fs_path) else path
