"""Ray Train on the synthetic sample: distributed training, resume, variants, the bundle.

The session's ``labelled_sample`` (sample → catalogue → real YOLO TFLite object features, built
once); each test then trains a small network for a few epochs on CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from posterfusion.jobs.train import TrainConfig, run_train
from posterfusion.jobs.train.config import DataFacts, WorkerArgs, WorkerPlan, merge
from posterfusion.models.fusion import VARIANTS

from support import detector

DETECTOR = detector()
DETECTOR_PATH = __import__("pathlib").Path(DETECTOR.weights)


@pytest.fixture(scope="module")
def prepared(labelled_sample):
    """The session's sample (catalogue and object features); each test writes under it by its own name."""
    return labelled_sample


MOBILENET = {"backbone": "mobilenet_v2", "weights": "mobilenet_v2_imagenet.safetensors", "image_size": 64}


def small(prepared, name: str, **sections) -> TrainConfig:
    """A small network for a few epochs; ``sections`` (model=…, optim=…) override parts of the tree."""
    base = {"model": {"backbone": "keras_cnn", "image_size": 48},
            "optim": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "backbone_lr": 3e-3, "patience": 10},
            "data": {"catalogue": prepared / "catalogue", "features": prepared / "features", "detector": DETECTOR},
            "run": {"out": prepared / name / "bundle", "storage_path": prepared / name / "ray_results"}}
    return TrainConfig.model_validate(merge(base, sections))


def args(optim: dict | None = None, **facts) -> WorkerArgs:
    """What a worker receives, for the loop's unit tests (facts the test does not need are empty)."""
    blank = {"genres": ["a", "b"], "object_dim": 0, "metadata_dim": 0, "metadata_flags": [], "train_rows": 1,
             "metadata_presence": 0, "object_presence": None, "metadata_fields": [],
             "pos_weight": [1.0, 1.0], "label_prior": [0.5, 0.5], "missing_metadata": [], "object_mean": [0.0],
             "object_std": [1.0]}
    config = {"model": {"weights": "mobilenet_v2_imagenet.safetensors"}, "optim": optim or {}}
    return WorkerArgs(config=TrainConfig.model_validate(config),
                      facts=DataFacts.model_validate(blank | facts), plan=WorkerPlan(seed=0))


@pytest.fixture(scope="module")
def two_workers(prepared):
    """The quality path in small, trained once: pretrained MobileNetV2, the fused variant (residual fusion),
    head epochs on stored features, then DDP fine-tuning on two workers — and a worker failure injected
    right after the first fine-tuning epoch's checkpoint (one restart allowed). Full precision: bf16 (auto on
    CPUs with AMX) reorders near-ties between batches of other sizes, and the bundle's predictions are
    compared with those validated in training. Returns (summary, bundle, the failure's marker file)."""
    from posterfusion.jobs.train import run

    import faults

    name = "two"
    faults.by_value()
    marker = prepared / name / "injected_failure"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "train_loop", faults.failing_train_loop(after_epoch=3, marker=marker))
        summary = run_train(small(prepared, name, model=MOBILENET | {"variant": "fused", "fusion": "residual"},
                                  run={"workers": 2, "max_failures": 1},
                                  data={"vocab": {"min_count": 5}},  # all 8 genres: top-3 is a choice
                                  optim={"epochs": 5, "warmup_epochs": 2, "train_stages": 2, "backbone_lr": 1e-3,
                                         "amp": "off"}))
    return summary, prepared / name / "bundle", marker


def test_two_workers_warm_up_the_head_then_fine_tune_and_beat_the_label_prior(two_workers):
    summary, _, _ = two_workers
    history = summary["history"]
    assert [(h["epoch"], h["phase"]) for h in history] == [(1, "head"), (2, "head"), (3, "full"), (4, "full"),
                                                           (5, "full")]
    assert summary["workers"] == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    model, prior = summary["validation"]["model"], summary["validation"]["label_prior"]
    assert prior["roc_auc_macro"] == pytest.approx(0.5)  # the prior ranks no poster above another
    assert model["roc_auc_macro"] > 0.8
    assert model["top_n_ratio"] > prior["top_n_ratio"] + 0.1  # and it ranks genres within a poster better
    assert model["hit@3"] >= prior["hit@3"]


