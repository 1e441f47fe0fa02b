"""``posterfusion evaluate``: score a split with the bundle's Predictor and report every metric.

The validation split is scored too, so per-genre thresholds are tuned (F1) on validation
with the very predictor being evaluated and then applied to the evaluated split; metrics are
reported at those thresholds and at 0.5. Every number stands beside two baselines fitted on
the training split — the label prior and a classic colour/texture + logistic-regression
model — with bootstrap 95 % intervals, and paired bootstrap differences model − baseline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

HEADLINE = ["roc_auc_macro", "roc_auc_micro", "map_macro", "hit@3", "top_n_ratio", "f1_micro@0.5"]


class EvaluateConfig(BaseModel):
    model: Path
    catalogue: Path
    out: Path
    split: Literal["val", "test"] = "test"
    features: Path | None = Field(None, description="reuse cached object features instead of detecting again")
    baselines: bool = True
    n_boot: int = Field(1000, ge=0)
    batch_size: int = 32
    seed: int = 0


class Scores(BaseModel, arbitrary_types_allowed=True):
    """One scorer's probabilities on the validation and the evaluated split, rows aligned."""

    val: np.ndarray
    test: np.ndarray


def load_split_frame(catalogue: Path, split: str) -> pd.DataFrame:
    """Labelled rows of one split: ids and genres (the small columns)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from posterfusion.features.catalogue import catalogue_files

    dataset = pads.dataset(catalogue_files(catalogue), format="parquet")
    table = dataset.to_table(columns=["movie_id", "poster_sha256", "genres"],
                             filter=(pc.field("split") == split) & pc.field("labelled"))
    return table.to_pandas().sort_values("movie_id").reset_index(drop=True)


def model_scores(config: EvaluateConfig, frame: pd.DataFrame, split: str) -> np.ndarray:
    """The Predictor's probabilities for ``frame``'s rows, via Ray Data actors."""

    from posterfusion.jobs.batch_predict import PREDICT_COLUMNS, attach_cached_objects, predict_dataset
    from posterfusion.models.bundle import read_config

    bundle = read_config(config.model)
    dataset = _labelled_rows(config.catalogue, PREDICT_COLUMNS, split)
    detect = True
    if config.features is not None and bundle.detector_id:
        dataset, detect = attach_cached_objects(dataset, config.features, bundle.detector_id), False
    scored = predict_dataset(dataset, config.model, batch_size=config.batch_size, detect=detect).to_pandas()
    failed = scored[scored["error"].notna()]
    if len(failed):
        raise ValueError(f"{len(failed)} posters could not be scored, e.g. {failed.iloc[0]['movie_id']}: "
                         f"{failed.iloc[0]['error']}")
    scored = scored.set_index("movie_id").loc[frame["movie_id"]]
    return np.stack(scored["probabilities"].to_list()).astype(np.float32)


def _labelled_rows(catalogue: Path, columns: list[str], split: str | None = None):
    """A Ray Dataset of the catalogue's labelled rows (of one split), with ``columns``."""
    import ray
    from ray.data.expressions import col, lit

    from posterfusion.features.catalogue import catalogue_files

    wanted = col("labelled") if split is None else col("labelled") & (col("split") == lit(split))
    dataset = ray.data.read_parquet(catalogue_files(catalogue), columns=[*columns, "labelled", "split"])
    return dataset.filter(expr=wanted).drop_columns(["labelled", "split"])


def baseline_scores(config: EvaluateConfig, vocabulary, frames: dict[str, pd.DataFrame]) -> dict[str, Scores]:
    """Label prior and classic baseline, both fitted on the training split only."""
    from posterfusion.models.evaluation import label_prior_scores

    train_labels = vocabulary.encode_many(frames["train"]["genres"])
    prior = {s: label_prior_scores(train_labels, len(frames[s])) for s in ("val", "test")}
    out = {"label_prior": Scores(val=prior["val"], test=prior["test"])}
    out["classic"] = _classic_scores(config, vocabulary, frames, train_labels)
    return out


def _classic_scores(config: EvaluateConfig, vocabulary, frames: dict[str, pd.DataFrame],
                    train_labels: np.ndarray) -> Scores:
    stats = _poster_statistics(config.catalogue)
    x = {s: np.stack(stats.loc[frames[s]["movie_id"]].to_list()) for s in frames}
    baseline = _tuned_classic(x["train"], train_labels, x["val"], vocabulary.encode_many(frames["val"]["genres"]))
    return Scores(val=baseline.predict_proba(x["val"]), test=baseline.predict_proba(x["test"]))


