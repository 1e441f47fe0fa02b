"""``posterfusion evaluate``: score a labelled catalogue with the bundle's Predictor and report every metric.

The model is judged as it is served: the Predictor's calibrated probabilities and the bundle's
own thresholds (tuned on validation at training time). Every number stands beside two
baselines fitted on the *training* catalogue's training split — the label prior (each genre at
its training frequency) and a classic colour/texture logistic regression (its regularisation
and thresholds tuned on the training catalogue's validation split) — with bootstrap 95 %
intervals, paired bootstrap differences model − baseline, expected calibration error and a
reliability diagram, and the headline metrics again for posters with and without metadata.

The evaluated catalogue may be another source entirely (``--catalogue OTHER --split all``): its
genre names are mapped onto the bundle's vocabulary; vocabulary genres the source never labels,
and source labels the vocabulary lacks, are left out of every metric and counted in the report.
"""

from __future__ import annotations

import json
import time
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from posterfusion.cluster import ROWS_PER_MODEL_ACTOR
from posterfusion.features.metadata import INPUT_FIELDS
from posterfusion.jobs.slices import detected_objects, slice_masks, slice_report, slice_tables
from posterfusion.jobs.tracking import tracked
from posterfusion.locations import Location
from posterfusion.models.bundle import load_bundle
from posterfusion.models.calibration import expected_calibration_error
from posterfusion.models.metrics import (
    bootstrap_ci,
    evaluate_all,
    headline_metrics,
    label_prior_scores,
    macro_auc,
    paired_auc_per_genre,
    paired_bootstrap,
    tune_thresholds,
)


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Location = Field(description="model bundle: a local path or a URI")
    catalogue: Location
    out: Location = Field(description="report folder: a local path or a URI")
    split: Literal["val", "test", "all"] = Field("test", description="all: every labelled row (another source)")
    features: Location | None = Field(None, description="reuse cached object features instead of detecting again")
    training_catalogue: Location | None = Field(None, description="where baselines are fitted; default: the "
                                                "catalogue the bundle records")
    baselines: bool = True
    n_boot: int = Field(1000, ge=0)
    batch_size: int = 32
    seed: int = 0


class Scorer(BaseModel, arbitrary_types_allowed=True):
    """One scorer's probabilities on the evaluated rows and its per-genre decision thresholds."""

    scores: np.ndarray
    thresholds: np.ndarray


class LabelSpace(BaseModel):
    """Which vocabulary genres are evaluated, and what was left out on either side."""

    genres: list[str]
    columns: list[int] = Field(description="their positions in the bundle's vocabulary")
    vocabulary_only: list[str] = Field(default_factory=list, description="genres the source never labels")
    source_only: dict[str, int] = Field(default_factory=dict, description="source labels the vocabulary "
                                        "lacks → posters carrying them")


def load_split_frame(catalogue: Location, split: str) -> pd.DataFrame:
    """Labelled rows of one split (``all``: every labelled row): ids, genres, metadata columns."""
    import pyarrow.compute as pc

    from posterfusion.features.catalogue import catalogue_files

    wanted = pc.field("labelled") if split == "all" else (pc.field("split") == split) & pc.field("labelled")
    table = catalogue_files(catalogue).dataset().to_table(
        columns=["movie_id", "poster_sha256", "genres", "source", *INPUT_FIELDS], filter=wanted)
    frame = table.to_pandas().sort_values("movie_id").reset_index(drop=True)
    frame["has_metadata"] = frame[list(INPUT_FIELDS)].notna().any(axis=1)
    return frame


def label_space(vocabulary, frame: pd.DataFrame, same_source: bool) -> LabelSpace:
    """All of the vocabulary on its own source; on another, only the genres both sides know.

    A vocabulary genre is evaluated only when the source labels *every* training genre folded
    into it: ``Other`` holding Documentary is not evaluated on a source without Documentary,
    or each of its Documentary posters would count as a false positive of a correct model.
    """
    if same_source:
        return LabelSpace(genres=vocabulary.genres, columns=list(range(len(vocabulary.genres))))
    labels = [label for genres in frame["genres"] for label in genres]
    mapped = {label: vocabulary.mapping.get(label) for label in set(labels)}
    canonical = vocabulary.config.synonyms
    source = {canonical.get(label, label) for label in mapped}
    folded: dict[str, set[str]] = {}
    for label, genre in vocabulary.mapping.items():
        if genre is not None:
            folded.setdefault(genre, set()).add(canonical.get(label, label))
    covered = {genre for genre in vocabulary.genres if folded.get(genre) and folded[genre] <= source}
    source_only = {label: labels.count(label) for label, genre in mapped.items() if genre not in vocabulary.genres}
    keep = [i for i, g in enumerate(vocabulary.genres) if g in covered]
    return LabelSpace(genres=[vocabulary.genres[i] for i in keep], columns=keep,
                      vocabulary_only=[g for g in vocabulary.genres if g not in covered], source_only=source_only)