def test_a_worker_failure_resumes_from_the_last_checkpoint(two_workers):
    """The two-worker run above lost a worker right after reporting epoch 3 and went on from the last
    checkpoint Ray Train had registered: epoch 3's, or epoch 2's when the worker died before the controller
    took in its report (Ray Train polls its workers; both were seen here) — never from the start."""
    summary, _, marker = two_workers
    assert marker.read_text().startswith("failed after epoch 3")
    reported = [int(line) for line in (marker.parent / f"{marker.name}.reports").read_text().split()]
    again = reported[3]  # the first epoch after the restart
    assert reported[:3] == [1, 2, 3] and again in (3, 4) and reported[3:] == list(range(again, 6)), reported
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4, 5]  # the resumed state's history: each once


@pytest.fixture(scope="module")
def members(prepared):
    """A two-member ``cnn`` ensemble trained once: (its configuration, summary, the soup of the same members).
    The mechanics, not a good model: a few epochs on 64 training posters."""
    from posterfusion.jobs.train import combine, run

    soups = []

    def ensemble_and_soup(*args):  # one training run checks both ways of combining its members
        soups.append(combine.soup(*args))
        return combine.ensemble(*args)

    config = small(prepared, "members", model=MOBILENET | {"variant": "cnn"}, run={"seed": 3},
                   optim={"epochs": 3, "warmup_epochs": 2, "train_stages": 2, "backbone_lr": 1e-3,
                          "amp": "off"},  # as the Predictor below: bf16 reorders near-ties
                   combine={"members": 2}, data={"limit": 64})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "ensemble", ensemble_and_soup)
        summary = run_train(config)
    return config, summary, soups[0]


def test_members_fine_tune_from_one_warm_up_and_combine_into_an_ensemble_or_a_soup(prepared, members):
    """Two members share the head warm-up, then fine-tune apart; the bundle is their ensemble, the
    frozen stages shared. The same members, handed to the soup, give the greedy soup of them."""
    from posterfusion.jobs.train.data import load_labelled
    from posterfusion.models.metrics import macro_auc
    from posterfusion.models.predictor import Predictor

    members_config, summary, soup_summary = members
    runs = summary["members"]["runs"]
    assert summary["members"]["combine"] == "ensemble" and [m["seed"] for m in runs] == [3, 1003]
    histories = [m["history"] for m in runs]
    assert [h for h in histories[0] if h["phase"] == "head"] == [h for h in histories[1] if h["phase"] == "head"]
    assert len([h for h in histories[0] if h["phase"] == "head"]) == 2  # one warm-up, shared
    fine = [[h["train_loss"] for h in history if h["phase"] == "full"] for history in histories]
    assert fine[0] != fine[1]  # each member fine-tunes with its own seed

    config = json.loads((prepared / "members" / "bundle" / "config.json").read_text())["model"]
    assert config["members"] == 2 and config["shared_stages"] == 4  # MobileNetV2's 6 stages, the last 2 trained
    # the bundle is the ensemble validated on the driver: its validation predictions give the recorded AUC
    predictor = Predictor(prepared / "members" / "bundle", precision="off")
    frame = load_labelled(members_config)  # the validation rows data.limit left
    frame = frame[frame["split"] == "val"]
    scored = predictor.score(_posters(prepared / "catalogue", frame["movie_id"]), frame, embed=True)
    labels = predictor.vocabulary.encode_many(frame["genres"])
    assert "correction_scale" not in summary  # cnn: no side corrections to weigh
    assert macro_auc(labels, scored.probabilities) == pytest.approx(summary["best"]["val_macro_auc"], abs=0.01)
    assert scored.embeddings.shape == (len(frame), 2 * config["hidden"])

    soup = soup_summary["members"]
    best = max(runs, key=lambda m: m["best"]["val_macro_auc"])
    assert soup["chosen"][0] == best["seed"]  # the best member first; the other only if averaging gains
    assert soup_summary["best"]["val_macro_auc"] >= best["best"]["val_macro_auc"]
    assert (soup_summary["best"]["phase"] == "soup") == (len(soup["chosen"]) == 2)


