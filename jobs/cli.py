"""The ``posterfusion`` command line: one subcommand per job.

Every subcommand that needs Ray takes ``--address`` (else ``RAY_ADDRESS``, else a local,
loopback-only Ray started for the command; see :mod:`posterfusion.cluster`).

Each command imports its job inside its body: the jobs import torch and Ray at their tops
(seconds), and ``--help`` or a mistyped option should answer at once.

Every location option is text, a path or a URI (``s3://bucket/prefix``) the job's config parses as a
:class:`~posterfusion.locations.Location`; credentials come from each store's own environment.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from posterfusion.jobs.cli_options import Address, DetectorWeights, FromScratch, NumCpus, Sets, Verbose
from posterfusion.jobs.cli_options import check as _check
from posterfusion.jobs.cli_options import cluster as _cluster
from posterfusion.jobs.cli_options import given as _given
from posterfusion.jobs.cli_options import present_local_token as _present_local_token
from posterfusion.jobs.cli_options import stop_on_signals as _stop_on_signals

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Movie genres from posters, objects and metadata, on Ray.")


@app.callback()
def _options(ctx: typer.Context, verbose: Verbose = False) -> None:
    """Movie genres from posters, objects and metadata, on Ray."""
    import os

    from posterfusion.cluster.console import quiet_console

    if verbose:
        os.environ["POSTERFUSION_VERBOSE"] = "1"  # ClusterConfig's default: Ray workers log at INFO too
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    ctx.with_resource(quiet_console(verbose))


@app.command()
def ingest(
    source: Annotated[list[str], typer.Option(help="KIND:DIR, KIND = multilabel | moviegenre; DIR a path or URI.")],
    out: Annotated[str, typer.Option(help="Catalogue to write: a directory or a URI (s3://bucket/catalogue).")],
    metadata: Annotated[list[str] | None, typer.Option(help="IMDB-5000 or TMDb CSV to join (a path or URI).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing catalogue.")] = False,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Build the Parquet poster catalogue from poster folders and metadata CSVs."""
    from posterfusion.features.sources import parse_spec
    from posterfusion.jobs.ingest import IngestConfig, format_report, run_ingest

    config = IngestConfig(sources=source, metadata=metadata or [], out=out, overwrite=overwrite)
    _check(stores=[out, *(str(parse_spec(spec)[1]) for spec in source)])
    with _cluster(address, num_cpus):
        report = run_ingest(config)
    typer.echo(format_report(report))
    if not report["reconciles"]:
        raise typer.Exit(1)


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="Directory for the synthetic multi-label layout.")],
    n: Annotated[int | None, typer.Option(help="Labelled posters to draw.")] = None,
    unlabelled: Annotated[int | None, typer.Option(help="Extra posters with no label row.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
) -> None:
    """Write a clearly synthetic poster set whose posters carry learnable genre cues."""
    from posterfusion.jobs.sample import SampleConfig, write_sample

    summary = write_sample(SampleConfig(out=out, **_given(n=n, unlabelled=unlabelled, seed=seed)))
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def vocab(
    catalogue: Annotated[str, typer.Option(help="Catalogue from `ingest` (a directory or a URI).")],
    out: Annotated[str, typer.Option(help="Where to write the vocabulary JSON (a path or a URI).")],
    min_count: Annotated[int | None, typer.Option(help="Fold rarer genres into Other.")] = None,
    top_n: Annotated[int | None, typer.Option(help="Keep only the N most frequent.")] = None,
) -> None:
    """Build the genre vocabulary from the catalogue's training split."""
    from posterfusion.features.vocab import GenreVocabulary, VocabConfig, training_genres

    vocabulary = GenreVocabulary.build(training_genres(catalogue),
                                       VocabConfig(**_given(min_count=min_count, top_n=top_n)))
    vocabulary.save(out)
    typer.echo(f"{len(vocabulary.genres)} genres: {', '.join(vocabulary.genres)} → {out}")


@app.command()
def features(
    catalogue: Annotated[str, typer.Option(help="Catalogue from `ingest` (a directory or a URI).")],
    out: Annotated[str, typer.Option(help="Object features directory or URI (incremental).")],
    detector: DetectorWeights = None,
    imgsz: Annotated[int | None, typer.Option(help="Detector input size (a .tflite export is fixed at 640).")] = None,
    conf: Annotated[float | None, typer.Option(help="Detection confidence threshold.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Posters per detector call.")] = None,
    actors: Annotated[int | None, typer.Option(help="Detector actors (default: from the cluster's CPUs).")] = None,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Detect objects on every poster not yet featurised (YOLO in a Ray Data actor pool)."""
    from posterfusion.features.objects import DetectorConfig
    from posterfusion.jobs.features import FeaturesConfig, format_features_summary, run_features

    config = FeaturesConfig(catalogue=catalogue, out=out,
                            detector=DetectorConfig(**_given(weights=detector, imgsz=imgsz, conf=conf)),
                            **_given(batch_size=batch_size, actors=actors))
    _check(catalogue=catalogue, stores=[out])
    with _cluster(address, num_cpus):
        summary = run_features(config)
    typer.echo(format_features_summary(summary))


@app.command()
def train(
    catalogue: Annotated[str, typer.Option(help="Catalogue from `ingest` (a directory or a URI).")],
    out: Annotated[str, typer.Option(help="Model bundle to write: a directory or a URI (s3://bucket/models/v3).")],
    recipe: Annotated[str, typer.Option(help="Named recipe (`posterfusion recipes` lists them).")] = "quality",
    features: Annotated[str | None, typer.Option(help="Object features (`features --out`).")] = None,
    variant: Annotated[str | None, typer.Option(help="Which inputs: see `posterfusion recipes`.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers.")] = None,
    gpu: Annotated[bool | None, typer.Option(help="One GPU per worker.")] = None,
    from_scratch: FromScratch = False,
    set_: Sets = None,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Train the fusion network with Ray Train and write a calibrated model bundle."""
    from posterfusion.jobs.train import format_train_summary, run_train
    from posterfusion.jobs.train.config import shortcut_overrides
    from posterfusion.jobs.train.recipes import resolve

    overrides = shortcut_overrides(set_ or [], catalogue=catalogue, out=out, features=features, variant=variant,
                                   seed=seed, workers=workers, gpu=gpu)
    config = resolve(recipe, overrides, from_scratch=from_scratch)
    config.check_ready()
    _check(catalogue=catalogue, stores=[out, config.run.storage_path and str(config.run.storage_path)])
    with _cluster(address, num_cpus):
        summary = run_train(config)
    typer.echo(format_train_summary(summary))


@app.command()
def recipes(
    show: Annotated[str | None, typer.Option(help="Print this recipe's resolved configuration (with --set, "
                                                  "--from-scratch) instead of the list; trains nothing.")] = None,
    from_scratch: FromScratch = False,
    set_: Sets = None,
) -> None:
    """The named training recipes, backbones and variants; or one recipe's resolved configuration."""
    from posterfusion.jobs.train.config import format_config, parse_sets
    from posterfusion.jobs.train.recipes import RECIPES, resolve, weights_problem
    from posterfusion.models.backbones import list_backbones
    from posterfusion.models.fusion import VARIANTS

    if show is not None:
        overrides = parse_sets(set_ or [])
        config = resolve(show, overrides, from_scratch=from_scratch, check_weights=False)
        problem = weights_problem(config, explicit="weights" in overrides.get("model", {}))
        typer.echo(format_config(config) + (f"# not trainable here as is: {problem}\n" if problem else ""), nl=False)
        return
    for recipe in RECIPES.values():
        system = f" ({recipe.system}, judged by {recipe.metric})" if recipe.system else ""
        typer.echo(f"{recipe.name:<16}{recipe.summary()}{system}")
    typer.echo(f"backbones: {', '.join(list_backbones())}")
    typer.echo(f"variants: {', '.join(VARIANTS)}")


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="Model bundle (a directory or a URI).")],
    catalogue: Annotated[str, typer.Option(help="Labelled catalogue to evaluate on (any source).")],
    out: Annotated[str, typer.Option(help="Report directory or URI (metrics.json, report.md, predictions).")],
    split: Annotated[str | None, typer.Option(help="val | test (default) | all (another source's every labelled "
                                                   "row).")] = None,
    features: Annotated[str | None, typer.Option(help="Reuse cached object features.")] = None,
    training_catalogue: Annotated[str | None, typer.Option(help="Where baselines are fitted (default: the "
                                                                 "bundle's training catalogue).")] = None,
    baselines: Annotated[bool | None, typer.Option(help="Label-prior and classic baselines beside the model.")] = None,
    n_boot: Annotated[int | None, typer.Option(help="Bootstrap resamples for the intervals.")] = None,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Every multi-label metric on a labelled catalogue, beside the label-prior and classic baselines."""
    from posterfusion.jobs.evaluate import EvaluateConfig, report_markdown, run_evaluate

    config = EvaluateConfig(model=model, catalogue=catalogue, out=out, **_given(
        split=split, features=features, training_catalogue=training_catalogue, baselines=baselines, n_boot=n_boot))
    _check(model=model, catalogue=catalogue, stores=[out])
    with _cluster(address, num_cpus):
        report = run_evaluate(config)
    typer.echo(report_markdown(report))
    typer.echo(f"evaluate: {report['posters']} posters in {report['seconds']:.0f} s → {out}/report.md")


@app.command()
def compare(
    catalogue: Annotated[str, typer.Option(help="Catalogue from `ingest` (a directory or a URI).")],
    out: Annotated[str, typer.Option(help="Report directory or URI.")],
    models: Annotated[str, typer.Option(help="Bundles in MODELS/<recipe>/<variant>-s<seed> (a directory or a URI); "
                                             "missing or stale ones are trained.")],
    recipe: Annotated[list[str] | None, typer.Option(help="Recipes to compare (default: quality).")] = None,
    variant: Annotated[list[str] | None, typer.Option(help="Variants (default: each recipe's own).")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="Training seeds (default: 0).")] = None,
    features: Annotated[str | None, typer.Option(help="Object features directory or URI.")] = None,
    from_scratch: FromScratch = False,
    set_: Sets = None,
    poster_from_cnn: Annotated[bool, typer.Option(help="Side-input variants keep the cnn's poster path.")] = False,
    route_by_metadata: Annotated[bool, typer.Option(help="Variants reading metadata are routed with the cnn "
                                                         "(posterfusion route).")] = False,
    on: Annotated[str | None, typer.Option(help="Score on another labelled catalogue (use --split all).")] = None,
    split: Annotated[str | None, typer.Option(help="test (default) | val | all.")] = None,
    n_boot: Annotated[int | None, typer.Option(help="Bootstrap resamples.")] = None,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Train (or load) recipes × variants × seeds and compare them on one split (of another source: --on)."""
    from posterfusion.jobs.compare import CompareConfig, check_entries, markdown, run_compare
    from posterfusion.jobs.train.config import parse_sets

    config = CompareConfig(catalogue=catalogue, out=out, models=models, from_scratch=from_scratch,
                           poster_from_cnn=poster_from_cnn, route_by_metadata=route_by_metadata,
                           train=parse_sets(set_ or []),
                           **_given(recipes=recipe or None, variants=variant or None, seeds=seed or None,
                                    features=features, n_boot=n_boot, on=on, split=split))
    check_entries(config)  # every entry's configuration and weights, before any Ray starts
    _check(catalogue=catalogue, stores=[out, models])
    with _cluster(address, num_cpus):
        result = run_compare(config)
    typer.echo(markdown(result, []))
    typer.echo(f"compare: report in {out}/report.md and report.html")