def encode_labels(vocabulary, frame: pd.DataFrame, space: LabelSpace) -> np.ndarray:
    """Multi-hot labels over ``space.genres``; a source label the vocabulary lacks is dropped, never folded."""
    index = {g: i for i, g in enumerate(space.genres)}
    labels = np.zeros((len(frame), len(space.genres)), np.float32)
    for row, genres in enumerate(frame["genres"]):
        for label in genres:
            genre = vocabulary.mapping.get(label)
            if genre in index:
                labels[row, index[genre]] = 1.0
    return labels


def model_scores(config: EvaluateConfig, frame: pd.DataFrame) -> np.ndarray:
    """The Predictor's calibrated probabilities for ``frame``'s rows.

    Rows up to one model actor's share (:data:`~posterfusion.cluster.ROWS_PER_MODEL_ACTOR`) are scored
    by the driver with the same :class:`~posterfusion.models.inference.PredictBatch` the actors hold:
    an actor's start (a fresh process importing torch, then the model) costs more than scoring a few
    hundred posters. More rows go through Ray Data actors, as ``score`` does.
    """
    from posterfusion.models.inference import PREDICT_COLUMNS, CachedObjects, PredictBatch, predict_dataset

    bundle = load_bundle(config.model).config
    dataset = _rows(config.catalogue, PREDICT_COLUMNS, frame["movie_id"].tolist())
    objects = None
    if config.features is not None and bundle.detector_id:
        objects = CachedObjects.load(config.features, bundle.detector_id, strict=True)
    if len(frame) <= ROWS_PER_MODEL_ACTOR:
        predict = PredictBatch(str(config.model.absolute()), detect=objects is None, objects=objects)
        scored = pa.concat_tables([predict(batch) for batch in dataset.iter_batches(
            batch_size=config.batch_size, batch_format="pyarrow")]).to_pandas()
    else:
        scored = predict_dataset(dataset, config.model, batch_size=config.batch_size, detect=objects is None,
                                 objects=objects, rows=len(frame)).to_pandas()
    failed = scored[scored["error"].notna()]
    if len(failed):
        raise ValueError(f"{len(failed)} posters could not be scored, e.g. {failed.iloc[0]['movie_id']}: "
                         f"{failed.iloc[0]['error']}")
    scored = scored.set_index("movie_id").loc[frame["movie_id"]]
    return np.stack(scored["probabilities"].to_list()).astype(np.float32)


def _rows(catalogue: Location, columns: list[str], ids: list[str]):
    """A Ray Dataset of the catalogue rows with these ids."""
    import ray
    from ray.data.expressions import col

    from posterfusion.features.catalogue import catalogue_files

    files = catalogue_files(catalogue)
    dataset = ray.data.read_parquet(files.paths, filesystem=files.filesystem, columns=columns, num_cpus=0.1)
    return dataset.filter(expr=col("movie_id").is_in(ids))


def baseline_scorers(training: Location, vocabulary, frame: pd.DataFrame, stats: dict[str, pd.Series]) -> dict:
    """Label prior and classic baseline, fitted on ``training``'s training split, tuned on its validation split.

    ``stats`` are :func:`poster_statistics` of the training catalogue's train/val rows and of ``frame``'s.
    """

    fit = {s: load_split_frame(training, s) for s in ("train", "val")}
    labels = {s: vocabulary.encode_many(fit[s]["genres"]) for s in fit}
    prior, prior_val = (label_prior_scores(labels["train"], n) for n in (len(frame), len(fit["val"])))
    x = {s: _stack(stats, fit[s]) for s in fit}
    classic = _tuned_classic(x["train"], labels["train"], x["val"], labels["val"])
    return {"label_prior": Scorer(scores=prior, thresholds=tune_thresholds(labels["val"], prior_val)),
            "classic": Scorer(scores=classic.predict_proba(_stack(stats, frame)),
                              thresholds=tune_thresholds(labels["val"], classic.predict_proba(x["val"])))}