def _tuned_classic(x_train, y_train, x_val, y_val, grid=(0.01, 0.1, 1.0)):
    """The baseline gets its regularisation tuned on validation, as the model gets early stopping."""
    from posterfusion.features.classic import ClassicBaseline, ClassicConfig
    from posterfusion.models.metrics import macro_auc

    fitted = [ClassicBaseline(ClassicConfig(C=c)).fit(x_train, y_train) for c in grid]
    return max(fitted, key=lambda b: macro_auc(y_val, b.predict_proba(x_val)))


def _poster_statistics(catalogue: Path) -> pd.Series:
    """Hand-crafted colour/texture statistics of every labelled poster, computed with Ray Data."""

    from posterfusion.features.classic import featurize_posters

    def featurize(batch: pd.DataFrame) -> pd.DataFrame:
        features, errors = featurize_posters(batch["poster"].to_list())
        if any(errors):
            raise ValueError(f"undecodable poster in the catalogue: {next(e for e in errors if e)}")
        return pd.DataFrame({"movie_id": batch["movie_id"], "stats": list(features)})

    dataset = _labelled_rows(catalogue, ["movie_id", "poster"])
    table = dataset.map_batches(featurize, batch_format="pandas", batch_size=128, num_cpus=0.5).to_pandas()
    return table.set_index("movie_id")["stats"]


def run_evaluate(config: EvaluateConfig) -> dict:
    """Score, tune thresholds on val, compute metrics + intervals; write the report files."""
    from posterfusion.features.vocab import GenreVocabulary

    started = time.perf_counter()
    vocabulary = GenreVocabulary.load(config.model / "genres.json")
    frames = {s: load_split_frame(config.catalogue, s) for s in ("train", "val", config.split)}
    frames["test"] = frames[config.split]
    scorers = {"model": Scores(val=model_scores(config, frames["val"], "val"),
                               test=model_scores(config, frames["test"], config.split))}
    if config.baselines:
        scorers |= baseline_scores(config, vocabulary, frames)
    labels = {s: vocabulary.encode_many(frames[s]["genres"]) for s in ("val", "test")}
    pairs = [("model", name) for name in scorers if name != "model"]
    report = build_report(scorers, labels, vocabulary.genres, pairs, config.n_boot, config.seed)
    report |= {"split": config.split, "posters": len(frames["test"]), "model": str(config.model),
               "seconds": round(time.perf_counter() - started, 1)}
    write_report(config.out, report, frames["test"], scorers, vocabulary.genres)
    return report


def build_report(scorers: dict[str, Scores], labels: dict[str, np.ndarray], genres: list[str],
                 pairs: list[tuple[str, str]], n_boot: int, seed: int) -> dict:
    """Metrics at val-tuned thresholds, bootstrap intervals per scorer, paired differences a − b.

    Shared by ``evaluate`` (model − each baseline) and ``compare`` (each variant − cnn).
    """
    from posterfusion.models.evaluation import HEADLINE_METRICS, bootstrap_ci, evaluate_all, paired_bootstrap
    from posterfusion.models.metrics import tune_thresholds

    y = labels["test"]
    metrics, intervals, thresholds = {}, {}, {}
    for name, scores in scorers.items():
        thresholds[name] = tune_thresholds(labels["val"], scores.val)
        metrics[name] = evaluate_all(y, scores.test, thresholds[name], genres)
        intervals[name] = {m: list(bootstrap_ci(y, scores.test, fn, n_boot=n_boot, seed=seed))
                           for m, fn in HEADLINE_METRICS.items()}
    paired = {f"{a} - {b}": {m: paired_bootstrap(y, scorers[a].test, scorers[b].test, fn, n_boot=n_boot, seed=seed)
                             for m, fn in HEADLINE_METRICS.items()}
              for a, b in pairs}
    return {"genres": genres, "metrics": metrics, "intervals": intervals, "paired": paired,
            "thresholds": {k: dict(zip(genres, map(float, v), strict=True)) for k, v in thresholds.items()}}


def write_report(out: Path, report: dict, frame: pd.DataFrame, scorers: dict[str, Scores], genres: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=json_default))
    predictions = frame[["movie_id"]].copy()
    for name, scores in scorers.items():
        for g, genre in enumerate(genres):
            predictions[f"{name}:{genre}"] = scores.test[:, g]
    predictions.to_parquet(out / "predictions.parquet", index=False)
    (out / "report.md").write_text(summary_table(report) + "\n")


def json_default(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, float) and np.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value)}")


def summary_table(report: dict) -> str:
    """Markdown: headline metrics with 95 % intervals, model beside each baseline."""
    names = list(report["intervals"])
    lines = [f"Split `{report.get('split', '?')}`, {report.get('posters', '?')} posters; "
             "95 % bootstrap intervals in brackets.", "",
             "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in report["intervals"][names[0]]:
        cells = [_cell(report["intervals"][n][metric]) for n in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(interval: list[float]) -> str:
    point, low, high = interval
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"