def test_a_soup_averages_float_weights_and_keeps_integer_buffers():
    import torch

    from posterfusion.jobs.train.combine import average_states

    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    mean = average_states([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and mean["n"].item() == 5


def test_members_need_one_warm_up_to_start_from(prepared):
    with pytest.raises(ValueError, match="fine-tune from one warmed-up head"):
        small(prepared, "members-cold", model=MOBILENET, combine={"members": 2})


def test_a_variant_trains_and_its_bundle_reads_exactly_its_inputs(prepared):
    """Presence flags only, with gated fusion, through training, the bundle and the Predictor, on a pretrained
    backbone (frozen: its features extracted once). The other kinds of side input: none (the session's quick cnn
    bundle, below), both (the fused test below); what every variant's network reads is tests/test_models.py's."""
    run_train(small(prepared, "v-flags-only", model=MOBILENET | {"variant": "flags-only", "fusion": "gated"},
                    optim={"epochs": 2, "mode": "frozen"}))
    _reads_exactly_its_inputs(prepared, prepared / "v-flags-only" / "bundle", "flags-only", "gated")


def test_the_cnn_bundle_reads_neither_metadata_nor_objects(quick_bundles):
    _reads_exactly_its_inputs(quick_bundles, quick_bundles / "models" / "quick" / "cnn-s0", "cnn", "residual", size=48)


def test_the_fused_bundle_reads_both_side_inputs_and_reproduces_its_validation_auc(prepared, two_workers):
    """The fused bundle (fine-tuned: validation saw images, as the Predictor does), through the Predictor on the
    validation posters, gives the validation AUC training measured: not the same bundle loaded twice."""
    from posterfusion.features.objects import detector_id, load_object_features
    from posterfusion.jobs.evaluate import load_split_frame
    from posterfusion.models.metrics import macro_auc

    summary, bundle, _ = two_workers
    predictor = _reads_exactly_its_inputs(prepared, bundle, "fused", "residual")
    frame = load_split_frame(prepared / "catalogue", "val")
    cached = load_object_features(prepared / "features", detector_id(DETECTOR))  # what training read
    vectors = cached.loc[list(zip(frame["movie_id"], frame["poster_sha256"], strict=True)), "objects"].to_list()
    scored = predictor.score(_posters(prepared / "catalogue", frame["movie_id"]), frame, vectors)
    labels = predictor.vocabulary.encode_many(frame["genres"])
    weighed = summary["correction_scale"]  # the side corrections at their fitted weights: what the bundle says
    assert weighed["val_macro_auc_as_trained"] == pytest.approx(summary["best"]["val_macro_auc"], abs=1e-4)
    assert macro_auc(labels, scored.probabilities) == pytest.approx(weighed["val_macro_auc"], abs=0.01)
    assert not (bundle / "model.pt").exists() and (bundle / "calibration.json").is_file()


def _reads_exactly_its_inputs(prepared, bundle, variant: str, fusion: str, size: int = 64):
    """The bundle's config names its variant once, and its Predictor reads metadata and objects exactly as the
    variant says (flags-only sees that metadata is there, never what it says). Returns the Predictor."""
    from posterfusion.models.predictor import Predictor

    config = json.loads((bundle / "config.json").read_text())
    assert config["model"]["variant"] == variant and config["train"]["model"]["variant"] == variant
    weights = config["model"]["correction_scale"] or {}  # a side input weighed to 0 on validation is not read
    reads_metadata = VARIANTS[variant].metadata == "full" and weights.get("metadata", 1.0) > 0
    reads_objects = VARIANTS[variant].objects and weights.get("objects", 1.0) > 0
    assert config["model"]["fusion"] == fusion
    assert config["model"]["image_size"] == size and "image_size" not in config  # in the network's config, once
    assert (config["detector_id"] is not None) == VARIANTS[variant].objects
    predictor = Predictor(bundle, detect=False, precision="off")
    posters = [p.read_bytes() for p in sorted((prepared / "sample" / "Images").glob("*.jpg"))[:4]]
    objects = list(np.zeros((4, 3 * 80 + 2), np.float32))  # nothing detected

    def probabilities(metadata, vectors=objects):
        return predictor.score(posters, metadata, vectors).probabilities

    rich = [{"runtime": 150.0, "budget": 2e8, "language": "English", "year": 2010}] * 4
    with_meta, without = probabilities(rich), probabilities([None] * 4)
    same_flags = probabilities([{"runtime": 80.0, "budget": 1e5, "language": "French", "year": 1950}] * 4)
    flags_read = VARIANTS[variant].metadata == "flags" and weights.get("metadata", 1.0) > 0
    assert (not np.allclose(with_meta, without)) == (reads_metadata or flags_read)
    assert (not np.allclose(with_meta, same_flags)) == reads_metadata
    assert (not np.allclose(probabilities(rich, [v + 1 for v in objects]), with_meta)) == reads_objects
    return predictor


def test_side_corrections_on_an_ensembles_poster_path_keep_each_members_network_and_its_ranking(prepared, members):
    """``model.poster_from`` an ensemble: member i trains its side corrections on the ensemble's network i, on
    that fine-tuned network's own stored features (no warm-up to share); the bundle is an ensemble again, every
    poster-path tensor the ``cnn`` ensemble's, so without side inputs it ranks each genre as that ensemble."""
    from posterfusion.jobs.evaluate import load_split_frame
    from posterfusion.models.bundle import load_bundle
    from posterfusion.models.metrics import auc_per_genre as per_genre_auc
    from posterfusion.models.predictor import Predictor

    cnn = members[0].run.out
    config = small(prepared, "members-kept", model=MOBILENET | {"variant": "fused", "fusion": "residual",
                                                                 "poster_from": str(cnn)},
                   run={"seed": 3}, optim={"epochs": 2, "amp": "off"}, combine={"members": 2}, data={"limit": 64})
    assert config.optim.mode == "frozen" and config.optim.head_epochs == 2
    summary = run_train(config)
    assert [m["seed"] for m in summary["members"]["runs"]] == [3, 1003]
    assert all([h["phase"] for h in m["history"]] == ["head", "head"] for m in summary["members"]["runs"])
    kept, source = load_bundle(config.run.out), load_bundle(cnn)
    assert (kept.config.model.members, kept.config.model.shared_stages) == (2, source.config.model.shared_stages)
    theirs, ours = source.state_dict(), kept.state_dict()
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)  # both members' poster paths, unchanged
    frame = load_split_frame(prepared / "catalogue", "val")
    posters, nothing = _posters(prepared / "catalogue", frame["movie_id"]), list(np.zeros((len(frame), 3 * 80 + 2)))
    labels = source.vocabulary.encode_many(frame["genres"])
    alone = [Predictor(bundle, detect=False, precision="off").score(posters, [None] * len(frame), nothing)
             for bundle in (cnn, config.run.out)]
    np.testing.assert_allclose(per_genre_auc(labels, alone[1].probabilities),
                               per_genre_auc(labels, alone[0].probabilities), rtol=0, atol=1e-9)


def _posters(catalogue, ids) -> list[bytes]:

    from posterfusion.features.catalogue import catalogue_files

    table = catalogue_files(catalogue).dataset().to_table(columns=["movie_id", "poster"])
    by_id = dict(zip(table["movie_id"].to_pylist(), table["poster"].to_pylist(), strict=True))
    return [by_id[i] for i in ids]


def test_side_corrections_on_the_cnn_bundles_poster_path_leave_a_poster_without_side_inputs_ranked_as_cnn(
        quick_bundles):
    """``model.poster_from``: the session's quick ``cnn`` bundle is the fused model's poster path, kept as it was
    through Ray Train (frozen, recorded by version); without side inputs the Predictor ranks the validation posters
    exactly as the ``cnn`` bundle does, per genre. A bundle that is not one ``cnn`` network is refused first."""
    from posterfusion.errors import UserValueError
    from posterfusion.jobs.evaluate import load_split_frame
    from posterfusion.jobs.train.recipes import resolve
    from posterfusion.models.bundle import load_bundle
    from posterfusion.models.metrics import auc_per_genre as per_genre_auc
    from posterfusion.models.predictor import Predictor

    from support import QUICK

    root, cnn = quick_bundles, quick_bundles / "models" / "quick" / "cnn-s0"

    def fused(poster_from, name):
        model = QUICK["model"] | {"variant": "fused", "poster_from": str(poster_from)}
        return resolve("quick", {**QUICK, "model": model, "optim": QUICK["optim"] | {"epochs": 1},
                                 "data": {"catalogue": root / "catalogue", "features": root / "features"},
                                 "run": {"out": root / name / "bundle", "storage_path": root / name / "ray_results"}},
                       from_scratch=True)

    with pytest.raises(UserValueError, match="its variant is 'fused', not 'cnn'"):
        run_train(fused(root / "models" / "quick" / "fused-s0", "on-fused"))
    run_train(fused(cnn, "on-cnn"))
    kept, source = load_bundle(root / "on-cnn" / "bundle"), load_bundle(cnn)
    assert kept.config.model.poster_from == str(cnn) and kept.config.model.poster_version == source.version
    theirs, ours = source.state_dict(), kept.state_dict()
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)  # the whole poster path, unchanged
    frame = load_split_frame(root / "catalogue", "val")
    posters, nothing = _posters(root / "catalogue", frame["movie_id"]), list(np.zeros((len(frame), 3 * 80 + 2)))
    labels = source.vocabulary.encode_many(frame["genres"])
    alone = [Predictor(bundle, detect=False, precision="off").score(posters, [None] * len(frame), nothing)
             for bundle in (cnn, root / "on-cnn" / "bundle")]
    np.testing.assert_allclose(per_genre_auc(labels, alone[1].probabilities),
                               per_genre_auc(labels, alone[0].probabilities), rtol=0, atol=1e-9)


