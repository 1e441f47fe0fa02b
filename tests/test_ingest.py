"""``posterfusion ingest``: every row is written, collapsed, or rejected with a reason."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from posterfusion.features.catalogue import CATALOGUE_SCHEMA
from posterfusion.jobs.ingest import IngestConfig, run_ingest

from support import jpeg_bytes, noisy_jpeg_bytes

GOOD = [f"tt10000{i:02d}" for i in range(12)]


@pytest.fixture
def dirty_source(tmp_path):
    """A multi-label folder with every kind of dirt the ingest must handle."""
    root = tmp_path / "src"
    images = root / "Images"
    images.mkdir(parents=True)
    rows = [(i, "['Drama']" if k % 2 else "['Comedy', 'Action']") for k, i in enumerate(GOOD)]
    for k, movie_id in enumerate(GOOD):
        images.joinpath(f"{movie_id}.jpg").write_bytes(jpeg_bytes(color=(k * 20, 40, 200 - k * 10)))
    twin = jpeg_bytes(color=(1, 2, 3))  # byte-identical poster under two ids
    for movie_id in ("tt2000001", "tt2000002"):
        images.joinpath(f"{movie_id}.jpg").write_bytes(twin)
        rows.append((movie_id, "['Horror']"))
    images.joinpath("tt3000001.jpg").write_text("not an image at all")
    images.joinpath("tt3000002.jpg").write_bytes(b"")
    data = noisy_jpeg_bytes(1)
    images.joinpath("tt3000003.jpg").write_bytes(data[: len(data) // 3])
    rows += [("tt3000001", "['Drama']"), ("tt3000002", "['Drama']"), ("tt3000003", "['Drama']"),
             ("tt3000004", "['Drama']")]  # tt3000004: no poster file
    rows += [(GOOD[0], rows[0][1])]  # identical duplicate row → collapsed
    images.joinpath("tt4000001.jpg").write_bytes(jpeg_bytes())
    rows += [("tt4000001", "['Drama']"), ("tt4000001", "['Comedy']")]  # conflicting → rejected
    images.joinpath("tt5000001.jpg").write_bytes(jpeg_bytes(color=(9, 9, 200)))  # unlabelled
    lines = ["Id,Genre,Action,Comedy,Drama,Horror"] + [f'{i},"{g}",0,0,0,0' for i, g in rows]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    metadata = tmp_path / "imdb.csv"
    metadata.write_text(
        "movie_title,genres,duration,title_year,movie_imdb_link\n"
        f"First Movie,Western|Noir,101,1999,http://www.imdb.com/title/{GOOD[0]}/\n"
        f"Twin,Western,88,2001,http://www.imdb.com/title/tt2000001/\n")
    return root, metadata


@pytest.fixture
def ingested(ray_session, dirty_source, tmp_path):
    root, metadata = dirty_source
    out = tmp_path / "catalogue"
    report = run_ingest(IngestConfig(sources=[f"multilabel:{root}"], metadata=[metadata], out=out))
    table = pq.read_table(out / "data").to_pandas().set_index("movie_id")
    return report, table, out


def test_report_reconciles_every_row(ingested):
    report, table, out = ingested
    assert report["rows_read"] == 12 + 2 + 4 + 1 + 2 + 1
    assert report["rows_written"] == len(table) == 12 + 2 + 1
    assert report["rejected"] == {"conflicting_duplicate_id": 2, "empty_file": 1,
                                  "missing_file": 1, "not_an_image": 1, "truncated_image": 1}
    assert report["collapsed_duplicates"] == 1 and report["collapsed_by_kind"] == {"identical": 1}
    assert report["reconciles"]
    assert report["labelled"] == 14 and report["unlabelled"] == 1
    assert report["genres"] == {"Drama": 6, "Comedy": 6, "Action": 6, "Horror": 2}
    assert json.loads((out / "ingest_report.json").read_text()) == report


def test_rejections_are_listed_with_ids_and_reasons(ingested):
    _, _, out = ingested
    lines = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    by_id = {}
    for line in lines:
        by_id.setdefault(line["movie_id"], []).append(line["reason"].split(":")[0])
    assert by_id == {"tt3000001": ["not_an_image"], "tt3000002": ["empty_file"],
                     "tt3000003": ["truncated_image"], "tt3000004": ["missing_file"],
                     "tt4000001": ["conflicting_duplicate_id"] * 2}


def test_catalogue_has_the_documented_schema_and_original_bytes(ingested, dirty_source):
    _, table, out = ingested
    written = pq.read_schema(next((out / "data").glob("*.parquet")))
    assert written.names == CATALOGUE_SCHEMA.names
    assert [written.field(n).type for n in written.names] == list(CATALOGUE_SCHEMA.types)
    root, _ = dirty_source
    assert table.loc[GOOD[3], "poster"] == (root / "Images" / f"{GOOD[3]}.jpg").read_bytes()
    assert list(table.loc[GOOD[0], "genres"]) == ["Comedy", "Action"]  # source order
    assert not table.loc["tt5000001", "labelled"] and list(table.loc["tt5000001", "genres"]) == []


def test_identical_posters_are_flagged_and_share_a_split(ingested):
    _, table, _ = ingested
    twins = table.loc[["tt2000001", "tt2000002"]]
    assert twins["duplicate_poster"].all() and twins["split"].nunique() == 1
    assert twins["poster_sha256"].nunique() == 1
    assert not table.drop(index=["tt2000001", "tt2000002"])["duplicate_poster"].any()


def test_metadata_joins_by_id_and_its_genre_column_is_never_copied(ingested):
    _, table, _ = ingested
    first = table.loc[GOOD[0]]
    assert first["title"] == "First Movie" and first["year"] == 1999 and first["runtime"] == 101
    assert list(first["metadata_sources"]) == ["imdb"]
    assert table.loc[GOOD[1], "metadata_sources"] is None
    text = table.drop(columns=["poster"]).astype(str)
    assert not text.apply(lambda col: col.str.contains("Western|Noir")).any().any()


def test_an_existing_catalogue_is_not_overwritten_by_accident(ingested, dirty_source):
    _, _, out = ingested
    root, _ = dirty_source
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_ingest(IngestConfig(sources=[f"multilabel:{root}"], out=out))


def test_a_labelled_row_supersedes_an_unlabelled_copy_of_its_id(ray_session, tmp_path):
    multilabel, moviegenre = tmp_path / "ml", tmp_path / "mg"
    (multilabel / "Images").mkdir(parents=True)
    (moviegenre / "MoviePosters").mkdir(parents=True)
    (multilabel / "Images" / "tt0121766.jpg").write_bytes(jpeg_bytes(color=(1, 100, 1)))
    (multilabel / "train.csv").write_text("Id,Genre,Drama\n")
    (moviegenre / "MoviePosters" / "image542.jpg").write_bytes(jpeg_bytes(color=(100, 1, 1)))
    (moviegenre / "MovieGenre.csv").write_text("imdbId,Genre,Poster\n121766,Action|Fantasy,image542.jpg\n")
    report = run_ingest(IngestConfig(sources=[f"multilabel:{multilabel}", f"moviegenre:{moviegenre}"],
                                     out=tmp_path / "out"))
    assert report["rows_read"] == 2 and report["rows_written"] == 1 and report["reconciles"]
    assert report["collapsed_by_kind"] == {"superseded_unlabelled": 1}
    (row,) = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert row["genres"] == ["Action", "Fantasy"] and row["source"] == "moviegenre"
