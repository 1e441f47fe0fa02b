"""The ``posterfusion`` command line: one subcommand per job.

Every subcommand that needs Ray takes ``--address`` (else ``RAY_ADDRESS``, else a local,
loopback-only Ray started for the command; see :mod:`posterfusion.cluster`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Movie genres from posters, objects and metadata, on Ray.")

Address = Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS, else a local Ray).")]
NumCpus = Annotated[float | None, typer.Option(help="CPUs for a local Ray (default: all).")]


def _cluster(address: str | None, num_cpus: float | None = None):
    from posterfusion.cluster import ClusterConfig, ray_cluster

    return ray_cluster(ClusterConfig(address=address, num_cpus=num_cpus))


@app.command()
def ingest(
    source: Annotated[list[str], typer.Option(help="KIND:DIR, KIND = multilabel | moviegenre.")],
    out: Annotated[Path, typer.Option(help="Catalogue directory to write.")],
    metadata: Annotated[list[Path] | None, typer.Option(help="IMDB-5000 or TMDb CSV to join.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing catalogue.")] = False,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Build the Parquet poster catalogue from poster folders and metadata CSVs."""
    from posterfusion.jobs.ingest import IngestConfig, format_report, run_ingest

    config = IngestConfig(sources=source, metadata=metadata or [], out=out, overwrite=overwrite)
    with _cluster(address, num_cpus):
        report = run_ingest(config)
    typer.echo(format_report(report))
    if not report["reconciles"]:
        raise typer.Exit(1)


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="Directory for the synthetic multi-label layout.")],
    n: Annotated[int, typer.Option(help="Labelled posters to draw.")] = 400,
    unlabelled: Annotated[int, typer.Option(help="Extra posters with no label row.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a clearly synthetic poster set whose posters carry learnable genre cues."""
    from posterfusion.jobs.sample import SampleConfig, write_sample

    summary = write_sample(SampleConfig(out=out, n=n, unlabelled=unlabelled, seed=seed))
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def vocab(
    catalogue: Annotated[Path, typer.Option(help="Catalogue directory from `ingest`.")],
    out: Annotated[Path, typer.Option(help="Where to write the vocabulary JSON.")],
    min_count: Annotated[int, typer.Option(help="Fold rarer genres into Other.")] = 20,
    top_n: Annotated[int | None, typer.Option(help="Keep only the N most frequent.")] = None,
) -> None:
    """Build the genre vocabulary from the catalogue's training split."""
    from posterfusion.features.vocab import GenreVocabulary, VocabConfig, training_genres

    vocabulary = GenreVocabulary.build(training_genres(catalogue),
                                       VocabConfig(min_count=min_count, top_n=top_n))
    vocabulary.save(out)
    typer.echo(f"{len(vocabulary.genres)} genres: {', '.join(vocabulary.genres)} → {out}")


@app.command()
def demo(
    data: Annotated[Path | None, typer.Option(help="A real multi-label folder (default: a sample).")] = None,
    work: Annotated[Path, typer.Option(help="Working directory for every stage's output.")] = Path("runs/demo"),
    metadata: Annotated[list[Path] | None, typer.Option(help="Metadata CSVs to join.")] = None,
    n: Annotated[int, typer.Option(help="Sample size when no --data is given.")] = 400,
    address: Address = None,
) -> None:
    """Run the whole pipeline as it stands, on a synthetic sample or a real folder."""
    from posterfusion.jobs.demo import DemoConfig, run_demo

    run_demo(DemoConfig(data=data, work=work, metadata=metadata or [], n=n, address=address))


def main() -> None:
    from posterfusion.cluster import prepare_environment

    prepare_environment()  # before anything imports ray
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
