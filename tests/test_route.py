"""``posterfusion route``: a cnn bundle and a side-input bundle made one bundle, each slice of posters scored by
the network validation chose for it, and ``compare --route-by-metadata`` judging it as its variant."""

from __future__ import annotations

import numpy as np
import pytest

from posterfusion.errors import UserValueError
from posterfusion.jobs import route as routing
from posterfusion.jobs.route import RouteConfig, composed, judged, run_route, slice_platt
from posterfusion.models.calibration import Calibration

from support import QUICK


def test_a_slices_platt_step_composes_with_its_networks_calibration_into_one():
    rng = np.random.default_rng(0)
    raw, labels = rng.normal(size=(200, 3)) * 2, (rng.random((200, 3)) < 0.3).astype(np.float32)
    first = Calibration(shift=[0.4, -1.0, 0.0], scale=[1.5, 0.7, 1.0], bias=[0.2, 0.0, -0.3])
    then, probabilities = slice_platt(first.probabilities(raw), labels)
    assert then.fitted_on == 200 and then.shift == [0.0] * 3
    np.testing.assert_allclose(composed(first, then).probabilities(raw), probabilities, atol=1e-5)
    empty, same = slice_platt(first.probabilities(raw[:0]), labels[:0])
    assert empty.fitted_on == 0 and same.shape == (0, 3)


def test_a_slice_goes_to_the_side_network_only_where_validation_shows_its_gain_clear_of_zero():
    rng = np.random.default_rng(1)
    labels = (rng.random((300, 4)) < 0.4).astype(np.float32)
    noise = rng.normal(size=labels.shape)
    informed, blind = labels + noise, noise  # the first ranks every genre far better
    assert judged(informed, blind, labels, n_boot=200)["route"] == "side"
    other = rng.normal(size=labels.shape)
    even = judged(0.3 * labels + other, 0.3 * labels + noise, labels, n_boot=200)  # alike: no clear gain either way
    assert even["route"] == "cnn" and even["gain"]["low"] < 0 < even["gain"]["high"]
    small = judged(informed[:10], blind[:10], labels[:10], n_boot=200)  # too few posters to judge
    assert small["route"] == "cnn" and small["gain"] is None


def bundle(root, variant):
    return root / "models" / "quick" / f"{variant}-s0"


@pytest.fixture(scope="module")
def routed(quick_bundles, tmp_path_factory):
    """The quick fused and cnn bundles routed, the posters with metadata sent to the fused network and the others
    to the cnn whatever validation says (the sample's validation split is too small to show a gain), so both
    networks serve a slice: (root, routed bundle, summary)."""
    out = tmp_path_factory.mktemp("routed") / "fused_routed-s0"
    routes = iter(["side", "cnn"])  # the slices are judged in this order: with metadata, without

    def forced(side, cnn, labels, n_boot):
        return judged(side, cnn, labels, n_boot) | {"route": next(routes)}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routing, "judged", forced)
        summary = run_route(RouteConfig(cnn=bundle(quick_bundles, "cnn"), side=bundle(quick_bundles, "fused"),
                                        out=out, features=quick_bundles / "features", n_boot=50))
    return quick_bundles, out, summary


@pytest.mark.slow
def test_a_routed_bundle_ranks_each_slice_exactly_as_the_network_it_was_routed_to(routed):
    from posterfusion.jobs.evaluate import EvaluateConfig, load_split_frame, model_scores
    from posterfusion.models.bundle import load_bundle
    from posterfusion.models.metrics import auc_per_genre

    root, out, summary = routed
    assert {k: v["route"] for k, v in summary["routing"].items()} == {"with_metadata": "side",
                                                                      "without_metadata": "cnn"}
    bundle_ = load_bundle(out)
    assert bundle_.config.model.routing.sources["cnn"]["version"] == load_bundle(bundle(root, "cnn")).version
    assert bundle_.calibration.fitted_on == 0  # the network returns calibrated logits itself
    frame = load_split_frame(root / "catalogue", "test")
    labels = np.array([[g in genres for g in bundle_.genres] for genres in frame["genres"]], dtype=np.float32)
    score = {name: model_scores(EvaluateConfig(model=path, catalogue=root / "catalogue", out=out,
                                               features=root / "features"), frame)
             for name, path in (("routed", out), ("side", bundle(root, "fused")), ("cnn", bundle(root, "cnn")))}
    present = frame["has_metadata"].to_numpy()
    assert present.any() and (~present).any()
    for rows, network in ((present, "side"), (~present, "cnn")):
        ours, theirs = (auc_per_genre(labels[rows], score[n][rows]) for n in ("routed", network))
        np.testing.assert_allclose(ours, theirs, atol=1e-9)  # per genre, within the slice: the same ranking
        assert not np.allclose(score["routed"][rows], score["side" if network == "cnn" else "cnn"][rows])


