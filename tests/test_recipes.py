"""Named recipes: what each resolves to, scratch fallbacks said out loud, and the seed systems side by side."""

from __future__ import annotations

import json

import pytest

from posterfusion.jobs.recipes import RECIPES, resolve_recipe, train_config
from posterfusion.jobs.train import TrainConfig


def test_every_recipe_is_a_valid_train_config(tmp_path):
    for name in RECIPES:
        config = train_config(name, tmp_path / "catalogue", tmp_path / "out")
        assert isinstance(config, TrainConfig) and config.recipe == name


def test_flags_override_the_recipe_and_unset_flags_fall_through(tmp_path):
    config = train_config("quality", tmp_path, tmp_path / "out", epochs=2, variant="cnn", lr=None)
    assert config.epochs == 2 and config.variant == "cnn"
    assert config.lr == RECIPES["quality"].settings["lr"]  # None means "not given"
    assert config.image_size == 224 and config.backbone == "mobilenet_v2"
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_recipe("best", {})
    with pytest.raises(ValueError, match="extra"):
        train_config("quality", tmp_path, tmp_path / "out", epocs=3)  # a misspelt setting is an error


def test_a_recipe_whose_weights_cannot_be_had_trains_from_scratch_and_says_so(tmp_path, monkeypatch):
    from posterfusion.models import backbones

    monkeypatch.setattr(backbones, "imagenet_cached", lambda name: False)
    resolved = resolve_recipe("seed-densenet", {})
    assert resolved.settings["weights"] == "none" and resolved.settings["backbone"] == "densenet121"
    assert "ImageNet weights for densenet121 cannot be had" in resolved.notes[0]
    monkeypatch.setenv("POSTERFUSION_WEIGHTS", str(tmp_path))  # no MobileNetV2 file there
    quick = resolve_recipe("quick", {})
    assert quick.settings["backbone"] == "keras_cnn" and "mobilenet_v2_imagenet.safetensors" in quick.notes[0]
    other = resolve_recipe("quality", {"backbone": "keras_cnn"})  # the recipe's weights file is MobileNetV2's
    assert other.settings["weights"] == "none" and "keras_cnn trains from scratch" in other.notes[0]
    assert other.settings["warmup_epochs"] == 0  # no fixed features to warm a head up on
    train_config("quality", tmp_path, tmp_path / "out", backbone="keras_cnn")  # a valid config
    explicit = resolve_recipe("seed-densenet", {"weights": "imagenet"})
    assert explicit.settings["weights"] == "imagenet" and not explicit.notes  # an explicit flag always wins


def test_asking_for_no_weights_turns_a_frozen_recipe_into_full_training_and_says_so(tmp_path):
    resolved = resolve_recipe("quick", {"weights": "none", "backbone": "keras_cnn"})
    assert resolved.settings["mode"] == "finetune" and resolved.settings["warmup_epochs"] == 0
    assert any("from scratch" in note for note in resolved.notes)
    config = train_config("quick", tmp_path, tmp_path / "out", weights="none", backbone="keras_cnn")
    assert config.mode == "finetune" and config.head_epochs == 0
    with pytest.raises(ValueError, match="need pretrained weights"):  # an explicit contradiction stays an error
        train_config("quick", tmp_path, tmp_path / "out", weights="none", mode="frozen")


def test_the_seed_recipes_reproduce_their_systems_settings():
    assert RECIPES["seed-resnet50"].settings["vocab"]["keep"] == ["Drama", "Comedy", "Romance", "Thriller", "Horror",
                                                                  "Action"]
    assert RECIPES["seed-densenet"].settings["vocab"]["min_share"] > 0  # rare genres folded into Other
    assert {RECIPES[n].settings["backbone"] for n in RECIPES if n.startswith("seed-")} == {
        "densenet121", "resnet34", "vgg16", "keras_cnn", "resnet50"}
    assert RECIPES["quality"].settings["image_size"] == 224  # MobileNetV2's own training size


