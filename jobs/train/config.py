"""The training configuration: one typed tree that the CLI, the recipes, the workers and the bundle use as is.

    model    ModelConfig (models/fusion.py): backbone, weights, image size, variant, fusion head
    optim    how the network learns: phases, epochs, rates, regularisation, augmentation, precision
    data     what it learns from: catalogue, object features, detector, vocabulary, caches
    run      where and how it runs: the bundle it writes, workers, GPUs, Ray Train storage, seed
    combine  several fine-tuning runs from one warm-up, made into one bundle

Adding a knob is one field here (or in ``ModelConfig``): ``--set optim.lr=3e-4`` reaches it from
the command line (:func:`parse_sets`), a recipe sets it by its dotted name, the Ray Train workers
read it from the configuration they receive, and the bundle records the whole tree. Every rule
that ties settings together is a validator of :class:`TrainConfig`, written once.

What the workers need that the data decides (label statistics, input widths) is
:class:`DataFacts`, computed on the driver and sent beside the configuration; what differs
between the Ray Train runs of one training (a member's seed, where it starts) is a
:class:`WorkerPlan`.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, model_validator

from posterfusion.errors import UserValueError
from posterfusion.features.objects import DetectorConfig
from posterfusion.features.vocab import VocabConfig
from posterfusion.locations import Location
from posterfusion.models.fusion import FusionConfig, ModelConfig
from posterfusion.models.hardware import Amp


class OptimConfig(BaseModel):
    """How the network learns. Two phases: ``warmup_epochs`` train the head on stored backbone
    features, then the backbone (its last ``train_stages``) fine-tunes at ``backbone_lr``."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["finetune", "frozen"] = Field("finetune", description="frozen: only the head ever trains")
    epochs: int = Field(10, ge=1, description="all epochs, head warm-up included")
    warmup_epochs: int = Field(0, ge=0, description="head-only epochs on frozen backbone features first")
    batch_size: int = Field(32, ge=1, description="per worker")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the head")
    backbone_lr: float = Field(2e-4, gt=0, description="peak learning rate of the backbone when it trains")
    finetune_head_lr: float | None = Field(None, gt=0, description="peak rate of the head once the backbone "
                                           "trains (None: lr); a warmed-up head need not restart at full rate")
    train_stages: int | None = Field(None, ge=1, description="fine-tune only the backbone's last N stages "
                                     "(None: all); frozen stages cost no gradients")
    weight_decay: float = Field(1e-2, ge=0)
    patience: int = Field(3, ge=1, description="epochs without val macro AUC gain before stopping")
    pos_weight_cap: float = Field(1.0, ge=1.0, description="per-genre neg/pos loss weight cap; 1 = unweighted")
    metadata_dropout: float = Field(0.0, ge=0, le=1, description="share of training samples seen without metadata")
    metadata_field_dropout: float = Field(0.0, ge=0, le=1, description="chance that each field a training sample "
                                          "has is blanked on its own (a client may send only a year)")
    correction_scales: list[NonNegativeFloat] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1, description="residual "
                                           "fusion: the weights each side correction may get, chosen after training "
                                           "by validation macro ROC-AUC ([1.0]: as trained)")
    augment: bool = Field(True, description="random crops, flips and light colour jitter while fine-tuning")
    amp: Amp = Field("auto", description="autocast: auto | off | bf16 | fp16")

    @property
    def head_epochs(self) -> int:
        """Epochs that train the head alone on stored features."""
        return self.epochs if self.mode == "frozen" else min(self.warmup_epochs, self.epochs)

    @property
    def head_lr_finetuning(self) -> float:
        return self.finetune_head_lr or self.lr


class DataConfig(BaseModel):
    """What the network learns from."""

    model_config = ConfigDict(extra="forbid")

    catalogue: Location | None = Field(None, description="catalogue (`posterfusion ingest --out`): a path or a URI")
    features: Location | None = Field(None, description="object features (`posterfusion features --out`)")
    detector: DetectorConfig | None = Field(None, description="default: the one the features dir recorded")
    cache: Location | None = Field(None, description="backbone-feature cache (default: CATALOGUE/cache)")
    vocab: VocabConfig = Field(default_factory=VocabConfig)
    limit: int | None = Field(None, ge=1,
                              description="use at most this many training rows, a quarter as many others (quick runs)")

    @property
    def cache_dir(self) -> Location:
        return self.cache or self.catalogue / "cache"


class RunSettings(BaseModel):
    """Where and how the run happens: none of it changes what the network learns, but the seed."""

    model_config = ConfigDict(extra="forbid")

    out: Location | None = Field(None, description="bundle to write: a local path or a URI (s3://bucket/models/v3)")
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP)")
    gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float | None = Field(None, gt=0, description="default: a share of the cluster's CPUs")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from (resuming a checkpoint)")
    storage_path: Location | None = Field(None, description="Ray Train checkpoints and results, a path or a URI "
                                         "(default: OUT/../ray_results, beside the bundle)")
    seed: int = 0


