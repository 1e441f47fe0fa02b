"""Poster similarity: the stored embeddings, an in-memory index, and "more like this poster".

The ResNet-50 poster project showed that the features just before the genre classifier group
posters by look and genre, so nearest neighbours in that space are a cheap "more like this".
``posterfusion embed`` (:mod:`posterfusion.jobs.embed`) stores every catalogue poster's vector
once; :func:`similar_posters` embeds the query poster with the same ``Predictor`` and ranks the
stored vectors by cosine similarity (a numpy dot product over unit vectors: ~1e5 posters × 256
floats is 100 MB and one matrix-vector product, no index structure needed).

:func:`similar_posters` never embeds the catalogue on the fly: that would silently cost a full
scoring pass on every query. Without stored embeddings it raises an error naming the job to run.
Vectors from one model are meaningless to another, so embeddings carry the bundle's
``model_version`` and a query with a different bundle is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from posterfusion.errors import UserFileNotFound, UserValueError
from posterfusion.locations import Location, ParquetFiles

MANIFEST = "_manifest.json"  # "_": pyarrow and Ray skip it when reading the folder as Parquet
EMBEDDINGS_SCHEMA = pa.schema([
    pa.field("movie_id", pa.string(), nullable=False),
    pa.field("poster_sha256", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    pa.field("top_genres", pa.list_(pa.string()), nullable=False),
    pa.field("probabilities", pa.list_(pa.float32()), nullable=False),  # manifest's genre order
])


def embeddings_folder(embeddings: str | Path | Location) -> Location:
    """The folder holding the manifest: the job's ``--out`` or ``OUT/embeddings`` (a path or a URI)."""
    root = Location.parse(embeddings)
    return root / "embeddings" if (root / "embeddings" / MANIFEST).is_file() else root


def embedding_files(embeddings: str | Path | Location) -> ParquetFiles:
    """Parquet files of an embeddings folder: those its manifest names (written last, so a folder being
    replaced is read whole), or, for folders written before manifests named them, every file in it."""
    folder = embeddings_folder(embeddings)
    manifest = folder / MANIFEST
    if manifest.is_file() and "files" in (listed := json.loads(manifest.read_text())):
        files = [folder / name for name in listed["files"]]
    else:
        files = folder.list_files(".parquet", recursive=False) if folder.is_local else []
    if not files:
        raise UserFileNotFound(f"no embeddings under {folder}: run the embeddings job "
                                "(`posterfusion embed`) with this model and catalogue first")
    return ParquetFiles(files)


def read_embeddings_table(folder: str | Path | Location | ParquetFiles, columns: list[str] | None = None) -> pa.Table:
    files = folder if isinstance(folder, ParquetFiles) else embedding_files(folder)
    return files.dataset(schema=EMBEDDINGS_SCHEMA).to_table(columns=columns)