@pytest.mark.slow
def test_an_online_request_with_only_a_year_is_scored_by_the_network_of_posters_with_metadata(routed):
    """The route reads the encoder's presence flag: any one field makes a poster one "with metadata"; none (or
    an empty record) one without, for which the side network never runs. Embeddings are the cnn's either way."""
    from posterfusion.features.catalogue import catalogue_files
    from posterfusion.models.predictor import Predictor

    root, out, _ = routed
    poster = catalogue_files(root / "catalogue").dataset().head(1, columns=["poster"])["poster"][0].as_py()
    predictor, calls = Predictor(out), []
    side = predictor.model.side.forward
    predictor.model.side.forward = lambda *args, **kwargs: calls.append(1) or side(*args, **kwargs)
    without = [predictor.predict_one(poster, record).probabilities for record in (None, {})]
    assert not calls and without[0] == without[1]
    with_year = predictor.predict_one(poster, {"year": 1994}).probabilities
    assert calls and with_year != without[0]
    np.testing.assert_allclose(predictor.embed_one(poster, {"year": 1994}),
                               Predictor(bundle(root, "cnn")).embed_one(poster), atol=1e-5)


@pytest.mark.slow
def test_bundles_in_a_bucket_are_routed_into_the_bucket(quick_bundles, s3_endpoint):
    """Both sources read from object storage (moto's S3 on loopback), the routed bundle published there whole."""
    from posterfusion.locations import Location
    from posterfusion.models.bundle import load_bundle
    from posterfusion.models.predictor import Predictor

    from s3server import new_bucket

    models = Location.parse(f"s3://{new_bucket()}/models")
    for variant in ("cnn", "fused"):
        (models / variant).publish_dir(bundle(quick_bundles, variant))
    summary = run_route(RouteConfig(cnn=models / "cnn", side=models / "fused", out=models / "routed",
                                    features=quick_bundles / "features", n_boot=20))
    routed = load_bundle(models / "routed")
    assert summary["bundle"] == str(models / "routed") and routed.config.model.routing.sources["cnn"]["bundle"] == str(
        models / "cnn")
    assert Predictor(str(models / "routed")).genres == routed.genres


@pytest.mark.slow
def test_route_refuses_bundles_that_cannot_share_an_input_or_a_label_space(quick_bundles, tmp_path):
    with pytest.raises(UserValueError, match="reads no metadata to route by"):
        run_route(RouteConfig(cnn=bundle(quick_bundles, "cnn"), side=bundle(quick_bundles, "cnn"), out=tmp_path / "x"))
    with pytest.raises(UserValueError, match="--cnn is a 'fused' bundle"):
        run_route(RouteConfig(cnn=bundle(quick_bundles, "fused"), side=bundle(quick_bundles, "fused"),
                              out=tmp_path / "x"))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_the_route_command_refuses_them_in_one_line_before_ray_starts(quick_bundles, tmp_path, monkeypatch, capsys):
    from posterfusion.jobs import cli

    from support import cli_main

    monkeypatch.setattr(cli, "_cluster", _never)  # refused before any Ray would start
    status, _, err = cli_main(["route", "--cnn", str(bundle(quick_bundles, "fused")), "--side",
                               str(bundle(quick_bundles, "fused")), "--out", str(tmp_path / "x")], monkeypatch, capsys)
    assert status == 2 and err.count("\n") == 1 and "--cnn is a 'fused' bundle" in err


@pytest.mark.slow
def test_compare_routes_each_metadata_variant_with_its_seeds_cnn_and_reuses_a_current_routing(
        routed, tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    from posterfusion.jobs.compare import CompareConfig, run_compare

    root, _, _ = routed
    config = CompareConfig(catalogue=root / "catalogue", out=tmp_path / "compare", models=root / "models",
                           recipes=["quick"], variants=["fused", "cnn"], features=root / "features", n_boot=20,
                           route_by_metadata=True, from_scratch=True, train=QUICK)
    result = run_compare(config)
    entries = {e["name"]: e for e in result["groups"][0]["entries"]}
    assert list(entries) == ["cnn", "fused"]  # the cnn first: the routed bundle needs it
    assert entries["fused"]["bundle"].endswith("quick/fused_routed-s0")
    assert entries["fused"]["source"].endswith("quick/fused-s0")
    assert "fused - cnn" in result["groups"][0]["paired"]
    assert "[compare] route:" in capsys.readouterr().out  # the routing's summary, said
    client = MlflowClient()  # the routing is a run of its own, nested in the comparison's
    experiment = client.get_experiment_by_name("posterfusion")
    parent = client.search_runs([experiment.experiment_id], f"tags.`posterfusion.report` = '{config.out}'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    routes = [run for run in children if run.data.tags["posterfusion.kind"] == "route"]
    assert len(routes) == 1 and routes[0].data.tags["posterfusion.bundle"] == entries["fused"]["bundle"]
    assert "routing.with_metadata.posters" in routes[0].data.metrics
    assert {routes[0].data.tags[f"posterfusion.route.{name}"] for name in ("with_metadata", "without_metadata")} <= {
        "cnn", "side"}
    monkeypatch.setattr(routing, "run_route", _never)  # both sources unchanged: the routed bundle is reused
    run_compare(CompareConfig.model_validate(config.model_dump() | {"out": str(tmp_path / "again")}))
    assert "[compare] route:" not in capsys.readouterr().out


def _never(*args, **kwargs):
    raise AssertionError(f"called with {args} {kwargs}")