class CombineConfig(BaseModel):
    """Several fine-tuning runs from the one warmed-up head (seeds seed + 1000·i), made into one bundle."""

    model_config = ConfigDict(extra="forbid")

    members: int = Field(1, ge=1, description="fine-tuning runs from one head warm-up")
    method: Literal["ensemble", "soup"] = Field(
        "ensemble", description="ensemble: keep every member, average their logits (their shared frozen stages "
        "run once); soup: greedily average their weights (one network's inference cost)")


class TrainConfig(BaseModel):
    """Everything a training run is decided by. Recipes (:mod:`.recipes`) are partial trees of it."""

    model_config = ConfigDict(extra="forbid")

    recipe: str | None = Field(None, description="the recipe these settings came from (recorded in the bundle)")
    notes: list[str] = Field(default_factory=list, description="what resolving the recipe changed, and why")
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    run: RunSettings = Field(default_factory=RunSettings)
    combine: CombineConfig = Field(default_factory=CombineConfig)

    @model_validator(mode="after")
    def _stored_features_need_fixed_weights(self) -> TrainConfig:
        """Head epochs train on features extracted once; a random backbone would differ in every process
        (a kept poster path's backbone is a trained bundle's: fixed)."""
        if self.model.weights == "none" and self.optim.head_epochs and not self.model.poster_from:
            raise ValueError("frozen mode and head warm-up train on stored backbone features, which need "
                             "pretrained weights (model.weights FILE or imagenet); from scratch, use optim.mode "
                             "finetune with optim.warmup_epochs 0")
        return self

    @model_validator(mode="after")
    def _a_kept_poster_path_trains_heads_only(self) -> TrainConfig:
        """A kept poster path is frozen, so nothing would fine-tune: every epoch trains the side corrections on
        stored features of its backbone (optim.mode frozen, said in the notes)."""
        if self.model.poster_from and self.optim.mode != "frozen":
            self.optim = self.optim.model_copy(update={"mode": "frozen"})
            self.notes = [*self.notes, "model.poster_from keeps a frozen poster path: optim.mode frozen (every "
                          "epoch trains the side corrections on stored features)"]
        if self.model.poster_from and self.combine.members > 1 and self.combine.method != "ensemble":
            raise ValueError("model.poster_from with combine.members > 1 keeps each member's poster path: "
                             "combine.method ensemble")
        return self

    @model_validator(mode="after")
    def _members_need_a_shared_warm_up(self) -> TrainConfig:
        """Members start from one warmed-up head: weights average well only between runs that left one
        starting point, and an ensemble's members share the stages that checkpoint froze. With a kept poster
        path, member i keeps that ensemble's member i instead (their shared stages are its)."""
        if self.combine.members > 1 and not self.model.poster_from and not (
                self.optim.mode == "finetune" and 0 < self.optim.warmup_epochs < self.optim.epochs):
            raise ValueError("combine.members > 1 fine-tune from one warmed-up head: they need optim.mode "
                             "finetune and 0 < optim.warmup_epochs < optim.epochs (or set combine.members 1)")
        return self

    @model_validator(mode="after")
    def _only_what_the_variant_reads(self) -> TrainConfig:
        """A variant without objects reads no features: record none, so equal runs have equal configs."""
        if not self.model.uses_objects and (self.data.features or self.data.detector):
            self.data = self.data.model_copy(update={"features": None, "detector": None})
        return self

    def check_ready(self) -> None:
        """Refuse, before any work, a configuration that lacks what a run needs (recipes leave paths unset)."""
        missing = [name for name, value in (("data.catalogue", self.data.catalogue), ("run.out", self.run.out))
                   if value is None]
        if missing:
            raise UserValueError(f"a training run needs {' and '.join(missing)}")
        if self.model.uses_objects and self.data.features is None:
            raise UserValueError(f"variant {self.model.variant!r} reads object features: pass --features "
                                 "(run `posterfusion features` first)")


class DataFacts(BaseModel):
    """What the training data decided, computed once on the driver and sent to the workers."""

    genres: list[str]
    object_dim: int = Field(description="object vector width (0: the variant reads none)")
    metadata_dim: int
    metadata_flags: list[int] = Field(description="columns of the metadata vector that are presence flags")
    metadata_presence: int = Field(description="the metadata column that is 1 when a poster has any")
    metadata_fields: list[tuple[list[int], int]] = Field(description="per metadata field: its value columns and "
                                                         "its missing flag (per-field dropout)")
    text_span: tuple[int, int] | None = Field(None, description="the metadata columns of the overview's words")
    text_weights: list[list[float]] | None = Field(None, description="the text correction (genres × words), fitted "
                                                   "on the training split's overviews")
    object_presence: int | None = Field(description="the object-vector entry that is 0 when nothing was detected")
    train_rows: int
    pos_weight: list[float] = Field(description="per-genre loss weight (neg/pos, capped)")
    label_prior: list[float] = Field(description="per-genre share of positives in the training split")
    missing_metadata: list[float] = Field(description="the encoding of 'no metadata' (metadata dropout)")
    object_mean: list[float]
    object_std: list[float]
    poster_version: str | None = Field(None, description="the version of the model.poster_from bundle, as read")