def test_a_side_correction_validation_does_not_support_is_weighed_down_and_one_it_supports_is_kept():
    """After training, each residual correction gets the weight under which validation ranks best."""
    from posterfusion.jobs.train.finish import fit_correction_scale

    rng = np.random.default_rng(0)
    labels = (rng.random((400, 5)) < 0.3).astype(np.float32)
    signal = labels - 0.3
    branches = {"poster": signal + rng.normal(0, 1.0, labels.shape),      # a fair poster path
                "objects": rng.normal(0, 2.0, labels.shape),              # noise: it only hurts
                "metadata": signal + rng.normal(0, 1.0, labels.shape)}    # a second, independent view
    chosen, said = fit_correction_scale(branches, labels, [0.0, 0.5, 1.0])
    assert chosen == {"objects": 0.0, "metadata": 1.0}
    assert said["val_macro_auc"] > said["val_macro_auc_as_trained"] and said["val_macro_auc"] > said[
        "val_macro_auc_poster_alone"]
    assert fit_correction_scale(branches, labels, [1.0])[0] == {"objects": 1.0, "metadata": 1.0}  # as trained


def test_metadata_dropout_blanks_whole_metadata_blocks_with_the_no_metadata_encoding():
    import torch

    from posterfusion.jobs.train.loop import batch_side_inputs
    from posterfusion.models.fusion import FusionConfig
    from posterfusion.models.network import build_model

    missing = [0.0, 0.0, 1.0, 0.0]
    model = build_model(FusionConfig(backbone="keras_cnn", variant="cnn+metadata", num_genres=2, metadata_dim=4))
    batch = {"metadata": torch.rand(64, 4) + 2, "objects": torch.zeros(64, 1)}
    config = args({"metadata_dropout": 0.5}, missing_metadata=missing)
    torch.manual_seed(0)
    _, dropped = batch_side_inputs(model, batch, config, train=True)
    blank = (dropped == torch.tensor(missing)).all(dim=1)
    kept = (dropped == batch["metadata"]).all(dim=1)
    assert (blank | kept).all() and 15 < int(blank.sum()) < 49  # whole rows, about half of them
    _, evaluated = batch_side_inputs(model, batch, config, train=False)
    assert torch.equal(evaluated, batch["metadata"])  # never at validation or serving time


