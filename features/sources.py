"""Readers for the poster layouts and metadata files the catalogue is built from.

Each reader yields :class:`SourceRow` records (which poster file, which labels) and never
opens an image: decoding is Ray Data's job in :mod:`posterfusion.jobs.ingest`. A row whose
labels cannot be parsed is still yielded, with ``error`` set, so that it is reported as
rejected instead of disappearing.
"""

from __future__ import annotations

import ast
import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from posterfusion.errors import UserFileNotFound, UserValueError
from posterfusion.locations import Location

IMDB_ID = re.compile(r"tt\d{5,10}")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


@dataclass(frozen=True)
class SourceRow:
    """One poster as a source file describes it, before its image is read."""

    movie_id: str
    poster_path: str
    genres: tuple[str, ...]
    labelled: bool
    source: str
    title: str | None = None
    error: str | None = field(default=None, compare=False)

    def key(self) -> tuple:
        """What two rows of one id must agree on to be the same row."""
        return (self.movie_id, self.poster_path, self.genres, self.labelled, self.title)


def parse_spec(spec: str) -> tuple[str, Location]:
    """Split a ``--source KIND:DIR`` argument; DIR is a path or a URI (``multilabel:s3://bucket/posters``)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in READERS:
        raise UserValueError(f"--source must be KIND:DIR with KIND one of {sorted(READERS)}: {spec!r}")
    return kind, Location(path)


def read_source(spec: str) -> list[SourceRow]:
    kind, path = parse_spec(spec)
    path.check_store()
    if not path.is_dir():
        raise UserFileNotFound(f"source directory not found: {path}")
    return list(READERS[kind](path))


def _csv_rows(location: Location, errors: str = "strict") -> csv.DictReader:
    """A source's CSV (small: read whole, from any store) as dict rows."""
    return csv.DictReader(io.StringIO(location.read_bytes().decode("utf-8", errors=errors), newline=""))


def _parse_genre_list(text: str) -> tuple[str, ...]:
    """``"['Comedy', 'Drama']"`` → ``("Comedy", "Drama")``; raises ValueError otherwise."""
    value = ast.literal_eval(text)
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        raise ValueError(f"not a list of genre names: {text!r}")
    return tuple(g.strip() for g in value if g.strip())


def read_multilabel(root: str | Path | Location) -> Iterator[SourceRow]:
    """Kaggle multi-label layout: ``train.csv`` (Id, Genre list, one-hot columns) + ``Images/``.

    Posters in ``Images/`` without a label row are yielded as unlabelled rows: they are the
    part of the catalogue that still has to be scored.
    """
    root = Location.parse(root)
    images = root / "Images"
    labelled_ids: set[str] = set()
    for record in _csv_rows(root / "train.csv"):
        movie_id = (record.get("Id") or "").strip()
        labelled_ids.add(movie_id)
        row = dict(movie_id=movie_id, poster_path=str(images / f"{movie_id}.jpg"),
                   labelled=True, source="multilabel")
        try:
            yield SourceRow(genres=_parse_genre_list(record.get("Genre") or ""), **row)
        except (ValueError, SyntaxError) as exc:
            yield SourceRow(genres=(), error=f"bad_label: {exc}", **row)
    for image in images.list_files(recursive=False):  # one listing, also of a bucket prefix
        name = Path(image.name)
        if name.suffix.lower() in IMAGE_SUFFIXES and name.stem not in labelled_ids:
            yield SourceRow(movie_id=name.stem, poster_path=str(image), genres=(),
                            labelled=False, source="multilabel")


def read_moviegenre(root: str | Path | Location) -> Iterator[SourceRow]:
    """MovieGenre.csv layout: ``imdbId`` (digits), ``Genre`` ("A|B"), ``Poster`` file name."""
    root = Location.parse(root)
    posters = root / "MoviePosters"
    for record in _csv_rows(root / "MovieGenre.csv", errors="replace"):
        digits = (record.get("imdbId") or "").strip()
        movie_id = f"tt{int(digits):07d}" if digits.isdigit() else digits
        genres = tuple(g.strip() for g in (record.get("Genre") or "").split("|") if g.strip())
        poster = (record.get("Poster") or "").strip()
        yield SourceRow(
            movie_id=movie_id,
            poster_path=str(posters / poster) if poster else "",
            genres=genres,
            labelled=bool(genres),
            source="moviegenre",
            title=(record.get("Title") or "").strip() or None,
        )


READERS = {"multilabel": read_multilabel, "moviegenre": read_moviegenre}


# --- metadata -----------------------------------------------------------------------------

def metadata_dtypes() -> dict[str, str]:
    """Catalogue metadata column → pandas dtype, from the catalogue's Arrow schema (the one list)."""
    import pyarrow as pa

    from posterfusion.features.catalogue import CATALOGUE_SCHEMA, METADATA_SCHEMA

    def dtype(arrow_type) -> str:
        if pa.types.is_string(arrow_type):
            return "string"
        return {"int32": "Int32", "int64": "Int64", "float": "Float32", "double": "Float64"}[str(arrow_type)]

    return {"title": dtype(CATALOGUE_SCHEMA.field("title").type)} | {f.name: dtype(f.type) for f in METADATA_SCHEMA}

