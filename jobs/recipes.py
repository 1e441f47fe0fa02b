"""Named training recipes: ``posterfusion train --recipe NAME`` (flags still override any setting).

A recipe is a small typed preset of :class:`~posterfusion.jobs.train.TrainConfig` settings, in
the spirit of torchvision's reference recipes: the run that a name stands for is reproducible
from the name, and the bundle records both the name and the resolved settings.

* ``quick`` — the demo: a pretrained backbone, frozen, a few head epochs on small images.
* ``frozen`` — ``quality`` with the backbone never trained: the head alone on features extracted
  once, the fast CPU path and the baseline that fine-tuning must beat.
* ``quality`` — the best fused model we found that this 2-core CPU trains within an hour: the
  ImageNet MobileNetV2 at its native 224 px, 12 head epochs on frozen features, then 4 epochs
  fine-tuning its last two stages at a lower rate (the warmed-up head too: restarting it at its
  full rate undid the warm-up on 2 of 3 seeds, chosen on validation by
  ``benchmarks/finetune_sweep.py``), three such fine-tuning runs from the one warmed-up head
  kept as an ensemble (on validation: above its members' mean on every headline metric, where
  which single seed wins is a coin toss; its shared frozen stages run once), metadata dropout,
  calibrated outputs. How it compares with the frozen backbone alone (test split, paired) is
  in docs/results.md.
* ``seed-*`` — the seed systems this project grew from, so their numbers can be put beside
  ours; poster-only (``cnn``) like those systems, unless a variant is asked for: DenseNet-121
  with rare genres folded into Other (seed 000, judged by the top-n ratio), ResNet-34 (001),
  VGG-16 and the small Keras CNN (002, judged by hit@3), ResNet-50 on the six main genres with
  validation-tuned thresholds (003, judged by per-genre ROC-AUC).

A recipe whose pretrained weights cannot be had here (no network; only the MobileNetV2 file in
``$POSTERFUSION_WEIGHTS``) trains from scratch instead and says so in its notes: the summary
prints them and the bundle records them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from posterfusion.errors import UserValueError
from posterfusion.models.evaluation import MAIN_GENRES

MOBILENET_WEIGHTS = "mobilenet_v2_imagenet.safetensors"


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    summary: str
    system: str | None = Field(None, description="the seed system it reproduces, if any")
    metric: str = Field("roc_auc_macro", description="the headline metric its system was judged by")
    settings: dict = Field(description="TrainConfig fields")
    scratch: dict = Field(default_factory=dict, description="settings replacing these when the weights are missing")


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe(name="quick", summary="demo: frozen pretrained MobileNetV2, 96 px, 6 head epochs",
           settings={"backbone": "mobilenet_v2", "weights": MOBILENET_WEIGHTS, "mode": "frozen", "image_size": 96,
                     "epochs": 6, "lr": 3e-3, "patience": 6, "metadata_dropout": 0.3},
           scratch={"backbone": "keras_cnn", "weights": "none", "mode": "finetune", "image_size": 64, "epochs": 6,
                    "lr": 3e-3}),
    Recipe(name="quality",
           summary="MobileNetV2 (ImageNet) at 224 px: 12 head epochs on frozen features, then three runs of 4 "
                   "epochs fine-tuning its last two stages from that head (at the backbone's lower rate), kept "
                   "as an ensemble whose frozen stages run once; metadata dropout 0.3 (13–14 min of training on "
                   "2 CPU cores, after ~2 min extracting backbone features once per catalogue)",
           settings={"backbone": "mobilenet_v2", "weights": MOBILENET_WEIGHTS, "mode": "finetune", "image_size": 224,
                     "warmup_epochs": 12, "epochs": 16, "train_stages": 2, "lr": 1e-3, "backbone_lr": 2e-4,
                     "finetune_head_lr": 2e-4, "batch_size": 32, "weight_decay": 1e-2, "dropout": 0.3, "patience": 3,
                     "metadata_dropout": 0.3, "members": 3, "combine": "ensemble"}),
    Recipe(name="frozen",
           summary="the quality recipe with the backbone never trained: 16 head epochs on MobileNetV2 features "
                   "extracted once at 224 px (the fast CPU path, and the baseline fine-tuning must beat)",
           settings={"backbone": "mobilenet_v2", "weights": MOBILENET_WEIGHTS, "mode": "frozen", "image_size": 224,
                     "epochs": 16, "lr": 1e-3, "batch_size": 32, "weight_decay": 1e-2, "dropout": 0.3, "patience": 3,
                     "metadata_dropout": 0.3}),
    Recipe(name="seed-densenet", system="seed 000", metric="top_n_ratio",
           summary="DenseNet-121, genres on under 3 % of training posters folded into Other",
           settings={"variant": "cnn", "backbone": "densenet121", "weights": "imagenet", "image_size": 96, "epochs": 6,
                     "lr": 2e-3, "backbone_lr": 2e-3, "vocab": {"min_share": 0.03}}),
    Recipe(name="seed-resnet34", system="seed 001", metric="roc_auc_macro", summary="ResNet-34",
           settings={"variant": "cnn", "backbone": "resnet34", "weights": "imagenet", "image_size": 96, "epochs": 6,
                     "lr": 2e-3, "backbone_lr": 2e-3}),
    Recipe(name="seed-vgg16", system="seed 002", metric="hit@3", summary="VGG-16",
           settings={"variant": "cnn", "backbone": "vgg16", "weights": "imagenet", "image_size": 64, "epochs": 5,
                     "lr": 1e-3, "backbone_lr": 1e-3}),
    Recipe(name="seed-keras-cnn", system="seed 002", metric="hit@3",
           summary="the Keras poster project's small CNN (16-32-64-64 5×5 convs), from scratch",
           settings={"variant": "cnn", "backbone": "keras_cnn", "weights": "none", "image_size": 96, "epochs": 10,
                     "lr": 3e-3, "backbone_lr": 3e-3}),
    Recipe(name="seed-resnet50", system="seed 003", metric="per-genre roc_auc",
           summary="ResNet-50 on the six main genres, thresholds tuned on validation",
           settings={"variant": "cnn", "backbone": "resnet50", "weights": "imagenet", "image_size": 96, "epochs": 6,
                     "lr": 2e-3, "backbone_lr": 2e-3,
                     "vocab": {"keep": list(MAIN_GENRES), "min_count": 0, "fold_into_other": False}}),
]}


# Without pretrained weights there are no fixed features to train a head on first: every epoch trains it all.
FROM_SCRATCH = {"weights": "none", "mode": "finetune", "warmup_epochs": 0}


class ResolvedRecipe(BaseModel):
    """What a recipe became on this machine: the settings used and why they differ from the recipe."""

    name: str | None
    settings: dict
    notes: list[str]


def weights_available(backbone: str, weights: str) -> bool:
    """Whether ``weights`` can be loaded here without any network access."""
    from posterfusion.models.backbones import imagenet_cached, weights_file

    if weights == "none":
        return True
    if weights == "imagenet":
        return imagenet_cached(backbone)
    try:
        weights_file(weights)
    except (FileNotFoundError, ValueError):
        return False
    return True


def resolve_recipe(name: str | None, overrides: dict) -> ResolvedRecipe:
    """The recipe's settings, its scratch fallback where its weights cannot be had, then ``overrides``.

    Explicit ``overrides`` (CLI flags) always win, weights included: a user who asks for
    ``--weights imagenet`` gets torchvision's download, with whatever network that needs. A run
    that ends up from scratch (weights ``none``, asked for or not) trains the whole network every
    epoch — there are no fixed features for a frozen head — unless the flags say otherwise.
    """
    if name is None:
        return ResolvedRecipe(name=None, settings=dict(overrides), notes=[])
    if name not in RECIPES:
        raise UserValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    settings, notes = dict(recipe.settings), []
    backbone = overrides.get("backbone", settings.get("backbone", "mobilenet_v2"))
    weights = settings.get("weights", "none")
    if "weights" not in overrides and backbone != settings.get("backbone") and weights not in ("none", "imagenet"):
        # a weights file belongs to the recipe's own backbone; another backbone starts from scratch
        notes.append(f"{weights} holds {settings.get('backbone')} weights: {backbone} trains from scratch")
        settings, weights = settings | FROM_SCRATCH, "none"
    if "weights" not in overrides and not weights_available(backbone, weights):
        what = f"ImageNet weights for {backbone}" if weights == "imagenet" else f"weights file {weights}"
        settings |= FROM_SCRATCH | recipe.scratch
        notes.append(f"{what} cannot be had on this machine (no network, not in the local cache): "
                     f"trained from scratch ({settings['backbone']}, weights none)")
    resolved = settings | overrides
    if resolved.get("weights", "none") == "none":
        scratch = {k: v for k, v in FROM_SCRATCH.items() if k not in overrides and resolved.get(k) != v}
        if scratch:
            notes.append("from scratch: every epoch trains the whole network (no frozen features, no head warm-up)")
            resolved |= scratch
    warm_up = resolved.get("mode", "finetune") == "finetune" and 0 < resolved.get("warmup_epochs", 0) < resolved.get(
        "epochs", 10)
    if resolved.get("members", 1) > 1 and "members" not in overrides and not warm_up:
        # members fine-tune from one warmed-up head: without a warm-up followed by fine-tuning there is one run
        notes.append("no fine-tuning after a head warm-up (mode finetune, 0 < warmup_epochs < epochs): one member, "
                     "not an ensemble")
        resolved["members"] = 1
    return ResolvedRecipe(name=name, settings=resolved, notes=notes)


def train_config(recipe: str | None, catalogue: Path, out: Path, **overrides):
    """A validated :class:`TrainConfig` from a recipe name, the paths and any overrides."""
    from posterfusion.jobs.train import TrainConfig

    resolved = resolve_recipe(recipe, {k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(catalogue=catalogue, out=out, recipe=recipe, notes=resolved.notes, **resolved.settings)