def test_field_dropout_blanks_fields_exactly_as_the_encoder_encodes_a_record_without_them():
    """A client may send only a year: training sees such rows, encoded as the service would encode them."""
    import pandas as pd
    import torch

    from posterfusion.features.metadata import FIELDS, MetadataEncoder
    from posterfusion.jobs.train.loop import drop_fields

    record = {"year": 1999, "runtime": 120.0, "imdb_score": 7.1, "num_votes": 5000, "budget": 3e7, "gross": 9e7,
              "popularity": 12.0, "content_rating": "R", "language": "English", "country": "USA"}
    encoder = MetadataEncoder.fit(pd.DataFrame([record, record | {"year": 2005, "language": "French"}]))
    names = encoder.feature_names()
    fields = [([i for i, n in enumerate(names) if n == f or n.startswith(f"{f}=")], names.index(f"{f}_missing"))
              for f in FIELDS]
    facts = args(metadata_presence=names.index("has_metadata"), metadata_fields=fields).facts
    full = torch.tensor(encoder.transform_records([record] * 200))
    torch.manual_seed(0)
    dropped = drop_fields(full, facts, rate=0.5)
    for row in dropped[:40]:
        kept = {f: record[f] for f, (_, flag) in zip(FIELDS, fields, strict=True) if row[flag] == 0}
        expected = encoder.transform_records([kept or None])[0]
        np.testing.assert_allclose(row.numpy(), expected)
    blanked = dropped[:, [flag for _, flag in fields]].mean().item()
    assert 0.4 < blanked < 0.6  # about half of all fields


