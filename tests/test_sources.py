"""Source readers: the two real poster layouts and the two metadata layouts."""

from __future__ import annotations

import pandas as pd
import pytest

from posterfusion.features.sources import (
    merge_metadata,
    parse_spec,
    read_metadata,
    read_moviegenre,
    read_multilabel,
)

from support import jpeg_bytes


def write_multilabel(root, rows, extra_images=()):
    (root / "Images").mkdir(parents=True)
    lines = ["Id,Genre,Action,Comedy,Drama"]
    for movie_id, genre in rows:
        lines.append(f'{movie_id},"{genre}",0,0,0')
        (root / "Images" / f"{movie_id}.jpg").write_bytes(jpeg_bytes())
    for movie_id in extra_images:
        (root / "Images" / f"{movie_id}.jpg").write_bytes(jpeg_bytes())
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def test_multilabel_rows_and_unlabelled_posters(tmp_path):
    root = write_multilabel(tmp_path, [("tt0000001", "['Comedy', 'Drama']")], ["tt0000009"])
    rows = list(read_multilabel(root))
    assert [(r.movie_id, r.genres, r.labelled) for r in rows] == [
        ("tt0000001", ("Comedy", "Drama"), True),
        ("tt0000009", (), False),
    ]
    assert rows[0].poster_path.endswith("Images/tt0000001.jpg")


def test_multilabel_unparseable_label_is_kept_as_an_error_row(tmp_path):
    root = write_multilabel(tmp_path, [("tt0000001", "Comedy, Drama")])
    (row,) = read_multilabel(root)
    assert row.error and row.error.startswith("bad_label")


def test_moviegenre_layout(tmp_path):
    (tmp_path / "MoviePosters").mkdir()
    (tmp_path / "MovieGenre.csv").write_text(
        "imdbId,Genre,Poster,Comedy\n90068,Comedy|Horror|Sci-Fi,image2.jpg,1\n123,,image3.jpg,0\n")
    first, second = read_moviegenre(tmp_path)
    assert first.movie_id == "tt0090068"
    assert first.genres == ("Comedy", "Horror", "Sci-Fi") and first.labelled
    assert first.poster_path.endswith("MoviePosters/image2.jpg")
    assert second.genres == () and not second.labelled


def test_source_spec_must_name_a_known_layout():
    assert parse_spec("multilabel:/x")[0] == "multilabel"
    with pytest.raises(ValueError, match="KIND:DIR"):
        parse_spec("kaggle:/x")


IMDB_CSV = (
    "movie_title,genres,duration,gross,budget,title_year,imdb_score,num_voted_users,"
    "content_rating,language,country,movie_imdb_link\n"
    "Avatar ,Action|Adventure,178,760505847,237000000,2009,7.9,886204,PG-13,English,USA,"
    "http://www.imdb.com/title/tt0499549/?ref_=fn_tt_tt_1\n"
    "Avatar again,Drama,1,1,1,1,1,1,R,French,France,http://www.imdb.com/title/tt0499549/\n"
)
TMDB_CSV = (
    "imdb_id,title,genres,budget,revenue,runtime,release_date,original_language,popularity,overview\n"
    "tt0499549,Avatar TMDb,\"[{'name': 'Action'}]\",0,0,162,2009-12-10,en,18.5,Blue people.\n"
    "tt0114709,Toy Story,\"[{'name': 'Animation'}]\",30000000,373554033,81,1995-10-30,fr,21.9,Toys.\n"
)


def test_imdb5000_metadata_maps_fields_and_never_copies_genres(tmp_path):
    path = tmp_path / "imdb.csv"
    path.write_text(IMDB_CSV)
    frame = read_metadata(path)
    assert list(frame.index) == ["tt0499549"]  # first of a repeated id wins
    row = frame.loc["tt0499549"]
    assert row["title"] == "Avatar" and row["year"] == 2009 and row["runtime"] == 178
    assert row["num_votes"] == 886204 and row["country"] == "USA"
    assert "genres" not in frame.columns
    assert not frame.astype(str).apply(lambda c: c.str.contains("Adventure")).any().any()


def test_tmdb_metadata_normalises_language_year_and_unknown_money(tmp_path):
    path = tmp_path / "tmdb.csv"
    path.write_text(TMDB_CSV)
    frame = read_metadata(path)
    avatar, toy = frame.loc["tt0499549"], frame.loc["tt0114709"]
    assert pd.isna(avatar["budget"]) and pd.isna(avatar["gross"])  # 0 means unknown in TMDb
    assert toy["budget"] == 30_000_000 and toy["gross"] == 373_554_033
    assert avatar["language"] == "English" and toy["language"] == "French"
    assert toy["year"] == 1995 and toy["overview"] == "Toys."
    assert "genres" not in frame.columns


def test_merge_coalesces_fields_with_earlier_files_first(tmp_path):
    (tmp_path / "imdb.csv").write_text(IMDB_CSV)
    (tmp_path / "tmdb.csv").write_text(TMDB_CSV)
    merged = merge_metadata([tmp_path / "imdb.csv", tmp_path / "tmdb.csv"])
    avatar = merged.loc["tt0499549"]
    assert avatar["title"] == "Avatar" and avatar["runtime"] == 178  # IMDB-5000 wins
    assert avatar["popularity"] == pytest.approx(18.5)  # only TMDb knows it
    assert avatar["metadata_sources"] == ["imdb", "tmdb"]
    assert merged.loc["tt0114709", "metadata_sources"] == ["tmdb"]


def test_unknown_metadata_layout_is_an_error(tmp_path):
    (tmp_path / "x.csv").write_text("id,name\n1,a\n")
    with pytest.raises(ValueError, match="unrecognised metadata layout"):
        read_metadata(tmp_path / "x.csv")
