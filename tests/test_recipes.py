"""The training configuration and its recipes: one typed tree, recipes as partial trees of it, `--set` for any
knob, no silent downgrade when pretrained weights are missing, and the seed systems side by side."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from posterfusion.errors import UserValueError
from posterfusion.jobs.train import TrainConfig
from posterfusion.jobs.train.config import merge, parse_sets, setting_names, shortcut_overrides
from posterfusion.jobs.train.recipes import RECIPES, Recipe, describe, resolve

from support import REPO, cli_main


def test_every_recipe_is_a_typed_partial_tree_that_resolves(tmp_path):
    for name, recipe in RECIPES.items():
        assert isinstance(recipe.settings, TrainConfig)
        partial = recipe.partial()
        assert set(partial) <= {"model", "optim", "data", "combine"}  # only what it sets; paths never
        config = resolve(name, check_weights=False)
        assert config.recipe == name and config.model_dump(mode="json", exclude_unset=True)["recipe"] == name


def test_a_misspelt_or_invalid_recipe_setting_fails_when_the_recipe_is_made():
    with pytest.raises(ValidationError, match="epocs"):
        Recipe(name="x", purpose="x", settings={"optim": {"epocs": 3}})
    with pytest.raises(ValidationError, match="fine-tune from one warmed-up head"):
        Recipe(name="x", purpose="x", settings={"combine": {"members": 2}})  # a rule of the tree, checked here too


def test_set_reaches_any_setting_and_a_misspelt_name_gets_a_hint():
    overrides = parse_sets(["optim.epochs=20", "model.variant=cnn", "data.vocab.keep=[Drama, Comedy]",
                            "optim.lr=3e-4", "run.gpu=true"])
    config = resolve("quality", overrides, check_weights=False)
    assert (config.optim.epochs, config.model.variant, config.data.vocab.keep) == (20, "cnn", ["Drama", "Comedy"])
    assert config.optim.lr == 3e-4 and config.run.gpu is True
    assert config.optim.warmup_epochs == 12 and config.model.image_size == 224  # the rest: the recipe's
    with pytest.raises(UserValueError, match=r"unknown setting 'optim.epocs'; did you mean optim.epochs"):
        parse_sets(["optim.epocs=3"])
    with pytest.raises(ValidationError, match="epochs"):
        resolve("quality", parse_sets(["optim.epochs=none-such"]), check_weights=False)
    assert "model.image_size" in setting_names() and "data.detector.conf" in setting_names()


def test_the_common_flags_are_their_settings_and_set_wins():
    tree = shortcut_overrides(["run.seed=7"], catalogue="c", out="o", variant="cnn", seed=3, gpu=None)
    assert tree == {"data": {"catalogue": "c"}, "run": {"out": "o", "seed": 7}, "model": {"variant": "cnn"}}


def test_from_scratch_is_the_one_explicit_way_to_train_without_pretrained_weights():
    quality = resolve("quality", from_scratch=True, check_weights=False)
    assert quality.model.weights == "none" and quality.optim.head_epochs == 0 and quality.combine.members == 1
    assert "from scratch" in quality.notes[0]
    quick = resolve("quick", from_scratch=True, check_weights=False)  # the recipe's own scratch settings
    assert (quick.model.backbone, quick.model.size, quick.optim.mode) == ("keras_cnn", 64, "finetune")
    assert resolve("quality").notes == []  # nothing changed, nothing said


def test_missing_weights_are_refused_saying_where_they_were_looked_for(tmp_path, monkeypatch):
    from posterfusion.jobs.train import recipes

    monkeypatch.setenv("POSTERFUSION_WEIGHTS", str(tmp_path))  # no MobileNetV2 file there
    with pytest.raises(UserValueError) as refused:
        resolve("quality")
    message = str(refused.value)
    assert "mobilenet_v2_imagenet.safetensors" in message and str(tmp_path) in message
    assert "--from-scratch" in message and "\n" not in message
    monkeypatch.setattr(recipes, "imagenet_cached", lambda name: False)
    with pytest.raises(UserValueError, match="ImageNet weights for densenet121"):
        resolve("seed-densenet")
    explicit = resolve("seed-densenet", {"model": {"weights": "imagenet"}})  # the user's own choice: may download
    assert explicit.model.weights == "imagenet"
    with pytest.raises(UserValueError, match="do not fit backbone"):  # another backbone, the recipe's weights file
        monkeypatch.setenv("POSTERFUSION_WEIGHTS", str(REPO.parent / "shared" / "weights"))
        resolve("quality", {"model": {"backbone": "keras_cnn"}})


def test_train_and_compare_refuse_missing_weights_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSTERFUSION_WEIGHTS", str(tmp_path))  # nothing there
    for command in (["train", "--catalogue", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")],
                    ["compare", "--catalogue", str(tmp_path / "nowhere"), "--models", str(tmp_path / "m"),
                     "--out", str(tmp_path / "r")]):
        status, _, err = cli_main(command, monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1, err
        assert lines[0].startswith("posterfusion: error: recipe 'quality' starts from the weights file "
                                   "mobilenet_v2_imagenet.safetensors, not found")
        assert "--from-scratch" in lines[0] and not (tmp_path / "b").exists() and not (tmp_path / "m").exists()


def test_recipes_show_prints_the_resolved_configuration_without_training(monkeypatch, capsys):
    status, out, err = cli_main(["recipes", "--show", "quality", "--set", "optim.epochs=20", "--set",
                                 "model.variant=cnn"], monkeypatch, capsys)
    assert status == 0, err
    shown = yaml.safe_load(out)
    assert shown["optim"]["epochs"] == 20 and shown["model"]["variant"] == "cnn" and shown["recipe"] == "quality"
    assert TrainConfig.model_validate(shown).optim.warmup_epochs == 12


def test_the_rules_tying_settings_together_are_the_trees_own():
    with pytest.raises(ValidationError, match="need pretrained weights"):
        TrainConfig.model_validate({"optim": {"mode": "frozen"}})
    with pytest.raises(ValidationError, match=r"combine\.members 1"):
        resolve("quality", {"optim": {"warmup_epochs": 0}}, check_weights=False)
    assert resolve("quality", {"optim": {"warmup_epochs": 0}, "combine": {"members": 1}},
                   check_weights=False).combine.members == 1
    with pytest.raises(UserValueError, match="pass --features"):
        resolve("quality", {"data": {"catalogue": "c"}, "run": {"out": "o"}}, check_weights=False).check_ready()
    kept = resolve("quality", {"model": {"poster_from": "m/cnn-s0"}}, check_weights=False)  # a frozen poster path:
    assert (kept.optim.mode, kept.optim.head_epochs, kept.combine.members) == ("frozen", 16, 3)  # heads only
    assert any("model.poster_from" in note for note in kept.notes)
    with pytest.raises(ValidationError, match=r"combine\.method ensemble"):
        resolve("quality", {"model": {"poster_from": "m/cnn-s0"}, "combine": {"method": "soup"}}, check_weights=False)


def test_a_recipes_description_is_generated_from_its_settings():
    assert describe(RECIPES["quality"].resolved()) == (
        "mobilenet_v2 (mobilenet_v2_imagenet.safetensors) at 224 px, fused (residual fusion); 12 head epochs on frozen "
        "features, then 3 runs of 4 epochs fine-tuning the last 2 stages, kept as an ensemble; metadata dropout 0.3; "
        "the overview through 2,000 words")
    cnn = RECIPES["quality"].resolved().model_copy(deep=True)
    cnn.model.variant = "cnn"
    assert "overview" not in describe(cnn)  # a variant reading no metadata reads no overview either
    assert "genres: Drama, Comedy, Romance, Thriller, Horror, Action" in RECIPES["seed-resnet50"].summary()


def test_the_seed_recipes_reproduce_their_systems_settings():
    resolved = {name: r.resolved() for name, r in RECIPES.items()}
    assert resolved["seed-resnet50"].data.vocab.keep == ["Drama", "Comedy", "Romance", "Thriller", "Horror", "Action"]
    assert resolved["seed-densenet"].data.vocab.min_share > 0  # rare genres folded into Other
    assert {resolved[n].model.backbone for n in RECIPES if n.startswith("seed-")} == {
        "densenet121", "resnet34", "vgg16", "keras_cnn", "resnet50"}
    assert {resolved[n].model.variant for n in RECIPES if n.startswith("seed-")} == {"cnn"}
    assert resolved["quality"].model.size == 224  # MobileNetV2's own training size


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


# 48 training posters: a vocabulary of several genres needs a lower min_count than the real catalogue's 20
SMALL = {"optim": {"epochs": 1, "batch_size": 16}, "model": {"image_size": 32},
         "data": {"limit": 48, "vocab": {"min_count": 5}}}
SEEDS = ["seed-keras-cnn", "seed-densenet", "seed-resnet50"]


@pytest.fixture(scope="module")
def seed_comparison(sample, tmp_path_factory):
    """The three seed recipes compared once (each trains one epoch on 48 posters): (its config, its result).

    The networks are the small Keras CNN for all three (what makes the groups is the vocabulary; every
    backbone's forward pass is test_models'), trained from scratch.
    """
    from posterfusion.jobs.compare import CompareConfig, run_compare

    root = tmp_path_factory.mktemp("seed-comparison")
    config = CompareConfig(catalogue=sample / "catalogue", out=root / "compare", models=root / "models",
                           recipes=SEEDS, variants=["cnn"], n_boot=20, from_scratch=True,
                           # min_count 0: seed-keras-cnn keeps every genre
                           train=SMALL | {"model": {"image_size": 32, "backbone": "keras_cnn"},
                                          "data": {"limit": 48, "vocab": {"min_count": 0}}})
    # seed-densenet's 3 % share floor folds nothing on 48 posters whose rarest genre has 8 %: scale it to them
    densenet = RECIPES["seed-densenet"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(RECIPES, "seed-densenet", Recipe(
            name=densenet.name, purpose=densenet.purpose, system=densenet.system, metric=densenet.metric,
            settings=merge(densenet.partial(), {"data": {"vocab": {"min_share": 0.15}}})))
        return config, run_compare(config)


@pytest.mark.slow
def test_seed_recipes_of_three_vocabularies_stand_in_one_comparison_tracked_as_one_mlflow_run(seed_comparison):
    """Each vocabulary kind a seed system uses (every genre over a count; rare ones by share folded into Other;
    the six main ones) makes its own group, side by side in one table."""
    from mlflow import MlflowClient

    config, result = seed_comparison
    out = config.out
    rows = {row["entry"]: row for row in result["side_by_side"]}
    assert {f"{n}/cnn" for n in SEEDS} <= set(rows)
    assert len(result["groups"]) == 3 and sum(r["entry"] == "label_prior" for r in result["side_by_side"]) == 3
    six = next(g for g in result["groups"] if any(e["recipe"] == "seed-resnet50" for e in g["entries"]))
    assert set(six["genres"]) <= {"Drama", "Comedy", "Romance", "Thriller", "Horror", "Action"}
    for name in SEEDS:
        trained = json.loads((config.models / name / "cnn-s0" / "config.json").read_text())
        assert trained["recipe"] == name and trained["train"]["optim"]["epochs"] == 1
        assert any("from scratch" in note for note in trained["train"]["notes"])
    text = (out / "report.md").read_text()
    assert "seed-keras-cnn/cnn" in text and "label_prior" in text

    client = MlflowClient()  # the whole comparison is one parent run; its three trainings are nested in it
    experiment = client.get_experiment_by_name("posterfusion")
    parent = client.search_runs([experiment.experiment_id], f"tags.`posterfusion.report` = '{out}'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert sorted(run.data.params["recipe"] for run in children) == sorted(SEEDS)
    assert all(run.data.params["optim.epochs"] == "1" for run in children)
    assert len(client.get_metric_history(children[0].info.run_id, "val_macro_auc")) == 1  # one epoch, one point
    assert any(key.endswith("roc_auc_main6") for key in parent[0].data.metrics)
    assert "report.md" in {f.path for f in client.list_artifacts(parent[0].info.run_id)}


@pytest.mark.slow
def test_compare_reuses_a_current_bundle_and_retrains_a_stale_one_saying_why(seed_comparison, tmp_path, capsys,
                                                                             monkeypatch):
    """A copy of the comparison's seed-keras-cnn bundle: the same settings reuse it, another epoch count retrains it."""
    import shutil

    from posterfusion.jobs import compare
    from posterfusion.jobs.compare import CompareConfig, ensure_bundles

    compared, _ = seed_comparison
    models = shutil.copytree(compared.models / "seed-keras-cnn", tmp_path / "models" / "seed-keras-cnn").parent
    config = compared.model_copy(update={"recipes": ["seed-keras-cnn"], "models": models})
    bundle = config.models / "seed-keras-cnn" / "cnn-s0"
    first = (bundle / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    ensure_bundles(config)  # the same settings: the bundle is reused
    assert (bundle / "model.safetensors").stat().st_mtime_ns == first and "stale" not in capsys.readouterr().out
    retrained = []  # the retraining itself is run_train's, tested on its own: here, what compare hands it
    monkeypatch.setattr(compare, "run_train", lambda train: retrained.append(train) or {})
    monkeypatch.setattr(compare, "format_train_summary", lambda summary: "trained")
    ensure_bundles(config.model_copy(update={"train": config.train | {"optim": {"epochs": 2, "batch_size": 16}}}))
    assert "is stale: trained with other settings (optim.epochs); retraining it" in capsys.readouterr().out
    assert [(str(t.run.out), t.optim.epochs, t.recipe) for t in retrained] == [(str(bundle), 2, "seed-keras-cnn")]
    with pytest.raises(ValidationError, match="epoch"):
        CompareConfig(catalogue=bundle, out=bundle, models=bundle, train={"optim": {"epoch": 2}})


def test_compare_retrains_a_residual_bundle_whose_side_corrections_were_never_weighed(monkeypatch):
    """A fused bundle trained before ``optim.correction_scales`` existed scores with every correction at 1:
    not what training makes now, though its recorded settings match (a new setting reads as its default)."""
    from types import SimpleNamespace

    from posterfusion.jobs import compare
    from posterfusion.jobs.compare import stale_reason
    from posterfusion.models.bundle import FORMAT_VERSION
    from posterfusion.models.fusion import FusionConfig

    train = TrainConfig()
    network = FusionConfig(variant="fused", fusion="residual", num_genres=3, object_dim=4, metadata_dim=5,
                           metadata_presence=0, object_presence=0)
    recorded = train.model_dump(mode="json")
    older = recorded | {"optim": {k: v for k, v in recorded["optim"].items() if k != "correction_scales"}}

    def bundle(model, settings):
        return SimpleNamespace(config=SimpleNamespace(format_version=FORMAT_VERSION, model=model, train=settings,
                                                      catalogue={"fingerprint": "f"}))

    monkeypatch.setattr(compare, "catalogue_identity", lambda _: {"fingerprint": "f"})  # the same catalogue
    assert "never weighed on validation" in stale_reason(bundle(network, older), train)
    weighed = network.model_copy(update={"correction_scale": {"objects": 0.5, "metadata": 1.0}})
    assert stale_reason(bundle(weighed, recorded), train) is None


def test_compare_can_train_side_corrections_on_each_seeds_cnn_bundle_and_retrains_them_when_it_changes(
        tmp_path, monkeypatch):
    """``--poster-from-cnn``: the cnn entries come first, each other variant keeps the same seed's cnn bundle as its
    poster path (in a folder of its own), and is stale once that bundle's version is no longer the one it kept."""
    from types import SimpleNamespace

    from posterfusion.jobs import compare
    from posterfusion.jobs.compare import CompareConfig, entries, entry_config, stale_reason
    from posterfusion.models.bundle import FORMAT_VERSION

    config = CompareConfig(catalogue=tmp_path, out=tmp_path / "out", models=tmp_path / "models", recipes=["frozen"],
                           variants=["fused", "cnn"], seeds=[0, 1], poster_from_cnn=True)
    todo = entries(config)
    assert [(e.variant, e.seed, e.bundle.name) for e in todo] == [
        ("cnn", 0, "cnn-s0"), ("cnn", 1, "cnn-s1"), ("fused", 0, "fused_on_cnn-s0"), ("fused", 1, "fused_on_cnn-s1")]
    trains = [entry_config(config, e) for e in todo]
    assert [t.model.poster_from for t in trains] == [None, None, *(str(tmp_path / "models" / "frozen" / f"cnn-s{s}")
                                                                   for s in (0, 1))]
    ensembles = CompareConfig(catalogue=tmp_path, out=tmp_path, models=tmp_path, recipes=["quality"],
                              variants=["cnn", "fused"], poster_from_cnn=True)
    fused = entry_config(ensembles, entries(ensembles)[1])  # member i keeps the cnn ensemble's network i
    assert (fused.combine.members, fused.optim.mode, fused.model.poster_from) == (3, "frozen", str(tmp_path / "quality"
                                                                                                 / "cnn-s0"))
    with pytest.raises(ValueError, match="name --variant cnn too"):
        CompareConfig(catalogue=tmp_path, out=tmp_path, models=tmp_path, variants=["fused"], poster_from_cnn=True)

    train = trains[2]
    network = SimpleNamespace(poster_from=train.model.poster_from, poster_version="v1", fusion="residual",
                              uses_objects=True, uses_metadata=True, correction_scale={"objects": 0.0})
    kept = SimpleNamespace(config=SimpleNamespace(format_version=FORMAT_VERSION, model=network,
                                                  train=train.model_dump(mode="json"), catalogue={"fingerprint": "f"}))
    monkeypatch.setattr(compare, "catalogue_identity", lambda _: {"fingerprint": "f"})
    monkeypatch.setattr(compare, "bundle_exists", lambda _: True)
    monkeypatch.setattr(compare, "load_bundle", lambda _: SimpleNamespace(version="v1"))
    assert stale_reason(kept, train) is None
    monkeypatch.setattr(compare, "load_bundle", lambda _: SimpleNamespace(version="v2"))  # cnn-s0 retrained
    assert "the cnn bundle whose poster path it keeps" in stale_reason(kept, train)


def test_the_demo_opts_into_training_from_scratch_itself_when_the_weights_are_missing(tmp_path, monkeypatch, capsys):
    """`make demo` on a fresh machine without ../shared: one line says so, and the demo still trains."""
    from posterfusion.jobs.demo import DemoConfig, training_config

    monkeypatch.setenv("POSTERFUSION_WEIGHTS", str(tmp_path))  # nothing there
    config = training_config(DemoConfig(), tmp_path / "catalogue", tmp_path / "features", tmp_path / "model")
    said = capsys.readouterr().out.strip().splitlines()
    assert config.model.weights == "none" and config.model.backbone == "keras_cnn" and config.notes
    assert len(said) == 1 and "mobilenet_v2_imagenet.safetensors" in said[0] and "--from-scratch" in said[0]
    monkeypatch.setenv("POSTERFUSION_WEIGHTS", str(REPO.parent / "shared" / "weights"))
    assert training_config(DemoConfig(), tmp_path / "c", tmp_path / "f", tmp_path / "m").model.weights != "none"
    assert capsys.readouterr().out == ""  # the weights are there: nothing to say


def test_the_overview_vocabulary_makes_a_metadata_bundle_stale_and_leaves_a_cnn_bundle_current(monkeypatch):
    """``model.metadata_text`` changes what a variant reading metadata learns, not what a ``cnn`` learns: a cnn
    bundle trained before it stays current (no pointless retraining), a fused one is retrained."""
    from types import SimpleNamespace

    from posterfusion.jobs import compare
    from posterfusion.jobs.compare import stale_reason
    from posterfusion.models.bundle import FORMAT_VERSION
    from posterfusion.models.fusion import FusionConfig

    def bundle(variant: str, settings: dict):
        network = FusionConfig(variant=variant, num_genres=3, metadata_dim=5 if variant != "cnn" else 0,
                               metadata_flags=[4] if variant == "flags-only" else [])
        return SimpleNamespace(config=SimpleNamespace(format_version=FORMAT_VERSION, model=network, train=settings,
                                                      catalogue={"fingerprint": "f"}))

    monkeypatch.setattr(compare, "catalogue_identity", lambda _: {"fingerprint": "f"})
    for variant, stale in (("cnn", False), ("flags-only", False), ("cnn+metadata", True)):
        before = TrainConfig.model_validate({"model": {"variant": variant}})
        now = TrainConfig.model_validate({"model": {"variant": variant, "metadata_text": 2000}})
        reason = stale_reason(bundle(variant, before.model_dump(mode="json")), now)
        assert (reason is not None) == stale, (variant, reason)
        assert stale is False or "model.metadata_text" in reason