def test_compare_pairs_variants_within_a_recipe_and_the_first_recipe_against_each_other():
    from posterfusion.jobs.compare import Entry, paired_differences

    def entry(recipe, variant, seed):
        return Entry(recipe=recipe, variant=variant, seed=seed, name=f"{recipe}/{variant}/s{seed}", bundle=".")

    members = [entry(r, v, s) for r in ("quality", "frozen") for v in ("cnn", "fused") for s in (0, 1)]
    members.append(entry("seed-resnet34", "cnn", 0))
    pairs = paired_differences(members)
    assert ("quality/fused/s0", "quality/cnn/s0") in pairs and ("frozen/fused/s1", "frozen/cnn/s1") in pairs
    assert ("quality/cnn/s1", "frozen/cnn/s1") in pairs and ("quality/fused/s0", "frozen/fused/s0") in pairs
    assert ("quality/cnn/s0", "seed-resnet34/cnn/s0") in pairs
    assert ("frozen/cnn/s0", "quality/cnn/s0") not in pairs  # one direction: first recipe − other
    assert not [p for p in pairs if p[0].split("/")[2] != p[1].split("/")[2]]  # never across seeds
    assert len(pairs) == len(set(pairs)) == 4 + 4 + 1


@pytest.fixture(scope="module")
def sample(ray_session, tmp_path_factory):
    """One small synthetic catalogue for the recipe tests that train."""
    from support import sample_catalogue

    return sample_catalogue(tmp_path_factory.mktemp("recipes"), n=120, seed=4)


@pytest.mark.slow
def test_the_seed_recipes_train_and_stand_in_one_comparison_table(sample, tmp_path):
    from posterfusion.jobs.compare import CompareConfig, run_compare

    root = sample
    seeds = [n for n in RECIPES if n.startswith("seed-")]
    result = run_compare(CompareConfig(  # short settings: each system trains one epoch on 48 posters
        catalogue=root / "catalogue", out=tmp_path / "compare", models=tmp_path / "models", recipes=seeds,
        variants=["cnn"], n_boot=20, train={"epochs": 1, "image_size": 32, "batch_size": 16, "limit": 48}))
    rows = {row["entry"]: row for row in result["side_by_side"]}
    assert {f"{n}/cnn" for n in seeds} <= set(rows)
    assert sum(name == "label_prior" for name in (r["entry"] for r in result["side_by_side"])) == len(result["groups"])
    six = next(g for g in result["groups"] if any(e["recipe"] == "seed-resnet50" for e in g["entries"]))
    assert set(six["genres"]) <= {"Drama", "Comedy", "Romance", "Thriller", "Horror", "Action"}
    for name in seeds:
        config = json.loads((tmp_path / "models" / name / "cnn-s0" / "config.json").read_text())
        assert config["recipe"] == name and config["train"]["epochs"] == 1
    text = (tmp_path / "compare" / "report.md").read_text()
    assert "seed-keras-cnn/cnn" in text and "label_prior" in text


# 48 training posters: a vocabulary of several genres needs a lower min_count than the real catalogue's 20
SMALL = {"epochs": 1, "image_size": 32, "limit": 48, "vocab": {"min_count": 5}}


@pytest.mark.slow
def test_compare_refuses_a_bundle_trained_with_other_settings(sample, tmp_path):
    from posterfusion.jobs.compare import CompareConfig, ensure_bundles

    root = sample
    config = CompareConfig(catalogue=root / "catalogue", out=tmp_path / "compare", models=tmp_path / "models",
                           recipes=["seed-keras-cnn"], variants=["cnn"], train=SMALL)
    ensure_bundles(config)
    ensure_bundles(config)  # the same settings: the bundle is reused
    with pytest.raises(ValueError, match=r"stale: trained with other settings \(epochs\)"):
        ensure_bundles(config.model_copy(update={"train": SMALL | {"epochs": 2}}))
    with pytest.raises(ValueError, match="unknown training settings"):
        CompareConfig(catalogue=root, out=root, models=root, train={"epoch": 2})


def test_a_recipe_of_several_members_trains_one_when_the_flags_leave_no_warm_up_to_share(tmp_path):
    assert train_config("quality", tmp_path, tmp_path / "out").members == 3
    short = resolve_recipe("quality", {"epochs": 2})  # all head epochs: nothing fine-tunes after the warm-up
    assert short.settings["members"] == 1 and "one member, not an ensemble" in short.notes[0]
    assert resolve_recipe("quality", {"warmup_epochs": 0}).settings["members"] == 1
    with pytest.raises(ValueError, match="fine-tune from one warmed-up head"):  # asked for explicitly: refused
        train_config("quality", tmp_path, tmp_path / "out", epochs=2, members=2)