def _stack(stats: dict[str, pd.Series], frame: pd.DataFrame) -> np.ndarray:
    return np.stack([stats[key] for key in frame["poster_sha256"]])


def _tuned_classic(x_train, y_train, x_val, y_val, grid=(0.01, 0.1, 1.0)):
    """The baseline gets its regularisation tuned on validation, as the model gets early stopping."""
    from posterfusion.features.classic import ClassicBaseline, ClassicConfig

    fitted = [ClassicBaseline(ClassicConfig(C=c)).fit(x_train, y_train) for c in grid]
    return max(fitted, key=lambda b: macro_auc(y_val, b.predict_proba(x_val)))


def poster_statistics(training: Location, catalogue: Location, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Colour/texture statistics (Ray Data) of the training catalogue's train/val posters and of ``frame``'s,
    keyed by poster sha256 (the image alone decides them)."""
    from posterfusion.features.classic import featurize_posters

    def featurize(batch: pd.DataFrame) -> pd.DataFrame:
        features, errors = featurize_posters(batch["poster"].to_list())
        if any(errors):
            raise ValueError(f"undecodable poster in the catalogue: {next(e for e in errors if e)}")
        return pd.DataFrame({"poster_sha256": batch["poster_sha256"], "stats": list(features)})

    wanted = {training.absolute(): pd.concat([load_split_frame(training, s) for s in ("train", "val")])}
    key = catalogue.absolute()
    wanted[key] = pd.concat([wanted.get(key, frame.iloc[:0]), frame])
    stats = {}
    for path, rows in wanted.items():
        table = _rows(path, ["movie_id", "poster_sha256", "poster"], rows["movie_id"].unique().tolist()).map_batches(
            featurize, batch_format="pandas", batch_size=128, num_cpus=0.5).to_pandas()
        stats |= dict(zip(table["poster_sha256"], table["stats"], strict=True))
    return stats


REPORT_FILES = ["report.md", "metrics.json", "reliability.png"]


def run_evaluate(config: EvaluateConfig) -> dict:
    """Score the evaluated rows, compute metrics + intervals beside the baselines; write the report files.

    Recorded in MLflow (:mod:`posterfusion.jobs.tracking`): the settings, every point value, per slice
    too, and the report's files.
    """
    with tracked("evaluate", f"evaluate {config.split}", config.model_dump(mode="json"),
                 {"posterfusion.report": str(config.out), "posterfusion.bundle": str(config.model)}) as run:
        report = _evaluate(config)
        run.report(report, config.out, REPORT_FILES)
    return report


def _evaluate(config: EvaluateConfig) -> dict:
    started = time.perf_counter()
    bundle = load_bundle(config.model)
    vocabulary = bundle.vocabulary
    training = config.training_catalogue or Location(bundle.config.catalogue["path"])
    same_source = config.catalogue.absolute() == training.absolute()
    frame = load_split_frame(config.catalogue, config.split)
    space = label_space(vocabulary, frame, same_source)
    scorers = {"model": Scorer(scores=model_scores(config, frame), thresholds=bundle.thresholds)}
    if config.baselines:
        scorers |= baseline_scorers(training, vocabulary, frame, poster_statistics(training, config.catalogue, frame))
    scorers = {name: restrict(s, space.columns) for name, s in scorers.items()}
    labels = encode_labels(vocabulary, frame, space)
    pairs = [("model", name) for name in scorers if name != "model"]
    masks = slice_masks(frame, detected_objects(config.features, frame))
    report = build_report(scorers, labels, space.genres, pairs, config.n_boot, config.seed, masks)
    report |= {"split": config.split, "posters": len(frame), "model": str(config.model),
               "catalogue": str(config.catalogue), "training_catalogue": str(training), "same_source": same_source,
               "label_space": space.model_dump(), "seconds": round(time.perf_counter() - started, 1)}
    write_report(config.out, report, frame, scorers, labels)
    return report


def restrict(scorer: Scorer, columns: list[int]) -> Scorer:
    return Scorer(scores=scorer.scores[:, columns], thresholds=np.asarray(scorer.thresholds)[columns])


def build_report(scorers: dict[str, Scorer], labels: np.ndarray, genres: list[str], pairs: list[tuple[str, str]],
                 n_boot: int, seed: int, masks: dict[str, np.ndarray] | None = None) -> dict:
    """Metrics at each scorer's thresholds, bootstrap intervals, calibration, paired differences a − b,
    and all of it again per slice (:mod:`posterfusion.jobs.slices`: metadata, objects, source).

    Shared by ``evaluate`` (model − each baseline) and ``compare`` (each variant − cnn).
    """

    metrics, intervals, calibration = {}, {}, {}
    for name, scorer in scorers.items():
        fns = headline_metrics(genres, scorer.thresholds)
        metrics[name] = evaluate_all(labels, scorer.scores, scorer.thresholds, genres)
        intervals[name] = {m: list(bootstrap_ci(labels, scorer.scores, fn, n_boot=n_boot, seed=seed))
                           for m, fn in fns.items()}
        overall, per_genre = expected_calibration_error(labels, scorer.scores)
        calibration[name] = {"ece": overall, "per_genre": dict(zip(genres, per_genre.tolist(), strict=True))}
    paired = {}
    for a, b in pairs:
        fns = headline_metrics(genres, scorers[a].thresholds)
        fns.pop("f1_micro@tuned")  # two scorers' own thresholds: not one metric applied to both
        paired[f"{a} - {b}"] = {m: paired_bootstrap(labels, scorers[a].scores, scorers[b].scores, fn, n_boot=n_boot,
                                                    seed=seed) for m, fn in fns.items()}
    per_genre = {f"{a} - {b}": {k: v.tolist() for k, v in paired_auc_per_genre(
        labels, scorers[a].scores, scorers[b].scores, n_boot=n_boot, seed=seed).items()} for a, b in pairs}
    report = {"genres": genres, "metrics": metrics, "intervals": intervals, "calibration": calibration,
              "paired": paired, "paired_per_genre": per_genre,
              "thresholds": {k: dict(zip(genres, map(float, s.thresholds), strict=True)) for k, s in scorers.items()}}
    if masks is not None:
        report["slices"] = slice_report(scorers, labels, genres, pairs, masks, seed)
    return report


def write_report(out: Location, report: dict, frame: pd.DataFrame, scorers: dict[str, Scorer],
                 labels: np.ndarray) -> None:
    """The report files, each written whole (a local path or a URI; a plot is rendered locally, then sent)."""
    from posterfusion.jobs.plots import reliability_plot

    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=json_default))
    predictions = frame[["movie_id"]].copy()
    for name, scorer in scorers.items():
        for g, genre in enumerate(report["genres"]):
            predictions[f"{name}:{genre}"] = scorer.scores[:, g]
    (out / "predictions.parquet").write_via(lambda path: predictions.to_parquet(path, index=False))
    (out / "reliability.png").write_via(
        lambda path: reliability_plot(path, labels, {k: s.scores for k, s in scorers.items()}))
    (out / "report.md").write_text(report_markdown(report) + "\n")


def json_default(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, float) and np.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value)}")


def summary_table(report: dict, intervals: dict | None = None, title: str | None = None) -> str:
    """Markdown: headline metrics with 95 % intervals, every scorer (label prior included) side by side."""
    intervals = intervals or report["intervals"]
    names = list(intervals)
    lines = [title or (f"Split `{report.get('split', '?')}`, {report.get('posters', '?')} posters; "
                       "95 % bootstrap intervals in brackets."), "",
             "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in intervals[names[0]]:
        cells = [_cell(intervals[n][metric]) for n in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    """The whole report: headline table, label space, by-metadata tables, per-genre ECE."""
    parts = [summary_table(report)]
    space = report.get("label_space") or {}
    if space.get("vocabulary_only") or space.get("source_only"):
        parts += ["", f"Genres evaluated: {len(space['genres'])}. Left out — never labelled by this source: "
                  f"{', '.join(space['vocabulary_only']) or 'none'}; source labels the model does not know "
                  f"(posters): {space['source_only'] or 'none'}."]
    parts += slice_tables(report, summary_table)
    ece = {name: c["ece"] for name, c in report.get("calibration", {}).items()}
    if ece:
        parts += ["", "Expected calibration error (15 equal-width bins, all poster × genre pairs): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in ece.items()) + "; per genre in metrics.json; "
                  "reliability diagram in reliability.png."]
    return "\n".join(parts)


def _cell(interval: list[float]) -> str:
    point, low, high = interval
    if point is None or not np.isfinite(point):
        return "n/a"
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"
