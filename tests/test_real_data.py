"""Ingest on a small slice of the real posters in ../shared/data (slow: starts real decoding)."""

from __future__ import annotations

import csv
import shutil

import pyarrow.parquet as pq
import pytest

from posterfusion.jobs.ingest import IngestConfig, run_ingest

pytestmark = pytest.mark.slow


@pytest.fixture
def real_slice(shared_data, tmp_path):
    """The first 150 label rows (with the file's own duplicates) and 10 unlabelled posters."""
    source = shared_data / "multilabel-posters"
    root = tmp_path / "multilabel"
    (root / "Images").mkdir(parents=True)
    with open(source / "train.csv", newline="") as handle:
        reader = csv.reader(handle)
        header, rows = next(reader), [row for _, row in zip(range(150), reader, strict=False)]
    with open(root / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    labelled = {row[0] for row in rows}
    with open(source / "train.csv", newline="") as handle:
        all_labelled = {row[0] for row in csv.reader(handle)}
    unlabelled = sorted(p.stem for p in (source / "Images").iterdir()
                        if p.stem not in all_labelled)[:10]
    for movie_id in labelled | set(unlabelled):
        shutil.copy(source / "Images" / f"{movie_id}.jpg", root / "Images")
    return root, rows, unlabelled


def test_real_slice_ingests_with_metadata(ray_session, real_slice, shared_data, tmp_path):
    root, rows, unlabelled = real_slice
    movies = shared_data / "moviegenre-posters"
    metadata = [shared_data / "metadata" / "imdb5000.csv",
                shared_data / "metadata" / "tmdb_movies_metadata_subset.csv"]
    report = run_ingest(IngestConfig(
        sources=[f"multilabel:{root}", f"moviegenre:{movies}"], metadata=metadata,
        out=tmp_path / "catalogue"))
    assert report["reconciles"]
    assert report["rows_read"] == len(rows) + len(unlabelled) + 300
    # tt0121766 has no label row here but is labelled in MovieGenre.csv: that row supersedes it.
    superseded = report["collapsed_by_kind"].get("superseded_unlabelled", 0)
    assert superseded >= 1 and report["unlabelled"] + superseded == len(unlabelled)
    assert report["metadata_joined"] > 30  # ~40 % of multi-label ids are in IMDB-5000
    table = pq.read_table(tmp_path / "catalogue" / "data").to_pandas().set_index("movie_id")
    expected = {row[0]: eval(row[1]) for row in rows}
    for movie_id, genres in expected.items():
        assert list(table.loc[movie_id, "genres"]) == genres
    assert table.index.str.fullmatch(r"tt\d{7,8}").all()
    assert set(table["split"]) == {"train", "val", "test"}
    assert (table["width"] > 0).all() and table["poster_sha256"].str.len().eq(64).all()
