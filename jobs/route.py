"""``posterfusion route``: one bundle from a ``cnn`` bundle and a side-input bundle, each poster routed by what it has.

Why: the ``fused`` model gains where a poster has metadata and can lose to the CNN alone where it
has none — most posters of a catalogue from another source. Both bundles score the validation
split (never the test split); on each slice (posters with any metadata field, posters without)
the side network is kept only where its macro ROC-AUC gain over the ``cnn`` is clear of 0 (paired
bootstrap, 95 %): the simpler network stays unless validation shows the other better beyond its
noise (a higher point value alone chose the quality fused network on 280 validation posters without
metadata, +0.008, where the test split found it worse), and a slice too small to judge keeps the
``cnn``. Then a Platt step fitted on the slice's validation posters puts the two networks'
probabilities on one scale. The result is an ordinary bundle
(:class:`~posterfusion.models.routed.RoutedNet` inside), so one Predictor serves it in batch and
online; nothing is trained, so it takes the time of scoring validation twice.
"""

from __future__ import annotations

import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from posterfusion.errors import UserValueError
from posterfusion.jobs.evaluate import EvaluateConfig, encode_labels, label_space, load_split_frame, model_scores
from posterfusion.jobs.slices import MIN_SUBSET
from posterfusion.jobs.tracking import tracked
from posterfusion.locations import Location
from posterfusion.models.bundle import Bundle, BundleConfig, load_bundle, save_bundle
from posterfusion.models.calibration import Calibration
from posterfusion.models.fusion import Routing
from posterfusion.models.metrics import (
    macro_auc,
    main_genre_auc,
    paired_bootstrap,
    ranking_metrics,
    tune_thresholds,
)

EPS = 1e-7  # probabilities are float32: their logits are read back within (EPS, 1 - EPS)


class RouteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cnn: Location = Field(description="a `cnn` bundle")
    side: Location = Field(description="a bundle whose network reads metadata (fused, cnn+metadata, flags-only), "
                           "trained on the same catalogue and genres")
    out: Location = Field(description="the routed bundle: a local path or a URI")
    catalogue: Location | None = Field(None, description="whose validation split chooses the routes; default: the "
                                       "side bundle's training catalogue")
    features: Location | None = Field(None, description="cached object features (else the detector runs)")
    n_boot: int = Field(1000, ge=1, description="paired bootstrap resamples judging each slice")

    def check(self) -> None:
        """Refuse, before any Ray starts, two bundles that cannot be routed together (one clear error)."""
        check_sources(load_bundle(self.cnn), load_bundle(self.side))


def run_route(config: RouteConfig) -> dict:
    """Score validation with both bundles, choose each slice's network, write the routed bundle (tracked in MLflow)."""
    with tracked("route", f"route {config.side.name}", config.model_dump(mode="json"),
                 {"posterfusion.bundle": str(config.out)}) as run:
        summary = _route(config)
        run.metrics({"routing": summary["routing"], "validation": summary["validation"],
                     "seconds": summary["seconds"]})
        for name, verdict in summary["routing"].items():
            run.tag(f"posterfusion.route.{name}", verdict["route"])
    return summary


def _route(config: RouteConfig) -> dict:
    started = time.perf_counter()
    cnn, side = load_bundle(config.cnn), load_bundle(config.side)
    check_sources(cnn, side)
    catalogue = config.catalogue or Location.parse(side.config.catalogue["path"])
    frame = load_split_frame(catalogue, "val")
    labels = encode_labels(side.vocabulary, frame, label_space(side.vocabulary, frame, same_source=True))
    presence = side.encoder.feature_names().index("has_metadata")
    present = side.encoder.transform(frame)[:, presence] > 0.5
    scores = {name: model_scores(EvaluateConfig(model=location, catalogue=catalogue, out=config.out,
                                                features=config.features), frame)
              for name, location in (("cnn", config.cnn), ("side", config.side))}
    routed = np.zeros_like(scores["cnn"])
    routes, calibration, table = {}, {}, {}
    for name, rows in (("with_metadata", present), ("without_metadata", ~present)):
        table[name] = judged(scores["side"][rows], scores["cnn"][rows], labels[rows], config.n_boot)
        routes[name] = table[name]["route"]
        source = cnn if routes[name] == "cnn" else side
        platt, routed[rows] = slice_platt(scores[routes[name]][rows], labels[rows])
        calibration[name] = composed(source.calibration, platt)
    routing = Routing(cnn=cnn.config.model, presence=presence, routes=routes, calibration=calibration,
                      sources={"cnn": {"bundle": str(cnn.location), "version": cnn.version},
                               "side": {"bundle": str(side.location), "version": side.version}})
    validation = {name: _summary(labels, s, side.genres) for name, s in (scores | {"routed": routed}).items()}
    metrics = {"routing": table, "validation": validation, "seconds": round(time.perf_counter() - started, 1)}
    save_bundle(config.out, config=routed_config(side, routing), state_dict=routed_state(cnn, side),
                vocabulary=side.vocabulary, encoder=side.encoder,
                thresholds=dict(zip(side.genres, tune_thresholds(labels, routed).tolist(), strict=True)),
                calibration=Calibration.identity(len(side.genres)), metrics=metrics)
    return metrics | {"bundle": str(config.out), "validation_posters": len(frame)}


