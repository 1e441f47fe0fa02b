"""``posterfusion demo``: the whole pipeline as it stands, on the embedded local Ray.

Without ``--data`` it draws a synthetic sample first (``posterfusion sample``); with a real
multi-label folder it uses that. Stages: ingest → object features → train → predict →
evaluate (with baselines) → score the whole catalogue, each writing under ``--work`` and
printing a line or two; it ends with the evaluation table, where the predictions are, and the
commands to try next. Without a detector the object stage is skipped *and said so*, and the
model trained is the ``cnn+metadata`` variant.
"""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import BaseModel, ConfigDict, Field

from posterfusion.cluster import ClusterConfig, ray_cluster


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path | None = Field(None, description="real multi-label folder; None = synthetic")
    work: Path = Path("runs/demo")
    metadata: list[Path] = Field(default_factory=list)
    n: int = 400
    detector: str | None = Field(None, description="detector weights; None skips object features")
    recipe: str = Field("quick", description="training recipe (`posterfusion recipes`)")
    address: str | None = None


def run_demo(config: DemoConfig) -> dict:
    catalogue, features, bundle = (config.work / name for name in ("catalogue", "features", "model"))
    train = training_config(config, catalogue, features, bundle)  # before any work: the weights decide
    data, metadata = _data(config)
    with ray_cluster(ClusterConfig(address=config.address)) as cluster:
        typer.echo(f"Ray: {cluster.nodes} node(s), {cluster.cpus:g} CPU, {cluster.gpus:g} GPU "
                   f"({'local' if cluster.local else cluster.address})")
        _ingest(data, metadata, catalogue)
        detector = _features(config, catalogue, features)
        _train(train)
        _predict(bundle, catalogue)
        table = _evaluate(bundle, catalogue, features if detector else None, config.work / "evaluation")
        predictions = _score(bundle, catalogue, features if detector else None, config.work / "predictions")
    typer.echo("")
    typer.echo(table)
    typer.echo(f"\nPredictions for every catalogue poster: {predictions} (pandas.read_parquet('{predictions}'))")
    typer.echo("Next:")
    typer.echo(f"  posterfusion serve --model {bundle}    # then open http://127.0.0.1:8000/ and upload a poster")
    typer.echo(f"  posterfusion compare --catalogue {catalogue} --models {config.work / 'models'} "
               f"--out {config.work / 'compare'} --recipe {config.recipe} --variant cnn "
               + (f"--variant fused --features {features}" if detector else "--variant cnn+metadata")
               + " --route-by-metadata   # each slice by the network validation shows better")
    return {"catalogue": str(catalogue), "bundle": str(bundle), "predictions": str(predictions)}


def _data(config: DemoConfig) -> tuple[Path, list[Path]]:
    from posterfusion.jobs.sample import SampleConfig, write_sample

    if config.data is not None:
        return config.data, list(config.metadata)
    data = config.work / "sample"
    summary = write_sample(SampleConfig(out=data, n=config.n, unlabelled=config.n // 10))
    typer.echo(f"[sample] {summary['labelled']} labelled + {summary['unlabelled']} unlabelled SYNTHETIC "
               f"posters in {data}")
    return data, [*config.metadata, Path(summary["metadata"])]


def _ingest(data: Path, metadata: list[Path], catalogue: Path) -> None:
    from posterfusion.jobs.ingest import IngestConfig, format_report, run_ingest

    report = run_ingest(IngestConfig(sources=[f"multilabel:{data}"], metadata=metadata, out=catalogue,
                                     overwrite=True))
    typer.echo("[ingest] " + format_report(report))


def _features(config: DemoConfig, catalogue: Path, out: Path):
    from posterfusion.features.objects import DetectorConfig
    from posterfusion.jobs.features import FeaturesConfig, format_features_summary, run_features

    if not config.detector:
        typer.echo("[features] no --detector given: object features SKIPPED, training cnn+metadata")
        return None
    detector = DetectorConfig(weights=config.detector)
    summary = run_features(FeaturesConfig(catalogue=catalogue, out=out, detector=detector))
    typer.echo("[features] " + format_features_summary(summary))
    return detector


def training_config(config: DemoConfig, catalogue: Path, features: Path, bundle: Path):
    """The recipe's training configuration; where its pretrained weights are missing (a fresh machine
    without ../shared), the demo opts into training from scratch itself and says so in one line."""
    from posterfusion.jobs.train.recipes import resolve, weights_problem

    detector = config.detector
    overrides = {"data": {"catalogue": str(catalogue), "features": str(features) if detector else None,
                          "detector": {"weights": detector} if detector else None},
                 "model": {"variant": "fused" if detector else "cnn+metadata"}, "run": {"out": str(bundle)}}
    problem = weights_problem(resolve(config.recipe, overrides, check_weights=False))
    if problem:
        typer.echo(f"[train] {problem}: the demo trains from scratch instead (--from-scratch), a far weaker model")
    return resolve(config.recipe, overrides, from_scratch=problem is not None)


def _train(train) -> None:
    from posterfusion.jobs.train import format_train_summary, run_train

    summary = run_train(train)
    typer.echo("[train] " + format_train_summary(summary))


def _evaluate(bundle: Path, catalogue: Path, features: Path | None, out: Path) -> str:
    """Evaluate on the test split; return the headline table (printed last, after scoring)."""
    from posterfusion.jobs.evaluate import EvaluateConfig, run_evaluate, summary_table

    report = run_evaluate(EvaluateConfig(model=bundle, catalogue=catalogue, out=out, features=features, n_boot=200))
    typer.echo(f"[evaluate] {report['posters']} test posters in {report['seconds']:.0f} s → {out}/report.md "
               "(with/without metadata, per-genre ECE, reliability diagram)")
    return "Evaluation — " + summary_table(report)


def _score(bundle: Path, catalogue: Path, features: Path | None, out: Path) -> Path:
    """Last stage: the whole catalogue, as the nightly job scores it."""
    from posterfusion.jobs.score import ScoreConfig, format_score_summary, run_score

    summary = run_score(ScoreConfig(model=bundle, catalogue=catalogue, out=out, features=features))
    typer.echo("[score] " + format_score_summary(summary).splitlines()[-1])
    return out


def _predict(bundle: Path, catalogue: Path, count: int = 4) -> None:
    """Predict a few test-split posters, written out as files like a user's would be."""
    from posterfusion.features.catalogue import catalogue_files
    from posterfusion.jobs.predict import format_prediction, predict_files

    table = catalogue_files(catalogue).read(columns=["movie_id", "poster", "genres", "split"]).to_pandas()
    rows = table[table["split"] == "test"].head(count)
    posters = catalogue.parent / "posters"
    posters.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in rows.itertuples():
        paths.append(posters / f"{row.movie_id}.jpg")
        paths[-1].write_bytes(row.poster)
    typer.echo(f"[predict] posterfusion predict --model {bundle} …")
    for (path, prediction), truth in zip(predict_files(bundle, paths), rows["genres"], strict=True):
        typer.echo(f"  {format_prediction(path, prediction)} | true: {', '.join(truth)}")
