"""Named training recipes: ``posterfusion train --recipe NAME`` (``--set`` still overrides any setting).

A recipe is a typed *partial* :class:`~posterfusion.jobs.train.config.TrainConfig`: only the
settings it names count (Pydantic's ``exclude_unset``), everything else keeps the tree's
defaults. Every recipe is validated when this module loads (``tests/test_recipes.py`` loads them
all), and its one-line description is generated from its settings, so it cannot drift from them.

* ``quick`` — the demo: a pretrained backbone, frozen, a few head epochs on small images.
* ``frozen`` — ``quality`` with the backbone never trained: the head alone on features extracted
  once, the fast CPU path and the baseline that fine-tuning must beat.
* ``quality`` — the best fused model we found that this 2-core CPU trains within the hour: the
  ImageNet MobileNetV2 at its native 224 px, head epochs on frozen features, then fine-tuning
  runs of its last two stages at a lower rate (the warmed-up head too: restarting it at its full
  rate undid the warm-up on 2 of 3 seeds, chosen on validation by
  ``benchmarks/finetune_sweep.py``), three such runs from the one warmed-up head kept as an
  ensemble (on validation above its members' mean on every headline metric; its shared frozen
  stages run once), metadata dropout, calibrated outputs, and residual fusion: the poster alone
  gives the logits and metadata / objects add a correction only where they exist (chosen on
  validation by ``benchmarks/fusion_sweep.py``: the concatenating head lost to CNN-only on posters
  without metadata); the metadata correction reads the overview's words too (2,000, TF-IDF: on
  validation a linear model of them added +0.05 macro ROC-AUC where an overview exists).
  Results: docs/results.md.
* ``seed-*`` — the seed systems this project grew from, so their numbers can be put beside ours;
  poster-only (``cnn``) like those systems: DenseNet-121 with rare genres folded into Other (seed
  000, judged by the top-n ratio), ResNet-34 (001), VGG-16 and the small Keras CNN (002, judged by
  hit@3), ResNet-50 on the six main genres with validation-tuned thresholds (003, per-genre ROC-AUC).

No silent downgrade: a recipe whose pretrained weights cannot be found here refuses before any
work, saying where it looked; ``--from-scratch`` is the one explicit way to train without them
(the recipe's ``scratch`` settings then apply, and the bundle's notes say so).
"""

from __future__ import annotations

from functools import reduce

from pydantic import BaseModel, ConfigDict, Field

from posterfusion.errors import UserValueError
from posterfusion.jobs.train.config import TrainConfig, merge
from posterfusion.models.backbones import create_backbone, imagenet_cached
from posterfusion.models.metrics import MAIN_GENRES
from posterfusion.weights import find_weights, where_looked

MOBILENET_WEIGHTS = "mobilenet_v2_imagenet.safetensors"


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    purpose: str = Field(description="why it exists; what it does is generated from its settings")
    system: str | None = Field(None, description="the seed system it reproduces, if any")
    metric: str = Field("roc_auc_macro", description="the headline metric its system was judged by")
    settings: TrainConfig = Field(description="a partial tree: only the settings it sets count")
    scratch: TrainConfig = Field(default_factory=TrainConfig, description="what --from-scratch changes too")

    def partial(self) -> dict:
        return self.settings.model_dump(mode="json", exclude_unset=True)

    def resolved(self) -> TrainConfig:
        """The recipe with every other setting at its default."""
        return TrainConfig.model_validate(self.partial())

    def summary(self) -> str:
        return f"{describe(self.resolved())} — {self.purpose}"


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe(name="quick", purpose="the demo",
           settings={"model": {"weights": MOBILENET_WEIGHTS, "image_size": 96, "fusion": "residual"},
                     "optim": {"mode": "frozen", "epochs": 6, "lr": 3e-3, "patience": 6, "metadata_dropout": 0.3}},
           scratch={"model": {"backbone": "keras_cnn", "image_size": 64}}),
    Recipe(name="quality", purpose="the best fused model this 2-core CPU trains within the hour",
           settings={"model": {"weights": MOBILENET_WEIGHTS, "image_size": 224, "fusion": "residual",
                               "metadata_text": 2000},
                     "optim": {"warmup_epochs": 12, "epochs": 16, "train_stages": 2, "lr": 1e-3,
                               "backbone_lr": 2e-4, "finetune_head_lr": 2e-4, "metadata_dropout": 0.3},
                     "combine": {"members": 3}}),
    Recipe(name="frozen", purpose="the fast CPU path, and the baseline fine-tuning must beat",
           settings={"model": {"weights": MOBILENET_WEIGHTS, "image_size": 224, "fusion": "residual",
                               "metadata_text": 2000},
                     "optim": {"mode": "frozen", "epochs": 16, "metadata_dropout": 0.3}}),
    Recipe(name="seed-densenet", system="seed 000", metric="top_n_ratio", purpose="seed 000's system",
           settings={"model": {"variant": "cnn", "backbone": "densenet121", "weights": "imagenet", "image_size": 96},
                     "optim": {"epochs": 6, "lr": 2e-3, "backbone_lr": 2e-3},
                     "data": {"vocab": {"min_share": 0.03}}}),
    Recipe(name="seed-resnet34", system="seed 001", purpose="seed 001's system",
           settings={"model": {"variant": "cnn", "backbone": "resnet34", "weights": "imagenet", "image_size": 96},
                     "optim": {"epochs": 6, "lr": 2e-3, "backbone_lr": 2e-3}}),
    Recipe(name="seed-vgg16", system="seed 002", metric="hit@3", purpose="seed 002's system",
           settings={"model": {"variant": "cnn", "backbone": "vgg16", "weights": "imagenet", "image_size": 64},
                     "optim": {"epochs": 5, "lr": 1e-3, "backbone_lr": 1e-3}}),
    Recipe(name="seed-keras-cnn", system="seed 002", metric="hit@3",
           purpose="the Keras poster project's small CNN (16-32-64-64 5×5 convs)",
           settings={"model": {"variant": "cnn", "backbone": "keras_cnn", "image_size": 96},
                     "optim": {"epochs": 10, "lr": 3e-3, "backbone_lr": 3e-3}}),
    Recipe(name="seed-resnet50", system="seed 003", metric="per-genre roc_auc",
           purpose="seed 003's system: the six main genres, thresholds tuned on validation",
           settings={"model": {"variant": "cnn", "backbone": "resnet50", "weights": "imagenet", "image_size": 96},
                     "optim": {"epochs": 6, "lr": 2e-3, "backbone_lr": 2e-3},
                     "data": {"vocab": {"keep": list(MAIN_GENRES), "min_count": 0, "fold_into_other": False}}}),
]}