def test_training_a_variant_with_objects_requires_features(prepared):
    with pytest.raises(ValueError, match="pass --features"):
        run_train(small(prepared, "nofeat", data={"features": None, "detector": None}, model={"variant": "fused"}))


def test_the_detector_defaults_to_the_one_the_features_directory_recorded(prepared):
    from posterfusion.jobs.train.data import resolve_detector

    config = small(prepared, "recorded", data={"detector": None}, model={"variant": "fused"})
    assert resolve_detector(config).weights == str((DETECTOR_PATH).resolve())


def test_stored_backbone_features_are_refused_without_pretrained_weights(prepared):
    """A random backbone extracting the features and another random one in the bundle would not match."""
    with pytest.raises(ValueError, match="need pretrained weights"):
        small(prepared, "scratch-frozen", optim={"mode": "frozen"}, model={"weights": "none"})
    with pytest.raises(ValueError, match="need pretrained weights"):
        small(prepared, "scratch-warm", optim={"warmup_epochs": 1}, model={"weights": "none"})


def test_the_head_continues_fine_tuning_at_its_own_peak_rate_and_the_backbone_waits_for_it():
    """Warm-up trains the head alone; fine-tuning wakes the backbone and runs the head at finetune_head_lr."""
    from posterfusion.jobs.train.loop import lr_schedules

    config = args({"warmup_epochs": 2, "epochs": 4, "lr": 1e-3, "finetune_head_lr": 2e-4})
    backbone, head = lr_schedules(config, steps_per_epoch=100)
    assert [backbone(s) for s in (0, 50, 199)] == [0.0, 0.0, 0.0]
    assert max(head(s) for s in range(200)) == pytest.approx(1.0)  # the warm-up reaches lr
    assert max(head(s) for s in range(200, 400)) == pytest.approx(0.2)  # fine-tuning peaks at 2e-4
    assert max(backbone(s) for s in range(200, 400)) == pytest.approx(1.0)  # backbone_lr at its peak
    same = args({"warmup_epochs": 2, "epochs": 4, "lr": 1e-3, "finetune_head_lr": 1e-3})
    assert max(lr_schedules(same, 100)[1](s) for s in range(200, 400)) == pytest.approx(1.0)