class WorkerPlan(BaseModel):
    """What one Ray Train run of a training does beyond the configuration (members differ here)."""

    seed: int
    stop_after: int | None = Field(None, description="stop after this epoch (the members' shared head warm-up)")
    start_from: str | None = Field(None, description="checkpoint to continue from (a member: the warm-up's)")
    poster_member: int = Field(0, ge=0, description="which network of an ensemble model.poster_from this run keeps")
    threads: int = Field(1, ge=1, description="torch threads per worker")
    log_level: str = Field("WARNING", description="the workers' root logger (Ray Train sets it to INFO)")


class WorkerArgs(BaseModel):
    """The one argument of ``train_loop``: the configuration itself, the data's facts, this run's plan."""

    config: TrainConfig
    facts: DataFacts
    plan: WorkerPlan


def network_config(config: TrainConfig, facts: DataFacts) -> FusionConfig:
    """The network as built: the model section plus the input widths the data decided."""
    model = config.model
    return FusionConfig(**model.model_dump(exclude={"freeze_bn", "image_size"}), image_size=model.size,
                        num_genres=len(facts.genres), object_dim=facts.object_dim,
                        metadata_dim=facts.metadata_dim, metadata_flags=facts.metadata_flags,
                        metadata_presence=facts.metadata_presence, object_presence=facts.object_presence,
                        text_span=facts.text_span,
                        freeze_backbone=config.optim.mode == "frozen" or model.poster_from is not None,
                        poster_version=facts.poster_version,
                        freeze_bn=model.weights != "none" if model.freeze_bn is None else model.freeze_bn)


# --- partial trees: recipes and overrides ----------------------------------------------------

# The few settings common enough for a flag of their own; everything else is `--set section.field=value`.
SHORTCUTS = {"catalogue": "data.catalogue", "out": "run.out", "features": "data.features",
             "variant": "model.variant", "seed": "run.seed", "workers": "run.workers", "gpu": "run.gpu"}


def parse_sets(assignments: list[str]) -> dict:
    """``["optim.lr=3e-4", "model.image_size=160"]`` → a partial tree; unknown names are refused with a hint.

    Values are read as YAML scalars or lists (``true``, ``160``, ``[Drama, Comedy]``); the
    configuration's own validation then checks their types.
    """
    tree: dict = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        if not sep or not name.strip():
            raise UserValueError(f"--set takes NAME=VALUE (e.g. optim.lr=3e-4), got {assignment!r}")
        check_setting(name.strip())
        tree = merge(tree, nested(name.strip(), yaml.safe_load(text) if text.strip() else None))
    return tree


def shortcut_overrides(sets: list[str], **flags) -> dict:
    """The partial tree of the common flags (see :data:`SHORTCUTS`; None = not given), then ``--set``."""
    tree: dict = {}
    for flag, value in flags.items():
        if value is not None:
            tree = merge(tree, nested(SHORTCUTS[flag], str(value) if isinstance(value, Path | Location) else value))
    return merge(tree, parse_sets(sets))


def nested(dotted: str, value: Any) -> dict:
    """``("a.b.c", v)`` → ``{"a": {"b": {"c": v}}}``."""
    tree: Any = value
    for part in reversed(dotted.split(".")):
        tree = {part: tree}
    return tree


def merge(base: dict, update: dict) -> dict:
    """A deep merge: ``update``'s leaves replace ``base``'s; sections merge."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def setting_names(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted setting name of the tree (leaves only)."""
    names = []
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        names += setting_names(section, f"{prefix}{name}.") if section else [f"{prefix}{name}"]
    return names


def check_setting(dotted: str) -> None:
    """Raise a one-line error naming the closest settings when ``dotted`` is not one."""
    known = setting_names()
    if dotted in known:
        return
    close = difflib.get_close_matches(dotted, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; settings: {', '.join(known)}"
    raise UserValueError(f"unknown setting {dotted!r}{hint}")


def _section(annotation) -> type[BaseModel] | None:
    """The model class of a section field (``DetectorConfig | None`` counts as one), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        sections = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return sections[0] if len(sections) == 1 else None
    return None


def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested settings dict as dotted names → leaf values (what `compare` diffs)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def format_config(config: TrainConfig) -> str:
    """The resolved configuration as YAML (``posterfusion recipes --show``)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
