"""``posterfusion ingest``: build the Parquet poster catalogue with Ray Data.

Stages: read the source CSVs in the driver (small) → collapse or reject duplicate ids →
Ray Data reads and decodes every poster in parallel → splits and duplicate-poster flags are
assigned from the (id, sha256) table → metadata is joined → ``write_parquet``.

Sources, metadata files and ``OUT`` are local paths or URIs (``s3://bucket/catalogue``). The
catalogue is published whole: locally Ray Data writes into a hidden folder renamed to ``OUT/data``;
on an object store it writes ``OUT/data/*.parquet`` in place and the ``OUT/_PUBLISHED`` manifest comes
last, which readers require (:func:`~posterfusion.features.catalogue.catalogue_files`), so a
half-written catalogue is never read.

Nothing is dropped silently: every source row is written, collapsed into an identical row,
or listed in ``rejected.jsonl`` with a reason, and ``ingest_report.json`` reconciles them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, Field

from posterfusion.errors import UserFileExists
from posterfusion.features.catalogue import (
    CATALOGUE_SCHEMA,
    SMALL_WIDTH,
    assign_splits,
    check_poster,
)
from posterfusion.features.sources import SourceRow, merge_metadata, read_source
from posterfusion.locations import PUBLISHED, Location, ParquetFiles

log = logging.getLogger(__name__)


class IngestConfig(BaseModel):
    sources: list[str] = Field(min_length=1, description="KIND:DIR, KIND in multilabel|moviegenre")
    metadata: list[Location] = Field(default_factory=list, description="metadata CSVs: paths or URIs")
    out: Location = Field(description="catalogue folder: a local path or a URI (s3://bucket/catalogue)")
    val_fraction: float = Field(0.1, ge=0, lt=0.5)
    test_fraction: float = Field(0.1, ge=0, lt=0.5)
    rows_per_file: int = Field(2000, gt=0, description="~20 KB a poster: about 40 MB files")
    row_group_rows: int = Field(256, gt=0, description="~5 MB row groups: cheap partial reads")
    decode_cpus: float = Field(0.5, gt=0, description="CPU per decode task (fractional)")
    overwrite: bool = False


class Rejection(BaseModel):
    movie_id: str
    source: str
    poster_file: str
    reason: str

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


def dedupe(rows: list[SourceRow]) -> tuple[list[SourceRow], list[Rejection], Counter]:
    """Collapse repeated ids whose rows agree; reject every row of an id whose rows conflict.

    A labelled row supersedes unlabelled rows of the same id (one source still to be scored
    is labelled by another): those copies are collapsed into it, counted as ``superseded``.
    Returns (unique rows, rejections, collapsed copies by kind).
    """
    by_id: dict[str, list[SourceRow]] = defaultdict(list)
    for row in rows:
        by_id[row.movie_id].append(row)
    unique, rejected, collapsed = [], [], Counter()
    for movie_id, group in by_id.items():
        labelled_keys = {r.key() for r in group if r.labelled}
        if not movie_id:
            rejected += [_reject(r, "missing_id") for r in group]
        elif any(r.error for r in group):
            rejected += [_reject(r, r.error or "duplicate_of_bad_row") for r in group]
        elif len({r.key() for r in group}) == 1:
            unique.append(group[0])
            collapsed["identical"] += len(group) - 1
        elif len(labelled_keys) == 1:
            labelled = [r for r in group if r.labelled]
            unique.append(labelled[0])
            collapsed["identical"] += len(labelled) - 1
            collapsed["superseded_unlabelled"] += len(group) - len(labelled)
        else:
            rejected += [_reject(r, "conflicting_duplicate_id") for r in group]
    return unique, rejected, collapsed


def _reject(row: SourceRow, reason: str) -> Rejection:
    return Rejection(movie_id=row.movie_id, source=row.source, poster_file=row.poster_path,
                     reason=reason)


def decode_batch(batch: pd.DataFrame) -> pd.DataFrame:
    """Ray Data map: read and fully decode each poster file."""
    checks = [check_poster(path) for path in batch["poster_path"]]
    batch = batch.copy()
    batch["poster"] = [c.data for c in checks]
    batch["poster_sha256"] = [c.sha256 for c in checks]
    batch["width"] = [c.width for c in checks]
    batch["height"] = [c.height for c in checks]
    batch["grayscale"] = [c.grayscale for c in checks]
    batch["reject_reason"] = [c.reject_reason for c in checks]
    return batch


def finalize_batch(batch: pd.DataFrame, splits: dict[str, str], duplicate_shas: set[str],
                   metadata: pd.DataFrame) -> pa.Table:
    """Ray Data map: add split, flags and metadata, and cast to the catalogue schema."""
    batch = batch[batch["reject_reason"].isna()].reset_index(drop=True)
    joined = metadata.reindex(batch["movie_id"]).reset_index(drop=True)
    out = {
        "movie_id": batch["movie_id"],
        "title": batch["title"].where(batch["title"].notna(), joined["title"]),
        "poster": batch["poster"],
        "poster_sha256": batch["poster_sha256"],
        "width": batch["width"],
        "height": batch["height"],
        "genres": batch["genres"].map(list),
        "labelled": batch["labelled"],
        "split": batch["movie_id"].map(splits),
        "grayscale": batch["grayscale"],
        "small": batch["width"] < SMALL_WIDTH,
        "landscape": batch["width"] > batch["height"],
        "duplicate_poster": batch["poster_sha256"].isin(duplicate_shas),
        "source": batch["source"],
        "poster_file": batch["poster_path"],
    }
    for column in CATALOGUE_SCHEMA.names:
        if column not in out:
            out[column] = joined[column]
    frame = pd.DataFrame(out)[CATALOGUE_SCHEMA.names]
    frame["metadata_sources"] = frame["metadata_sources"].map(
        lambda v: list(v) if isinstance(v, list) else None)
    return pa.Table.from_pandas(frame.astype(object).where(frame.notna(), None),
                                schema=CATALOGUE_SCHEMA, preserve_index=False)


def _prepare_out(config: IngestConfig) -> Location:
    """``OUT/data``, emptied when ``--overwrite`` allows it; refused when it holds a catalogue already."""
    out, data = config.out, config.out / "data"
    out.check_store()
    if data.list_files() or (out / PUBLISHED).exists():
        if not config.overwrite:
            raise UserFileExists(f"{data} already holds a catalogue; pass --overwrite to replace it")
        (out / PUBLISHED).delete()  # first: from here on no reader takes the prefix for a catalogue
        data.delete()
    return data


def run_ingest(config: IngestConfig) -> dict:
    """Build the catalogue; return the report (also written to ``OUT/ingest_report.json``)."""
    import ray

    started = time.perf_counter()
    data_dir = _prepare_out(config)
    source_rows = [row for spec in config.sources for row in read_source(spec)]
    unique, rejected, collapsed = dedupe(source_rows)
    metadata = merge_metadata(config.metadata)
    log.info("read %d source rows (%d unique ids)", len(source_rows), len(unique))

    items = [asdict(row) | {"genres": list(row.genres)} for row in unique]
    blocks = max(2, min(64, len(items) // 200))
    decoded = (
        ray.data.from_items(items, override_num_blocks=blocks)
        .map_batches(decode_batch, batch_format="pandas", batch_size=64, num_cpus=config.decode_cpus)
        .materialize()
    )
    keys = decoded.select_columns(
        ["movie_id", "source", "poster_path", "poster_sha256", "reject_reason"]).to_pandas()
    rejected += [Rejection(movie_id=r.movie_id, source=r.source, poster_file=r.poster_path,
                           reason=r.reject_reason)
                 for r in keys[keys["reject_reason"].notna()].itertuples()]
    good = keys[keys["reject_reason"].isna()]
    ids_by_sha = good.groupby("poster_sha256")["movie_id"].apply(list).to_dict()
    splits = assign_splits(ids_by_sha, config.val_fraction, config.test_fraction)
    duplicate_shas = {sha for sha, ids in ids_by_sha.items() if len(ids) > 1}
    wanted = metadata.reindex(metadata.index.intersection(good["movie_id"]))

    finished = decoded.map_batches(
        finalize_batch, batch_format="pandas", batch_size=256, num_cpus=config.decode_cpus,
        fn_kwargs={"splits": splits, "duplicate_shas": duplicate_shas, "metadata": wanted})
    _publish(config, finished, data_dir)
    report = build_report(config, data_dir, len(source_rows), rejected, collapsed,
                          time.perf_counter() - started)
    _write_rejections(config.out / "rejected.jsonl", rejected)
    (config.out / "ingest_report.json").write_text(json.dumps(report, indent=2))
    if not config.out.is_local:  # last: the manifest is what makes the prefix a catalogue for readers
        config.out.mark_published(data_dir.list_files(".parquet"))
    return report


def _publish(config: IngestConfig, dataset, data: Location) -> None:
    """Ray Data writes the catalogue files: locally into a hidden folder renamed to ``data`` once complete,
    on an object store straight under ``data`` (published by the manifest :func:`run_ingest` writes last)."""
    where = data if not data.is_local else data.parent / f"_data-{uuid.uuid4().hex[:8]}"
    try:
        dataset.write_parquet(where.fs_path, filesystem=where.filesystem, min_rows_per_file=config.rows_per_file,
                              row_group_size=config.row_group_rows)
        if data.is_local:
            where.local_path.rename(data.local_path)
    except BaseException:
        where.delete()
        raise


def _write_rejections(path: Location, rejected: list[Rejection]) -> None:
    path.write_text("".join(rejection.model_dump_json() + "\n" for rejection in rejected))


def build_report(config: IngestConfig, data_dir: Location, rows_read: int,
                 rejected: list[Rejection], collapsed: Counter, seconds: float) -> dict:
    """Counts read back from the written Parquet, so the report describes what is on disk."""
    columns = ["labelled", "genres", "split", "grayscale", "small", "landscape",
               "duplicate_poster", "metadata_sources", "source"]
    table = ParquetFiles(data_dir.list_files(".parquet")).read(columns).to_pandas()
    reasons = Counter(r.code for r in rejected)
    genres = Counter(g for gs in table["genres"] for g in gs)
    written = len(table)
    joined = table["metadata_sources"].map(lambda s: s is not None and len(s) > 0)
    by_meta = Counter(name for s in table["metadata_sources"] if s is not None for name in s)
    return {
        "rows_read": rows_read,
        "rows_written": written,
        "rejected": dict(sorted(reasons.items())),
        "collapsed_duplicates": sum(collapsed.values()),
        "collapsed_by_kind": {kind: n for kind, n in collapsed.items() if n},
        "reconciles": rows_read == written + sum(reasons.values()) + sum(collapsed.values()),
        "labelled": int(table["labelled"].sum()),
        "unlabelled": int((~table["labelled"]).sum()),
        "genres": dict(genres.most_common()),
        "splits": {k: int(v) for k, v in table["split"].value_counts().sort_index().items()},
        "flags": {flag: int(table[flag].sum())
                  for flag in ("grayscale", "small", "landscape", "duplicate_poster")},
        "metadata_joined": int(joined.sum()),
        "metadata_joined_by_file": dict(by_meta),
        "by_source": {k: int(v) for k, v in table["source"].value_counts().items()},
        "sources": config.sources,
        "metadata_files": [str(p) for p in config.metadata],
        "seconds": round(seconds, 1),
        "catalogue": str(data_dir),
    }


def format_report(report: dict) -> str:
    """The summary the CLI prints: the same numbers as the JSON report."""
    rejected = ", ".join(f"{k}={v}" for k, v in report["rejected"].items()) or "none"
    top = ", ".join(f"{g} {n}" for g, n in list(report["genres"].items())[:8])
    return "\n".join([
        f"ingest: {report['rows_read']} rows read → {report['rows_written']} written, "
        f"{sum(report['rejected'].values())} rejected ({rejected}), "
        f"{report['collapsed_duplicates']} duplicates collapsed {report['collapsed_by_kind']} "
        f"[{'reconciles' if report['reconciles'] else 'DOES NOT RECONCILE'}]",
        f"  labelled {report['labelled']}, unlabelled {report['unlabelled']}; splits "
        + ", ".join(f"{k} {v}" for k, v in report["splits"].items()),
        f"  flags {report['flags']}; metadata joined for {report['metadata_joined']} "
        f"{report['metadata_joined_by_file']}",
        f"  genres: {top}{' …' if len(report['genres']) > 8 else ''}",
        f"  catalogue: {report['catalogue']} ({report['seconds']} s)",
    ])