# Only these columns are ever copied: a genre column of a metadata file is label leakage.
IMDB5000_COLUMNS = {
    "movie_title": "title", "title_year": "year", "duration": "runtime",
    "imdb_score": "imdb_score", "num_voted_users": "num_votes", "budget": "budget",
    "gross": "gross", "content_rating": "content_rating", "language": "language",
    "country": "country",
}
TMDB_COLUMNS = {
    "title": "title", "release_date": "year", "runtime": "runtime", "budget": "budget",
    "revenue": "gross", "original_language": "language", "popularity": "popularity",
    "overview": "overview",
}
# TMDb gives ISO 639-1 codes, IMDB-5000 English names; one vocabulary keeps them one feature.
LANGUAGE_NAMES = {
    "en": "English", "fr": "French", "es": "Spanish", "de": "German", "it": "Italian",
    "ja": "Japanese", "zh": "Mandarin", "cn": "Cantonese", "ko": "Korean", "hi": "Hindi",
    "ru": "Russian", "pt": "Portuguese", "sv": "Swedish", "da": "Danish", "nl": "Dutch",
    "no": "Norwegian", "fi": "Finnish", "pl": "Polish", "tr": "Turkish", "ar": "Arabic",
    "he": "Hebrew", "fa": "Persian", "th": "Thai", "el": "Greek", "hu": "Hungarian",
    "cs": "Czech", "ta": "Tamil", "te": "Telugu", "id": "Indonesian",
}


def detect_metadata_layout(columns: list[str]) -> str:
    if "movie_imdb_link" in columns:
        return "imdb5000"
    if "imdb_id" in columns:
        return "tmdb"
    raise UserValueError("unrecognised metadata layout: expected an IMDB-5000 `movie_imdb_link` "
                     "or a TMDb `imdb_id` column")


def _imdb_id(value: object) -> str | None:
    match = IMDB_ID.search(str(value)) if isinstance(value, str) else None
    return match.group(0) if match else None


def read_metadata(path: str | Path | Location) -> pd.DataFrame:
    """One metadata file → a frame indexed by ``movie_id`` with the catalogue's columns.

    Unparseable numbers become null; zero budgets/revenues (TMDb's "unknown") become null;
    absent columns are null; the first row of a repeated id wins.
    """
    frame = pd.read_csv(io.BytesIO(Location.parse(path).read_bytes()), dtype=str, keep_default_na=True)
    layout = detect_metadata_layout(list(frame.columns))
    if layout == "imdb5000":
        ids, mapping = frame["movie_imdb_link"].map(_imdb_id), IMDB5000_COLUMNS
    else:
        ids, mapping = frame["imdb_id"].map(_imdb_id), TMDB_COLUMNS
    present = {source: target for source, target in mapping.items() if source in frame.columns}
    out = frame[list(present)].rename(columns=present)
    out.insert(0, "movie_id", ids)
    out = out[out["movie_id"].notna()].drop_duplicates("movie_id", keep="first")
    if layout == "tmdb" and "year" in out:
        out["year"] = out["year"].str.slice(0, 4)
    if layout == "tmdb" and "language" in out:
        out["language"] = out["language"].map(lambda c: LANGUAGE_NAMES.get(c, c), na_action="ignore")
    for column in ("budget", "gross"):
        if column in out:
            out[column] = pd.to_numeric(out[column], errors="coerce").where(lambda s: s > 0)
    return _typed(out.set_index("movie_id"))


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """All catalogue metadata columns present, stripped and typed; others never appear."""
    out = pd.DataFrame(index=frame.index)
    for column, dtype in metadata_dtypes().items():
        values = frame[column] if column in frame else pd.Series(pd.NA, index=frame.index)
        if dtype == "string":
            out[column] = values.astype("string").str.strip().replace("", pd.NA)
        else:
            numbers = pd.to_numeric(values, errors="coerce")
            if dtype.startswith("Int"):
                numbers = numbers.round()
            out[column] = numbers.astype(dtype)
    return out


def merge_metadata(paths: list[str | Path | Location]) -> pd.DataFrame:
    """Coalesce several metadata files per field; earlier files take precedence.

    Adds ``metadata_sources``: which files knew the id (file stem), for provenance.
    """
    frames = [(Path(Location.parse(p).name).stem, read_metadata(p)) for p in paths]
    if not frames:
        empty = _typed(pd.DataFrame(index=pd.Index([], name="movie_id")))
        empty["metadata_sources"] = pd.Series([], dtype=object)
        return empty
    merged = frames[0][1]
    for _, frame in frames[1:]:
        merged = merged.combine_first(frame)
    merged = _typed(merged)
    merged["metadata_sources"] = [
        [name for name, frame in frames if movie_id in frame.index] for movie_id in merged.index
    ]
    merged.index.name = "movie_id"
    return merged
