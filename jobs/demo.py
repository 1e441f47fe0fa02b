"""``posterfusion demo``: the whole pipeline as it stands, on the embedded local Ray.

Without ``--data`` it draws a synthetic sample first (``posterfusion sample``); with a real
multi-label folder it uses that. Each stage writes under ``--work`` and prints its summary.
"""

from __future__ import annotations

from pathlib import Path

import typer
from posterfusion.cluster import ClusterConfig, ray_cluster
from pydantic import BaseModel, Field


class DemoConfig(BaseModel):
    data: Path | None = Field(None, description="real multi-label folder; None = synthetic")
    work: Path = Path("runs/demo")
    metadata: list[Path] = Field(default_factory=list)
    n: int = 400
    address: str | None = None


def run_demo(config: DemoConfig) -> dict:
    from posterfusion.features.vocab import GenreVocabulary, training_genres
    from posterfusion.jobs.ingest import IngestConfig, format_report, run_ingest
    from posterfusion.jobs.sample import SampleConfig, write_sample

    data, metadata = config.data, list(config.metadata)
    if data is None:
        data = config.work / "sample"
        summary = write_sample(SampleConfig(out=data, n=config.n, unlabelled=config.n // 10))
        metadata.append(Path(summary["metadata"]))
        typer.echo(f"[1/2] sample: {summary['labelled']} labelled + {summary['unlabelled']} "
                   f"unlabelled synthetic posters in {data}")
    catalogue = config.work / "catalogue"
    with ray_cluster(ClusterConfig(address=config.address)) as cluster:
        typer.echo(f"Ray: {cluster.nodes} node(s), {cluster.cpus:g} CPU, {cluster.gpus:g} GPU "
                   f"({'local' if cluster.local else cluster.address})")
        report = run_ingest(IngestConfig(sources=[f"multilabel:{data}"], metadata=metadata,
                                         out=catalogue, overwrite=True))
        typer.echo("[2/2] " + format_report(report))
        vocabulary = GenreVocabulary.build(training_genres(catalogue))
        vocabulary.save(catalogue / "genres.json")
        typer.echo(f"      vocabulary: {len(vocabulary.genres)} genres ({', '.join(vocabulary.genres)})")
    return {"catalogue": str(catalogue), "report": report}