# Without pretrained weights there are no fixed features to train a head on first: every epoch trains it
# all, and there is no warmed-up head for members to share.
FROM_SCRATCH = {"model": {"weights": "none"}, "optim": {"mode": "finetune", "warmup_epochs": 0},
                "combine": {"members": 1}}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def resolve(name: str | None, overrides: dict | None = None, from_scratch: bool = False,
            check_weights: bool = True) -> TrainConfig:
    """The recipe, then (``from_scratch``) no pretrained weights and the recipe's scratch settings, then
    ``overrides`` (a partial tree: CLI flags and ``--set``); validated; its weights checked unless asked not.

    A weights value given in ``overrides`` is the user's own choice: ``imagenet`` there may download
    (torchvision), where a recipe's own ImageNet weights must already be in the local cache.
    """
    overrides = overrides or {}
    recipe = get_recipe(name) if name else None
    layers, notes = [recipe.partial() if recipe else {}], []
    if from_scratch:
        layers += [FROM_SCRATCH, recipe.scratch.model_dump(mode="json", exclude_unset=True) if recipe else {}]
        notes.append("trained from scratch (--from-scratch): no pretrained weights, every epoch trains the whole "
                     "network")
    tree = reduce(merge, [*layers, overrides, {"recipe": name, "notes": notes}])
    config = TrainConfig.model_validate(tree)
    if check_weights:
        require_pretrained(config, explicit="weights" in overrides.get("model", {}))
    return config


def weights_problem(config: TrainConfig, explicit: bool = False) -> str | None:
    """Why ``config``'s starting weights cannot be used here (None: they can)."""
    weights, backbone = config.model.weights, config.model.backbone
    if weights == "none" or (weights == "imagenet" and (explicit or imagenet_cached(backbone))):
        return None
    source = f"recipe {config.recipe!r}" if config.recipe else "this run"
    if weights == "imagenet":
        return (f"{source} starts from ImageNet weights for {backbone}, which are not in torch's local cache "
                "and this run will not download them: on a machine with a network pass "
                "--set model.weights=imagenet to fetch them")
    if find_weights(weights) is None:
        return (f"{source} starts from the weights file {weights}, not found (looked at {where_looked(weights)}): "
                "put the file there (../shared/weights holds it here; `make` points POSTERFUSION_WEIGHTS at it)")
    return None


def require_pretrained(config: TrainConfig, explicit: bool = False) -> None:
    """Refuse, before any work, weights that cannot be had or do not fit the backbone (one line, exit 2)."""
    problem = weights_problem(config, explicit)
    if problem:
        raise UserValueError(f"{problem}; or pass --from-scratch to train without pretrained weights "
                             "(a far weaker model)")
    if config.model.weights not in ("none", "imagenet"):
        create_backbone(config.model.backbone, config.model.weights)  # raises, naming the keys that do not fit


def describe(config: TrainConfig) -> str:
    """One line saying what a configuration trains, generated from its settings."""
    model, optim, combine, vocab = config.model, config.optim, config.combine, config.data.vocab
    weights = {"none": "from scratch", "imagenet": "ImageNet"}.get(model.weights, model.weights)
    fusion = f" ({model.fusion} fusion)" if model.uses_objects or model.uses_metadata else ""
    parts = [f"{model.backbone} ({weights}) at {model.size} px, {model.variant}{fusion}"]
    if optim.mode == "frozen":
        parts.append(f"backbone frozen: {optim.epochs} head epochs on features extracted once")
    else:
        stages = "all stages" if optim.train_stages is None else f"the last {optim.train_stages} stages"
        runs = f"{combine.members} runs of " if combine.members > 1 else ""
        kept = {"ensemble": ", kept as an ensemble", "soup": ", weight-averaged"}[combine.method]
        head = f"{optim.head_epochs} head epochs on frozen features, then " if optim.head_epochs else ""
        verb = "training" if model.weights == "none" else "fine-tuning"
        parts.append(f"{head}{runs}{optim.epochs - optim.head_epochs} epochs {verb} {stages}"
                     f"{kept if combine.members > 1 else ''}")
    if optim.metadata_dropout and model.uses_metadata:
        parts.append(f"metadata dropout {optim.metadata_dropout:g}")
    if model.text_words:
        parts.append(f"the overview through {model.text_words:,} words")
    if vocab.keep:
        parts.append(f"genres: {', '.join(vocab.keep)}")
    elif vocab.min_share:
        parts.append(f"genres under {vocab.min_share:.0%} of posters folded into Other")
    return "; ".join(parts)