@app.command()
def route(
    cnn: Annotated[str, typer.Option(help="A `cnn` bundle (a directory or a URI).")],
    side: Annotated[str, typer.Option(help="A bundle reading metadata (fused, cnn+metadata, flags-only), same "
                                           "catalogue and genres.")],
    out: Annotated[str, typer.Option(help="The routed bundle (a directory or a URI).")],
    catalogue: Annotated[str | None, typer.Option(help="Whose validation split chooses (default: the side "
                                                       "bundle's training catalogue).")] = None,
    features: Annotated[str | None, typer.Option(help="Cached object features to reuse.")] = None,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """One bundle scoring posters with metadata by the network validation chose for them, the rest by the other."""
    from posterfusion.jobs.route import RouteConfig, format_route_summary, run_route

    config = RouteConfig(cnn=cnn, side=side, out=out, **_given(catalogue=catalogue, features=features))
    _check(catalogue=catalogue, stores=[out])
    config.check()
    with _cluster(address, num_cpus):
        summary = run_route(config)
    typer.echo(format_route_summary(summary))


@app.command()
def score(
    model: Annotated[str, typer.Option(help="Model bundle (a directory or a URI).")],
    catalogue: Annotated[str, typer.Option(help="Catalogue from `ingest` (a directory or a URI).")],
    out: Annotated[str, typer.Option(help="Predictions directory or URI (partitioned by run date, incremental).")],
    features: Annotated[str | None, typer.Option(help="Cached object features to reuse.")] = None,
    run_date: Annotated[str | None, typer.Option(help="Partition date YYYY-MM-DD (default: today, UTC).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Posters per actor call.")] = None,
    actors: Annotated[int | None, typer.Option(help="Predictor actors (default: from the cluster).")] = None,
    rows_per_file: Annotated[int | None, typer.Option(help="Rows per committed Parquet file.")] = None,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Score every catalogue poster this model version has not scored yet (Ray Data, incremental)."""
    from posterfusion.jobs.score import ScoreConfig, format_score_summary, run_score

    config = ScoreConfig(model=model, catalogue=catalogue, out=out, **_given(
        features=features, batch_size=batch_size, actors=actors, rows_per_file=rows_per_file, run_date=run_date))
    _check(model=model, catalogue=catalogue, stores=[out])
    with _cluster(address, num_cpus):
        summary = run_score(config)
    typer.echo(format_score_summary(summary))
    if not summary["reconciles"]:
        raise typer.Exit(1)


@app.command()
def embed(
    model: Annotated[str, typer.Option(help="Model bundle (a directory or a URI).")],
    catalogue: Annotated[str, typer.Option(help="Catalogue from `ingest` (a directory or a URI).")],
    out: Annotated[str, typer.Option(help="Embeddings directory or URI (for `similar`).")],
    split: Annotated[str | None, typer.Option(help="Only this split (default: every poster).")] = None,
    features: Annotated[str | None, typer.Option(help="Cached object features to reuse.")] = None,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Penultimate-layer embeddings of every catalogue poster, with Ray Data."""
    from posterfusion.jobs.embed import EmbedConfig, format_embed_summary, run_embeddings

    _check(model=model, catalogue=catalogue, stores=[out])
    with _cluster(address, num_cpus):
        summary = run_embeddings(EmbedConfig(model=model, catalogue=catalogue, out=out, split=split, features=features))
    typer.echo(format_embed_summary(summary))


@app.command()
def similar(
    poster: Annotated[str, typer.Argument(help="Query poster image file (a path or a URI).")],
    model: Annotated[str, typer.Option(help="Model bundle (a directory or a URI).")],
    catalogue: Annotated[str, typer.Option(help="Catalogue from `ingest` (a directory or a URI).")],
    embeddings: Annotated[str, typer.Option(help="Output of `posterfusion embed` for this model.")],
    k: Annotated[int, typer.Option(help="How many neighbours.")] = 8,
) -> None:
    """The catalogue posters nearest to a poster in the model's embedding space."""
    from posterfusion.models.similarity import format_similar, similar_posters

    typer.echo(format_similar(similar_posters(model, catalogue, poster, k=k, embeddings=embeddings)))


@app.command()
def predict(
    posters: Annotated[list[str], typer.Argument(help="Poster image files (paths or URIs).")],
    model: Annotated[str, typer.Option(help="Model bundle (a directory or a URI).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Top-3 genres and detected objects for each poster (no Ray needed)."""
    import json as json_module

    from posterfusion.jobs.predict import format_prediction, predict_files
    from posterfusion.models.predictor import PosterError

    for path, prediction in predict_files(model, posters):
        if as_json:
            typer.echo(json_module.dumps({"file": str(path), "error": prediction.reason})
                       if isinstance(prediction, PosterError) else prediction.model_dump_json())
        else:
            typer.echo(format_prediction(path, prediction))


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Model bundle: a directory or a URI each replica loads it from.")],
    host: Annotated[str, typer.Option(help="HTTP bind address (loopback unless you mean otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    max_batch_size: Annotated[int | None, typer.Option(help="Most posters per model call.")] = None,
    batch_wait_ms: Annotated[float | None, typer.Option(help="How long a batch waits to fill.")] = None,
    min_replicas: Annotated[int | None, typer.Option(help="Autoscaling floor of model replicas.")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="Autoscaling ceiling of model replicas.")] = None,
    max_queued_requests: Annotated[int | None, typer.Option(help="Queue length beyond which requests get 503.")] = None,
    replica_cpus: Annotated[float | None, typer.Option(help="CPUs per model replica.")] = None,
    replica_gpus: Annotated[float | None, typer.Option(help="GPUs per model replica.")] = None,
    direct_ingress: Annotated[bool, typer.Option(help="Each replica also answers on its own port, past Serve's "
                                                      "proxy (Serve's direct ingress; the local Ray only: a "
                                                      "cluster sets RAY_SERVE_ENABLE_DIRECT_INGRESS=1).")] = False,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Serve the model over HTTP with Ray Serve (batching, autoscaling) until interrupted (Ctrl-C, SIGINT, SIGTERM)."""
    import time

    from posterfusion.errors import UserValueError
    from posterfusion.locations import Location
    from posterfusion.serving.app import ServeConfig, direct_urls, enable_direct_ingress, start_service

    config = ServeConfig(model=Location(model).absolute(), **_given(
        max_batch_size=max_batch_size, batch_wait_timeout_s=None if batch_wait_ms is None else batch_wait_ms / 1000,
        min_replicas=min_replicas, max_replicas=max_replicas, max_queued_requests=max_queued_requests,
        replica_cpus=replica_cpus, replica_gpus=replica_gpus))
    _check(model=model)
    if direct_ingress:
        enable_direct_ingress()
    with _cluster(address, num_cpus) as cluster:
        url = start_service(config, host=host, port=port)
        typer.echo(f"serving {model} at {url}/ (upload page), {url}/v1/predict, {url}/docs — Ctrl-C stops")
        typer.echo(f"Ray at {cluster.address}: posterfusion deploy --address {cluster.address} --model NEW "
                   "switches the model in place")
        if direct_ingress:
            replicas = direct_urls()
            if not replicas:
                raise UserValueError("the cluster does not run Serve's direct ingress: start it with "
                                     "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in its environment")
            typer.echo(f"each replica directly (no proxy hop): {', '.join(replicas)}")
        _stop_on_signals()  # a service manager's stop, or kill -INT: the same clean shutdown as Ctrl-C
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            from ray import serve as ray_serve

            ray_serve.shutdown()


@app.command()
def deploy(
    model: Annotated[str, typer.Option(help="The bundle to serve (a directory or a URI): a new version, or the "
                                            "previous one to roll back.")],
    address: Annotated[str | None, typer.Option(help="The running service's Ray (posterfusion serve prints it; "
                                                     "default: RAY_ADDRESS).")] = None,
    name: Annotated[str, typer.Option(help="The Serve application to switch.")] = "posterfusion",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every replica to switch.")] = 600.0,
) -> None:
    """Switch a running service to another model bundle in place, keeping its settings; no request fails.

    The bundle is loaded here first: one that cannot load is refused before any replica switches.
    """
    import os

    from posterfusion.errors import UserValueError
    from posterfusion.serving.app import check_bundle, switch_model

    if not (address or os.environ.get("RAY_ADDRESS")):
        raise UserValueError("deploy switches a running service: pass --address (posterfusion serve prints it) "
                             "or set RAY_ADDRESS")
    from posterfusion.locations import Location

    bundle = Location(model).absolute()
    version = check_bundle(bundle)
    _present_local_token(address)
    with _cluster(address):
        config = switch_model(bundle, name=name, timeout_s=timeout)
    typer.echo(f"{name}: every replica serves {config.model} (model_version {version}); other settings kept")


@app.command()
def demo(
    data: Annotated[Path | None, typer.Option(help="A real multi-label folder (default: a sample).")] = None,
    work: Annotated[Path | None, typer.Option(help="Working directory for every stage's output.")] = None,
    metadata: Annotated[list[Path] | None, typer.Option(help="Metadata CSVs to join.")] = None,
    n: Annotated[int | None, typer.Option(help="Sample size when no --data is given.")] = None,
    detector: Annotated[str | None, typer.Option(help="Detector weights; none skips object features.")] = None,
    recipe: Annotated[str | None, typer.Option(help="Training recipe (default: quick).")] = None,
    address: Address = None,
) -> None:
    """Run the whole pipeline as it stands, on a synthetic sample or a real folder."""
    from posterfusion.jobs.demo import DemoConfig, run_demo

    run_demo(DemoConfig(**_given(data=data, work=work, metadata=metadata, n=n, detector=detector, recipe=recipe,
                                 address=address)))


def main() -> None:
    """The console script: a user error is one line on stderr and exit status 2; a bug keeps its traceback.

    A user error raised inside a Ray task or actor reaches the driver wrapped in Ray's own
    exceptions; the original is found in the chain of causes.
    """
    import sys

    from pydantic import ValidationError

    from posterfusion.cluster import prepare_environment

    prepare_environment()  # before anything imports ray
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app()  # usage errors (unknown option, missing argument) are Typer's own: status 2
    except ValidationError as exc:  # a flag's value the typed config refuses
        sys.exit(_user_error("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())))
    except Exception as exc:
        cause = user_error_in(exc)
        if cause is None:
            raise
        sys.exit(_user_error(str(cause)))


def user_error_in(exc: BaseException) -> BaseException | None:
    """The :class:`~posterfusion.errors.UserError` behind ``exc`` (itself, a cause, or what a Ray task raised)."""
    from posterfusion.errors import UserError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__  # RayTaskError keeps .cause
    return None


def _user_error(message: str) -> int:
    import sys

    print(f"posterfusion: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