def _matrix(column: pa.ChunkedArray | pa.ListArray, rows: int) -> np.ndarray:
    """A list<float32> column of equal-length rows → ``(rows, width)`` float32, via one flat buffer."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if rows == 0:
        return flat.reshape(0, 0)
    if flat.size % rows:
        raise ValueError("embedding rows have different lengths: the folder mixes models")
    return flat.reshape(rows, flat.size // rows)


@dataclass
class EmbeddingIndex:
    """The stored vectors in memory: load once, query many times (a service would keep one)."""

    rows: pd.DataFrame  # movie_id, poster_sha256, model_version, top_genres
    matrix: np.ndarray  # (N, dim) float32, unit rows

    @classmethod
    def load(cls, embeddings: str | Path | Location) -> EmbeddingIndex:
        columns = ["movie_id", "poster_sha256", "model_version", "embedding", "top_genres"]
        table = read_embeddings_table(embeddings, columns)
        matrix = _matrix(table["embedding"], table.num_rows)
        return cls(table.drop_columns(["embedding"]).to_pandas(), matrix)

    @property
    def model_version(self) -> str:
        versions = self.rows["model_version"].unique()
        if len(versions) != 1:
            raise ValueError(f"embeddings mix model versions {sorted(versions)}: rerun the embeddings job")
        return str(versions[0])

    def nearest(self, query: np.ndarray, k: int, exclude_sha: str | None = None) -> list[tuple[int, float]]:
        """(row, cosine similarity) of the ``k`` most similar rows, best first; ties by row order."""
        query = np.asarray(query, dtype=np.float32).ravel()
        if query.shape[0] != self.matrix.shape[1]:
            raise ValueError(f"query has {query.shape[0]} dims, the embeddings {self.matrix.shape[1]}")
        scores = self.matrix @ (query / max(float(np.linalg.norm(query)), 1e-12))
        if exclude_sha is not None:
            scores = np.where(self.rows["poster_sha256"].to_numpy() == exclude_sha, -np.inf, scores)
        k = min(k, int(np.isfinite(scores).sum()))
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]
        return [(int(i), float(scores[i])) for i in top]


def nearest(embeddings_dir: str | Path | Location, query_vector: np.ndarray, k: int = 8) -> list[tuple[str, float]]:
    """The ``k`` catalogue posters most similar to ``query_vector``: ``(movie_id, cosine similarity)``.

    The query itself is not excluded: a stored vector finds its own poster first, at similarity 1.
    """
    index = EmbeddingIndex.load(embeddings_dir)
    return [(str(index.rows["movie_id"].iat[i]), s) for i, s in index.nearest(query_vector, k)]


def similar_posters(model: str | Path | Location, catalogue: str | Path | Location, poster: bytes | str | Path,
                    k: int = 8, embeddings: str | Path | Location | None = None,
                    metadata: dict | None = None) -> list[dict]:
    """The ``k`` catalogue posters most like ``poster`` (bytes or a file), best first.

    ``embeddings`` is the embeddings job's output folder and is required: a query never embeds
    the catalogue itself (see the module docstring). Copies of the query (same sha256) are left
    out. ``metadata`` is the query's optional metadata record, for bundles that read metadata.
    Each result: movie_id, title, genres (catalogue labels), predicted (top genres), similarity.
    """
    from posterfusion.models.predictor import Predictor

    if embeddings is None:
        raise UserFileNotFound("similar posters needs the catalogue's embeddings: run the embeddings job "
                                "(`posterfusion embed` with this model and catalogue) once, then pass "
                                "its output folder as `embeddings`")
    index = EmbeddingIndex.load(embeddings)
    predictor = Predictor(model, detect=False)
    if index.model_version != predictor.version:
        raise UserValueError(f"the embeddings were made by model {index.model_version}, the query model is "
                         f"{predictor.version}: rerun the embeddings job with {model}")
    data = poster if isinstance(poster, bytes) else Location.parse(poster).read_bytes()
    vector = predictor.embed_one(data, metadata)
    hits = index.nearest(vector, k, exclude_sha=hashlib.sha256(data).hexdigest())
    info = _catalogue_info(catalogue, [str(index.rows["movie_id"].iat[i]) for i, _ in hits])
    return [_result(index.rows.iloc[i], info.get(str(index.rows["movie_id"].iat[i]), {}), score)
            for i, score in hits]


def _catalogue_info(catalogue: str | Path | Location, ids: list[str]) -> dict[str, dict]:
    """Title and labelled genres of a few catalogue rows (no poster bytes are read)."""
    import pyarrow.compute as pc

    from posterfusion.features.catalogue import catalogue_files

    table = catalogue_files(catalogue).read(columns=["movie_id", "title", "genres"],
                                            filter=pc.field("movie_id").isin(ids))
    return {row["movie_id"]: row for row in table.to_pylist()}


def _result(row: pd.Series, info: dict, score: float) -> dict:
    return {"movie_id": str(row["movie_id"]), "title": info.get("title"), "genres": list(info.get("genres") or []),
            "predicted": list(row["top_genres"]), "similarity": round(score, 6)}


def format_similar(results: list[dict]) -> str:
    """One line per result, best first, for the CLI."""
    if not results:
        return "no similar posters found"
    return "\n".join(
        f"{rank:>2}. {r['movie_id']}  {r['similarity']:.3f}  {r['title'] or '(untitled)'}"
        f"  | genres: {', '.join(r['genres']) or '-'} | predicted: {', '.join(r['predicted']) or '-'}"
        for rank, r in enumerate(results, 1))


def read_scores(embeddings: str | Path | Location) -> pd.DataFrame:
    """The probabilities the embeddings job stored: ``movie_id`` plus one column per genre."""
    table = read_embeddings_table(embeddings, ["movie_id", "probabilities"])
    genres = json.loads((embeddings_folder(embeddings) / MANIFEST).read_text())["genres"]
    frame = pd.DataFrame(_matrix(table["probabilities"], table.num_rows), columns=genres)
    frame.insert(0, "movie_id", table["movie_id"].to_pylist())
    return frame
