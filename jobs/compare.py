"""``posterfusion compare``: CNN-only vs object-/metadata-fused variants, on the same splits.

Trains each variant (or takes an existing bundle), evaluates all of them on the same test
posters with thresholds tuned on the same validation posters, and writes one report:
``report.md``, ``report.html``, ``metrics.json`` and PNG plots (per-genre ROC-AUC by
variant, precision–recall curves, calibration), with the paired bootstrap difference of
fused − cnn, stated plainly as significant or not.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from posterfusion.jobs.evaluate import (
    EvaluateConfig,
    Scores,
    baseline_scores,
    build_report,
    json_default,
    load_split_frame,
)

VARIANTS = ["cnn", "cnn+objects", "cnn+metadata", "fused"]


class CompareConfig(BaseModel):
    catalogue: Path
    out: Path
    variants: list[str] = Field(default_factory=lambda: list(VARIANTS))
    models: Path = Field(description="bundles live (or are trained) in MODELS/model-<variant>")
    features: Path | None = None
    detector: str | None = None
    train: dict = Field(default_factory=dict, description="TrainConfig overrides for variants trained here")
    split: str = "test"
    n_boot: int = 1000
    seed: int = 0


def bundle_dir(models: Path, variant: str) -> Path:
    return models / f"model-{variant.replace('+', '_')}"


def ensure_bundles(config: CompareConfig) -> dict[str, Path]:
    """Existing bundles are used as they are; missing ones are trained with one seed."""
    from posterfusion.features.objects import DetectorConfig
    from posterfusion.jobs.train import TrainConfig, format_train_summary, run_train

    bundles = {}
    for variant in config.variants:
        path = bundle_dir(config.models, variant)
        if not (path / "model.safetensors").is_file():
            detector = DetectorConfig(weights=config.detector) if config.detector else None
            summary = run_train(TrainConfig(catalogue=config.catalogue, out=path, variant=variant,
                                            features=config.features, detector=detector, seed=config.seed,
                                            **config.train))
            print("[compare] " + format_train_summary(summary), flush=True)
        bundles[variant] = path
    return bundles


def run_compare(config: CompareConfig) -> dict:
    from posterfusion.features.vocab import GenreVocabulary
    from posterfusion.jobs.evaluate import model_scores

    started = time.perf_counter()
    bundles = ensure_bundles(config)
    vocabularies = {v: GenreVocabulary.load(b / "genres.json").genres for v, b in bundles.items()}
    if len({tuple(g) for g in vocabularies.values()}) != 1:
        raise ValueError(f"variants were trained with different genre vocabularies: {vocabularies}")
    vocabulary = GenreVocabulary.load(next(iter(bundles.values())) / "genres.json")
    frames = {s: load_split_frame(config.catalogue, s) for s in ("train", "val", config.split)}
    frames["test"] = frames[config.split]
    scorers = {}
    for variant, bundle in bundles.items():
        evaluate = EvaluateConfig(model=bundle, catalogue=config.catalogue, out=config.out, features=config.features)
        scorers[variant] = Scores(val=model_scores(evaluate, frames["val"], "val"),
                                  test=model_scores(evaluate, frames["test"], config.split))
    scorers |= baseline_scores(EvaluateConfig(model=next(iter(bundles.values())), catalogue=config.catalogue,
                                              out=config.out), vocabulary, frames)
    labels = {s: vocabulary.encode_many(frames[s]["genres"]) for s in ("val", "test")}
    pairs = [(a, "cnn") for a in ("fused", "cnn+objects", "cnn+metadata") if a in scorers and "cnn" in scorers]
    if {"fused", "cnn+metadata"} <= set(scorers):
        pairs.append(("fused", "cnn+metadata"))  # do objects add anything once metadata is in?
    report = build_report(scorers, labels, vocabulary.genres, pairs, config.n_boot, config.seed)
    report |= {"split": config.split, "posters": len(frames["test"]),
               "bundles": {k: str(v) for k, v in bundles.items()}, "seconds": round(time.perf_counter() - started, 1)}
    write_compare(config.out, report, scorers, labels["test"], vocabulary.genres)
    _contact_sheet(config, scorers, frames["test"], vocabulary.genres)
    return report


def _contact_sheet(config: CompareConfig, scorers: dict[str, Scores], frame, genres: list[str]) -> None:
    """Top test posters per genre by the most complete variant: what the model 'thinks' a genre looks like."""
    import pandas as pd

    from posterfusion.jobs.similar import contact_sheet

    variant = next(v for v in ("fused", "cnn+objects", "cnn+metadata", "cnn") if v in scorers)
    scores = pd.DataFrame(scorers[variant].test, columns=genres)
    scores.insert(0, "movie_id", frame["movie_id"].to_numpy())
    contact_sheet(scores, config.catalogue, genres, config.out / f"contact_sheet_{variant.replace('+', '_')}.png")


def verdicts(report: dict) -> list[str]:
    """Plain sentences: is each variant's difference from cnn significant?"""
    lines = []
    for pair, by_metric in report["paired"].items():
        for metric, result in by_metric.items():
            status = "significant" if result["significant"] else "NOT significant"
            p = f"p < {1 / result['n_used']:.3g}" if result["p_value"] == 0 else f"p = {result['p_value']:.3f}"
            lines.append(f"{pair}, {metric}: {result['diff']:+.4f} [{result['low']:+.4f}, {result['high']:+.4f}], "
                         f"{p} — {status} at 95 %.")
    return lines


def markdown(report: dict, plots: list[str]) -> str:
    from posterfusion.jobs.evaluate import summary_table

    parts = ["# Variant comparison", "", summary_table(report), "", "## Paired differences against `cnn`", ""]
    parts += [f"- {line}" for line in verdicts(report)] or ["- (no `cnn` variant to compare against)"]
    parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    parts += ["", "Top test posters per genre: `contact_sheet_<variant>.png`."]
    return "\n".join(parts) + "\n"


def html_page(report: dict, plots: list[str]) -> str:
    from posterfusion.jobs.evaluate import summary_table

    rows = [line.strip("|").split("|") for line in summary_table(report).splitlines()[2:] if line.startswith("|")]
    header, body = rows[0], [r for r in rows[2:]]
    table = "<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body) + "</table>"
    items = "".join(f"<li>{html.escape(v)}</li>" for v in verdicts(report))
    images = "".join(f'<figure><img src="{p}" alt="{p}"><figcaption>{p}</figcaption></figure>' for p in plots)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>posterfusion comparison</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:4px 8px;"
            f"border-bottom:1px solid #ddd}}img{{max-width:100%}}</style></head><body>"
            f"<h1>Variant comparison</h1><p>Split {report['split']}, {report['posters']} posters; 95 % bootstrap "
            f"intervals.</p>{table}<h2>Paired differences against cnn</h2><ul>{items}</ul>{images}</body></html>")


def write_compare(out: Path, report: dict, scorers: dict[str, Scores], labels: np.ndarray, genres: list[str]) -> None:
    from posterfusion.jobs.plots import calibration_plot, per_genre_auc_plot, pr_curves_plot

    out.mkdir(parents=True, exist_ok=True)
    tests = {name: s.test for name, s in scorers.items()}
    plots = [per_genre_auc_plot(out / "per_genre_auc.png", report["metrics"], genres),
             pr_curves_plot(out / "pr_curves.png", labels, tests),
             calibration_plot(out / "calibration.png", labels, tests)]
    names = [p.name for p in plots]
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=json_default))
    (out / "report.md").write_text(markdown(report, names))
    (out / "report.html").write_text(html_page(report, names))