def check_sources(cnn: Bundle, side: Bundle) -> None:
    """One clear error unless the two bundles can share one input and one label space."""
    theirs, ours = cnn.config.model, side.config.model
    checks = [(theirs.variant == "cnn" and theirs.routing is None, f"--cnn is a {theirs.variant!r} bundle"),
              (ours.uses_metadata and ours.routing is None, f"--side ({ours.variant!r}) reads no metadata to route by"
               if ours.routing is None else "--side is routed already"),
              ((theirs.backbone, theirs.size) == (ours.backbone, ours.size),
               f"the networks see other inputs ({theirs.backbone} {theirs.size} px, {ours.backbone} {ours.size} px)"),
              (cnn.genres == side.genres, "they predict other genres"),
              (cnn.config.catalogue.get("fingerprint") == side.config.catalogue.get("fingerprint"),
               "they were trained on other catalogues (or versions of one)")]
    if problems := [message for fine, message in checks if not fine]:
        raise UserValueError(f"cannot route {side.location} with {cnn.location}: {'; '.join(problems)}")


def judged(side: np.ndarray, cnn: np.ndarray, labels: np.ndarray, n_boot: int) -> dict:
    """A slice's validation verdict: the side network only where its macro ROC-AUC gain over the cnn is clear
    of 0 (paired bootstrap, 95 %); a slice too small to judge keeps the cnn."""
    verdict = {"posters": len(labels), "route": "cnn", "val_macro_auc": {"cnn": float("nan"), "side": float("nan")},
               "gain": None}
    if len(labels) < MIN_SUBSET:
        return verdict
    gain = paired_bootstrap(labels, side, cnn, macro_auc, n_boot=n_boot)
    verdict["val_macro_auc"] = {"cnn": gain["metric_b"], "side": gain["metric_a"]}
    verdict["gain"] = {k: gain[k] for k in ("diff", "low", "high")}
    verdict["route"] = "side" if gain["low"] > 0 else "cnn"
    return verdict


def slice_platt(probabilities: np.ndarray, labels: np.ndarray) -> tuple[Calibration, np.ndarray]:
    """(a Platt step on a slice's calibrated logits, fitted on its validation posters; its probabilities).
    An empty slice keeps the identity."""
    if not len(labels):
        return Calibration.identity(labels.shape[1]), probabilities
    clipped = np.clip(probabilities.astype(np.float64), EPS, 1 - EPS)
    logits = np.log(clipped) - np.log1p(-clipped)
    platt = Calibration.fit(logits, labels, np.zeros(labels.shape[1]))
    return platt, platt.probabilities(logits)


def composed(first: Calibration, then: Calibration) -> Calibration:
    """One calibration doing ``first`` then ``then`` (whose shift is 0): both are per-genre affine in the logit."""
    scale, bias = np.asarray(then.scale), np.asarray(then.bias)
    return Calibration(shift=first.shift, scale=(scale * np.asarray(first.scale)).tolist(),
                       bias=(scale * np.asarray(first.bias) + bias).tolist(), fitted_on=then.fitted_on)


def routed_config(side: Bundle, routing: Routing) -> BundleConfig:
    """The side bundle's config (its detector, recipe, training settings, catalogue) with the routing in its network."""
    return side.config.model_copy(update={"model": side.config.model.model_copy(update={"routing": routing})})


def routed_state(cnn: Bundle, side: Bundle) -> dict:
    return ({f"cnn.{k}": v for k, v in cnn.state_dict().items()}
            | {f"side.{k}": v for k, v in side.state_dict().items()})


def _summary(labels: np.ndarray, scores: np.ndarray, genres: list[str]) -> dict:
    ranking = ranking_metrics(labels, scores)
    return {"roc_auc_macro": ranking["roc_auc_macro"], "roc_auc_main6": main_genre_auc(genres)(labels, scores),
            "hit@3": ranking["hit@3"], "top_n_ratio": ranking["top_n_ratio"]}


def format_route_summary(summary: dict) -> str:
    lines = [f"route: {summary['validation_posters']} validation posters, {summary['seconds']:.0f} s → "
             f"{summary['bundle']}"]
    for name, block in summary["routing"].items():
        aucs = ", ".join(f"{k} {v:.4f}" for k, v in block["val_macro_auc"].items())
        gain = block["gain"]
        said = f"; side − cnn {gain['diff']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]" if gain else ""
        lines.append(f"  {name.replace('_', ' ')} ({block['posters']} posters): the {block['route']} network "
                     f"(validation macro ROC-AUC {aucs}{said})")
    model = summary["validation"]["routed"]
    lines.append(f"  routed on validation: macro ROC-AUC {model['roc_auc_macro']:.4f}, 6 main genres "
                 f"{model['roc_auc_main6']:.4f}, hit@3 {model['hit@3']:.3f}, top-n {model['top_n_ratio']:.3f}")
    return "\n".join(lines)
