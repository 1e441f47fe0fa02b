"""After training: weigh the side corrections, calibrate on the best validation logits, tune thresholds, write
the bundle, summarise.

Residual fusion's side corrections (objects, metadata) are trained on top of the poster path; each
then gets the weight from ``optim.correction_scales`` under which the validation logits rank best
(macro ROC-AUC; a tie keeps the larger weight), so an input whose correction validation does not
support is weighed down, to 0 if need be, and a poster is then scored as the poster path scores it.

The calibration (:mod:`posterfusion.models.calibration`) first undoes the loss's ``pos_weight``
shift, then fits a per-genre Platt scaling; thresholds are tuned on the calibrated probabilities,
so the Predictor's probabilities and its decisions both come from the bundle alone.
"""

from __future__ import annotations

import itertools

import numpy as np

from posterfusion.features.catalogue import catalogue_identity
from posterfusion.jobs.train.config import DataFacts, TrainConfig, network_config
from posterfusion.models.bundle import BundleConfig, save_bundle
from posterfusion.models.calibration import Calibration, expected_calibration_error
from posterfusion.models.fusion import residual_logits
from posterfusion.models.metrics import macro_auc, main_genre_auc, ranking_metrics, tune_thresholds


def calibrate(logits: np.ndarray, labels: np.ndarray, facts: DataFacts):
    """(the calibration fitted on validation logits, after undoing the loss's pos_weight shift; their probabilities)."""
    calibration = Calibration.fit(logits, labels, np.log(np.asarray(facts.pos_weight)))
    return calibration, calibration.probabilities(logits)


def fit_correction_scale(branches: dict[str, np.ndarray], labels: np.ndarray,
                         grid: list[float]) -> tuple[dict[str, float], dict]:
    """(each side correction's weight, what validation said): every combination of ``grid`` weights.

    ``branches``: the poster path's validation logits and each side input's correction
    (:meth:`~posterfusion.models.fusion.FusionNet.branch_logits`).
    """
    names = [name for name in branches if name != "poster"]
    weights = sorted(set(grid), reverse=True)
    scored = {combo: macro_auc(labels, residual_logits(branches, dict(zip(names, combo, strict=True))))
              for combo in itertools.product(weights, repeat=len(names))}
    best = max(scored, key=scored.get)  # the first maximum: larger weights come first
    chosen = dict(zip(names, best, strict=True))
    return chosen, {"chosen": chosen, "val_macro_auc": scored[best],
                    "val_macro_auc_as_trained": macro_auc(labels, residual_logits(branches)),
                    "val_macro_auc_poster_alone": macro_auc(labels, branches["poster"])}


def validation_summary(labels: np.ndarray, probabilities: np.ndarray, facts: DataFacts) -> dict:
    """The calibrated best model on validation beside the label prior: ranking metrics and ECE."""
    prior_scores = np.tile(np.asarray(facts.label_prior), (len(labels), 1))
    model, baseline = ranking_metrics(labels, probabilities), ranking_metrics(labels, prior_scores)
    keys = ("roc_auc_macro", "roc_auc_micro", "hit@3", "top_n_ratio")
    return {"model": {k: model[k] for k in keys} | {
                "ece": expected_calibration_error(labels, probabilities)[0],
                "roc_auc_main6": main_genre_auc(facts.genres)(labels, probabilities)},
            "label_prior": {k: baseline[k] for k in keys}}


def write_bundle(config: TrainConfig, facts: DataFacts, data, trained: dict, seconds: float) -> dict:
    """The bundle of the trained model (``trained``: its state, best validation logits, history); the summary."""
    logits, labels, history = trained["logits"], trained["labels"], trained["history"]
    network = trained.get("network") or network_config(config, facts)
    weighed = None
    if trained.get("branches"):
        scale, weighed = fit_correction_scale(trained["branches"], labels, config.optim.correction_scales)
        network = network.model_copy(update={"correction_scale": scale})
        logits = residual_logits(trained["branches"], scale)
    calibration, calibrated = calibrate(logits, labels, facts)
    thresholds = dict(zip(facts.genres, tune_thresholds(labels, calibrated).tolist(), strict=True))
    metrics = {"best": trained["best"], "history": history, "seconds": round(seconds, 1),
               "validation": validation_summary(labels, calibrated, facts), "run_path": trained["run_path"],
               "train_rows": facts.train_rows, "workers": config.run.workers, "pos_weight": facts.pos_weight,
               "skipped": data.skipped}
    if "members" in trained:
        metrics["members"] = trained["members"]
    if weighed:
        metrics["correction_scale"] = weighed
    bundle = BundleConfig(model=network, detector=data.detector,
                          detector_id=data.detector_id, recipe=config.recipe, train=config.model_dump(mode="json"),
                          catalogue=catalogue_identity(config.data.catalogue))
    save_bundle(config.run.out, config=bundle, state_dict=trained["state"], vocabulary=data.vocabulary,
                encoder=data.encoder, thresholds=thresholds, calibration=calibration, metrics=metrics)
    return metrics | {"bundle": str(config.run.out), "genres": facts.genres, "final_epoch": history[-1]["epoch"],
                      "recipe": config.recipe, "notes": config.notes}


def format_train_summary(summary: dict) -> str:
    best, val = summary["best"], summary["validation"]
    model, prior = val["model"], val["label_prior"]
    skipped = {k: v for k, v in summary.get("skipped", {}).items() if v}
    return "\n".join([
        f"train{' [' + summary['recipe'] + ']' if summary.get('recipe') else ''}: best epoch "
        f"{best['epoch']}/{summary['final_epoch']}, {summary['train_rows']} train posters, "
        f"{len(summary['genres'])} genres, {summary['seconds']:.0f} s → {summary['bundle']}",
        f"  validation (calibrated): macro ROC-AUC {model['roc_auc_macro']:.3f} (6 main genres "
        f"{model['roc_auc_main6']:.3f}), hit@3 {model['hit@3']:.3f} "
        f"(label prior {prior['hit@3']:.3f}), top-n {model['top_n_ratio']:.3f} (prior {prior['top_n_ratio']:.3f}), "
        f"ECE {model['ece']:.3f}" + (f"; skipped {skipped}" if skipped else ""),
        *_weights_line(summary.get("correction_scale")),
        *[f"  note: {note}" for note in summary.get("notes", [])],
    ])


def _weights_line(weighed: dict | None) -> list[str]:
    if not weighed:
        return []
    chosen = ", ".join(f"{name} {weight:g}" for name, weight in weighed["chosen"].items())
    return [f"  side corrections weighed on validation: {chosen} (val macro ROC-AUC {weighed['val_macro_auc']:.4f}; "
            f"as trained {weighed['val_macro_auc_as_trained']:.4f}, poster alone "
            f"{weighed['val_macro_auc_poster_alone']:.4f})"]