WORDS = {"Drama": "a family torn apart", "Comedy": "a hilarious mixup", "Action": "explosive chase",
         "Horror": "a haunted house", "Romance": "falls in love", "Sci-Fi": "an alien planet",
         "Animation": "a cartoon kingdom", "Documentary": "true archival footage"}


@pytest.mark.slow
def test_the_overviews_words_are_fitted_on_training_weighed_on_validation_and_served(prepared, tmp_path):
    """A catalogue whose TMDb file gives most posters an overview that names its genres: training fits the text
    model on the training split, validation gives its correction a weight > 0, and the bundle's Predictor scores
    validation as training measured it — an overview changes a poster's scores, none leaves it as without."""
    import csv

    import pandas as pd

    from posterfusion.jobs.evaluate import load_split_frame
    from posterfusion.jobs.ingest import IngestConfig, run_ingest
    from posterfusion.models.metrics import macro_auc
    from posterfusion.models.predictor import Predictor

    labels = pd.read_csv(prepared / "sample" / "train.csv")
    rng = np.random.default_rng(3)
    tmdb = tmp_path / "tmdb.csv"
    with open(tmdb, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["imdb_id", "title", "overview"])
        for movie_id, genres in zip(labels["Id"], labels["Genre"], strict=True):
            if rng.random() < 0.7:
                told = [WORDS[g] for g in WORDS if g in genres]
                writer.writerow([movie_id, movie_id, " and ".join([*told, "a story"]) + "."])
    run_ingest(IngestConfig(sources=[f"multilabel:{prepared / 'sample'}"], metadata=[tmdb], out=tmp_path / "cat"))
    config = small(prepared, "words", model={"variant": "cnn+metadata", "fusion": "residual", "metadata_text": 50},
                   data={"catalogue": tmp_path / "cat", "features": None, "detector": None})
    summary = run_train(config)
    bundle = config.run.out
    network = json.loads((bundle / "config.json").read_text())["model"]
    assert network["text_span"] and summary["correction_scale"]["chosen"]["text"] > 0
    weighed = summary["correction_scale"]
    assert weighed["val_macro_auc"] > weighed["val_macro_auc_poster_alone"]

    frame = load_split_frame(tmp_path / "cat", "val")
    predictor = Predictor(bundle, detect=False, precision="off")
    posters = _posters(tmp_path / "cat", frame["movie_id"])
    scored = predictor.score(posters, frame)
    assert macro_auc(predictor.vocabulary.encode_many(frame["genres"]), scored.probabilities) == pytest.approx(
        weighed["val_macro_auc"], abs=0.01)
    genre = next(g for g in WORDS if g in predictor.genres)
    told = predictor.score(posters[:1], [{"overview": f"{WORDS[genre]}, and {WORDS[genre]}."}]).probabilities
    blank = predictor.score(posters[:1], [{"overview": "Nothing known here."}]).probabilities
    nothing = predictor.score(posters[:1], [None]).probabilities
    assert told[0, predictor.genres.index(genre)] > blank[0, predictor.genres.index(genre)]
    assert not np.allclose(nothing, blank)  # an overview is metadata: the poster is in the other slice
