"""``posterfusion similar``: find look-alike posters with the bundle's penultimate-layer embeddings.

The ResNet-50 poster project showed that the features just before the genre classifier group
posters by look and genre, so nearest neighbours in that space are a cheap "more like this".

Two steps, so that a query costs one forward pass instead of a pass over the catalogue:

* :func:`run_embeddings` (Ray Data, an actor pool each holding one ``Predictor``) embeds every
  catalogue poster once and writes ``OUT/embeddings/*.parquet`` plus ``_manifest.json``;
* :func:`similar_posters` embeds the query poster with the same ``Predictor`` and ranks the
  stored vectors by cosine similarity (a numpy dot product over unit vectors: ~1e5 posters × 256
  floats is 100 MB and one matrix-vector product, no index needed).

:func:`similar_posters` never embeds the catalogue on the fly: that would silently cost a full
scoring pass on every query. Without stored embeddings it raises an error naming the job to run.
Vectors from one model are meaningless to another, so embeddings carry the bundle's
``model_version`` and a query with a different bundle is refused.

:func:`contact_sheet` draws, per genre, the catalogue posters the model scores highest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, Field, field_validator

from posterfusion.features.metadata import FIELDS

log = logging.getLogger(__name__)

METADATA_COLUMNS = list(FIELDS)  # the catalogue columns the bundle's MetadataEncoder reads
READ_COLUMNS = ["movie_id", "poster_sha256", "poster", *METADATA_COLUMNS]
TOP_GENRES = 3
MANIFEST = "_manifest.json"  # "_": pyarrow and Ray skip it when reading the folder as Parquet
EMBEDDINGS_SCHEMA = pa.schema([
    pa.field("movie_id", pa.string(), nullable=False),
    pa.field("poster_sha256", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    pa.field("top_genres", pa.list_(pa.string()), nullable=False),
    pa.field("probabilities", pa.list_(pa.float32()), nullable=False),  # manifest's genre order
])

# Contact sheet layout, in pixels: a label column, then one cell (thumbnail + caption) per poster.
THUMB_WIDTH, THUMB_HEIGHT = 96, 144
CAPTION_HEIGHT = 28
PAD = 6
LABEL_WIDTH = 150
CELL_WIDTH = THUMB_WIDTH + PAD
ROW_HEIGHT = THUMB_HEIGHT + CAPTION_HEIGHT + PAD


class EmbedConfig(BaseModel):
    model: Path = Field(description="model bundle directory")
    catalogue: Path
    out: Path = Field(description="embeddings are written to OUT/embeddings")
    split: str | None = Field(None, description="embed only this split; None = every catalogue row")
    batch_size: int = Field(32, ge=1, description="posters per actor call")
    actors: int | None = Field(None, ge=1, description="Predictor actors; None = one per cluster CPU")
    io_cpus: float = Field(0.1, gt=0, description="CPU per read/filter/write task (fractional)")

    @field_validator("split")
    @classmethod
    def _known_split(cls, value: str | None) -> str | None:
        from posterfusion.features.catalogue import SPLITS

        if value is not None and value not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)} or None, got {value!r}")
        return value


# --- the embeddings job ----------------------------------------------------------------------


class PosterEmbedder:
    """Ray Data actor: catalogue rows in, one embedding row per poster out.

    ``detect=False`` loads the detector only when the network reads objects, and then
    ``Predictor.embed_and_score`` runs it exactly as scoring does. Catalogue posters passed the
    ingest decode check, so one that fails here means a damaged catalogue: it is an error.
    """

    def __init__(self, bundle: str):
        from posterfusion.models.predictor import Predictor

        self.predictor = Predictor(bundle, detect=False)

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        from posterfusion.models.predictor import PosterError

        batch = batch.reset_index(drop=True)
        try:
            images = self.predictor.decode(list(batch["poster"]))
        except PosterError as exc:
            movie_id = batch["movie_id"][exc.index]
            raise ValueError(f"catalogue poster {movie_id} cannot be decoded: {exc.reason}") from None
        vectors, probs = self.predictor.embed_and_score(images, batch[METADATA_COLUMNS])
        return embeddings_table(batch, self.predictor.version, self.predictor.genres, vectors, probs)


def embeddings_table(batch: pd.DataFrame, version: str, genres: list[str], vectors: np.ndarray,
                     probs: np.ndarray) -> pa.Table:
    """Rows of :data:`EMBEDDINGS_SCHEMA`; list columns are built from flat buffers (no per-row lists)."""
    n = len(batch)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_GENRES]
    return pa.table({
        "movie_id": pa.array(batch["movie_id"].astype(str).tolist(), pa.string()),
        "poster_sha256": pa.array(batch["poster_sha256"].astype(str).tolist(), pa.string()),
        "model_version": pa.array([version] * n, pa.string()),
        "embedding": _list_array(vectors),
        "top_genres": pa.array([[genres[i] for i in row] for row in order], pa.list_(pa.string())),
        "probabilities": _list_array(probs),
    }, schema=EMBEDDINGS_SCHEMA)


def _list_array(matrix: np.ndarray) -> pa.ListArray:
    rows, width = matrix.shape
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.astype(np.float32).ravel(), pa.float32()))


def _keep_split(batch: pa.Table, split: str) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch["split"], split)).drop_columns(["split"])


def _count_rows(files: list[str], split: str | None) -> int:
    """Rows to embed, from Parquet footers (or the small ``split`` column): sizes the pool, checks the output."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if split is None:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return sum(int(pc.sum(pc.equal(pq.read_table(f, columns=["split"])["split"], split)).as_py() or 0)
               for f in files)


def run_embeddings(config: EmbedConfig) -> dict:
    """Embed the catalogue's posters (or one split) with the bundle; replace ``OUT/embeddings``.

    Returns a summary: rows, dim, model_version, actors, seconds, posters/s, and the folder.
    """
    from posterfusion.cluster import actor_pool
    from posterfusion.features.catalogue import catalogue_files
    from posterfusion.models.bundle import model_version, read_config

    started = time.perf_counter()
    bundle = read_config(config.model)  # fails early, on the driver, for a path that is no bundle
    files = catalogue_files(config.catalogue)
    rows = _count_rows(files, config.split)
    if not rows:
        raise ValueError(f"the catalogue {config.catalogue} has no rows"
                         + (f" in split {config.split!r}" if config.split else ""))
    pool = actor_pool(config.actors, math.ceil(rows / config.batch_size), gpu_capable=True)
    version = model_version(config.model)
    staging = config.out / f"_embeddings-{uuid.uuid4().hex[:8]}"
    try:
        _write_embeddings(config, files, pool, staging)
        written = _read_table(staging, ["movie_id"]).num_rows
        if written != rows:
            raise RuntimeError(f"embedded {written} posters but the catalogue selection has {rows}")
        manifest = {"model_version": version, "model": str(config.model), "catalogue": str(config.catalogue),
                    "split": config.split, "rows": rows, "dim": bundle.model.hidden,
                    "genres": _bundle_genres(config.model),
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        final = _replace(staging, config.out / "embeddings")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    return {"rows": rows, "dim": bundle.model.hidden, "model_version": version, "split": config.split,
            "actors": pool.size, "cpus_per_actor": pool.cpus, "gpus_per_actor": pool.gpus,
            "seconds": round(seconds, 2), "posters_per_s": round(rows / seconds, 2), "out": str(final)}


def _write_embeddings(config: EmbedConfig, files: list[str], pool, staging: Path) -> None:
    import ray

    columns = READ_COLUMNS + (["split"] if config.split else [])
    ds = ray.data.read_parquet(files, columns=columns, num_cpus=config.io_cpus)
    if config.split:
        ds = ds.map_batches(_keep_split, batch_format="pyarrow", fn_kwargs={"split": config.split},
                            num_cpus=config.io_cpus)
    # A catalogue file is one large block and a block goes to one actor: split it so all of them work.
    ds = ds.repartition(target_num_rows_per_block=config.batch_size)
    ds = ds.map_batches(PosterEmbedder, fn_constructor_kwargs={"bundle": str(config.model)},
                        compute=ray.data.ActorPoolStrategy(size=pool.size), num_cpus=pool.cpus,
                        num_gpus=pool.gpus, batch_size=config.batch_size, batch_format="pandas")
    ds.write_parquet(str(staging), ray_remote_args={"num_cpus": config.io_cpus})


def _bundle_genres(bundle: Path) -> list[str]:
    from posterfusion.features.vocab import GenreVocabulary

    return GenreVocabulary.load(bundle / "genres.json").genres


def _replace(staging: Path, final: Path) -> Path:
    """Swap the finished run into place; readers never see a half-written folder under ``final``."""
    old = final.with_name(f"_old-{final.name}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def format_embed_summary(summary: dict) -> str:
    gpu = f" + {summary['gpus_per_actor']} GPU" if summary["gpus_per_actor"] else ""
    return (f"embeddings: {summary['rows']} posters × {summary['dim']} dims (model {summary['model_version']}"
            f"{', split ' + summary['split'] if summary['split'] else ''}) on {summary['actors']} actors × "
            f"{summary['cpus_per_actor']} CPU{gpu}; {summary['seconds']} s, {summary['posters_per_s']} posters/s"
            f" → {summary['out']}")


# --- reading embeddings and searching them ---------------------------------------------------


def embedding_files(embeddings: str | Path) -> list[str]:
    """Parquet files of an embeddings folder; accepts the job's ``--out`` or ``OUT/embeddings``."""
    root = Path(embeddings)
    folder = root / "embeddings" if (root / "embeddings").is_dir() else root
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no embeddings under {folder}: run the embeddings job "
                                "(jobs.similar.run_embeddings) with this model and catalogue first")
    return files


def _read_table(folder: str | Path, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.dataset as pads

    return pads.dataset(embedding_files(folder), schema=EMBEDDINGS_SCHEMA, format="parquet").to_table(columns=columns)


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
    def load(cls, embeddings: str | Path) -> EmbeddingIndex:
        table = _read_table(embeddings, ["movie_id", "poster_sha256", "model_version", "embedding", "top_genres"])
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


def nearest(embeddings_dir: str | Path, query_vector: np.ndarray, k: int = 8) -> list[tuple[str, float]]:
    """The ``k`` catalogue posters most similar to ``query_vector``: ``(movie_id, cosine similarity)``.

    The query itself is not excluded: a stored vector finds its own poster first, at similarity 1.
    """
    index = EmbeddingIndex.load(embeddings_dir)
    return [(str(index.rows["movie_id"].iat[i]), s) for i, s in index.nearest(query_vector, k)]


def similar_posters(model: str | Path, catalogue: str | Path, poster: bytes | str | Path, k: int = 8,
                    embeddings: str | Path | None = None, metadata: dict | None = None) -> list[dict]:
    """The ``k`` catalogue posters most like ``poster`` (bytes or a file), best first.

    ``embeddings`` is the embeddings job's output folder and is required: a query never embeds
    the catalogue itself (see the module docstring). Copies of the query (same sha256) are left
    out. ``metadata`` is the query's optional metadata record, for bundles that read metadata.
    Each result: movie_id, title, genres (catalogue labels), predicted (top genres), similarity.
    """
    from posterfusion.models.predictor import Predictor

    if embeddings is None:
        raise FileNotFoundError("similar posters needs the catalogue's embeddings: run the embeddings job "
                                "(jobs.similar.run_embeddings with this model and catalogue) once, then pass "
                                "its output folder as `embeddings`")
    index = EmbeddingIndex.load(embeddings)
    predictor = Predictor(model, detect=False)
    if index.model_version != predictor.version:
        raise ValueError(f"the embeddings were made by model {index.model_version}, the query model is "
                         f"{predictor.version}: rerun the embeddings job with {model}")
    data = poster if isinstance(poster, bytes) else Path(poster).read_bytes()
    vector = predictor.embeddings(predictor.decode([data]), [metadata])[0]
    hits = index.nearest(vector, k, exclude_sha=hashlib.sha256(data).hexdigest())
    info = _catalogue_info(catalogue, [str(index.rows["movie_id"].iat[i]) for i, _ in hits])
    return [_result(index.rows.iloc[i], info.get(str(index.rows["movie_id"].iat[i]), {}), score)
            for i, score in hits]


def _catalogue_info(catalogue: str | Path, ids: list[str]) -> dict[str, dict]:
    """Title and labelled genres of a few catalogue rows (no poster bytes are read)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from posterfusion.features.catalogue import catalogue_files

    table = pads.dataset(catalogue_files(catalogue), format="parquet").to_table(
        columns=["movie_id", "title", "genres"], filter=pc.field("movie_id").isin(ids))
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


# --- contact sheet ---------------------------------------------------------------------------


def read_scores(embeddings: str | Path) -> pd.DataFrame:
    """The probabilities the embeddings job stored: ``movie_id`` plus one column per genre."""
    table = _read_table(embeddings, ["movie_id", "probabilities"])
    root = Path(embedding_files(embeddings)[0]).parent
    genres = json.loads((root / MANIFEST).read_text())["genres"]
    frame = pd.DataFrame(_matrix(table["probabilities"], table.num_rows), columns=genres)
    frame.insert(0, "movie_id", table["movie_id"].to_pylist())
    return frame


def contact_sheet_size(genres: int, per_genre: int) -> tuple[int, int]:
    """(width, height) in pixels of a sheet: fixed cells, so the size never depends on the posters."""
    return LABEL_WIDTH + per_genre * CELL_WIDTH, genres * ROW_HEIGHT


def contact_sheet(scores: pd.DataFrame | str | Path, catalogue: str | Path, genres: list[str] | None,
                  out_png: str | Path, per_genre: int = 6) -> Path:
    """PNG with one row per genre: the ``per_genre`` posters scored highest for it, with probabilities.

    ``scores`` is a frame of ``movie_id`` + one probability column per genre (batch scoring's
    output pivoted, or :func:`read_scores`), or an embeddings folder to read them from.
    ``genres=None`` draws every score column. Short rows (few posters) leave blank cells.
    """
    frame = read_scores(scores) if isinstance(scores, str | Path) else scores
    genres = list(genres) if genres is not None else [c for c in frame.columns if c != "movie_id"]
    missing = [g for g in genres if g not in frame.columns]
    if missing or "movie_id" not in frame.columns:
        raise ValueError(f"scores need movie_id and a column per genre; missing {missing or ['movie_id']}")
    picks = {g: frame[["movie_id", g]].dropna().nlargest(per_genre, g, keep="first") for g in genres}
    ids = sorted({str(m) for top in picks.values() for m in top["movie_id"]})
    posters = _catalogue_posters(catalogue, ids)
    sheet = _draw_sheet(genres, picks, posters, per_genre)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def _catalogue_posters(catalogue: str | Path, ids: list[str]) -> dict[str, bytes]:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from posterfusion.features.catalogue import catalogue_files

    table = pads.dataset(catalogue_files(catalogue), format="parquet").to_table(
        columns=["movie_id", "poster"], filter=pc.field("movie_id").isin(ids))
    return dict(zip(table["movie_id"].to_pylist(), table["poster"].to_pylist(), strict=True))


def _draw_sheet(genres: list[str], picks: dict[str, pd.DataFrame], posters: dict[str, bytes], per_genre: int):
    from PIL import Image, ImageDraw, ImageFont

    sheet = Image.new("RGB", contact_sheet_size(len(genres), per_genre), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for row, genre in enumerate(genres):
        top = row * ROW_HEIGHT
        best = picks[genre][genre].max() if len(picks[genre]) else float("nan")
        draw.text((PAD, top + PAD), genre, fill="black", font=font)
        draw.text((PAD, top + PAD + 16), f"top p {best:.2f}", fill="dimgray", font=font)
        for col, (movie_id, prob) in enumerate(zip(picks[genre]["movie_id"], picks[genre][genre], strict=True)):
            left = LABEL_WIDTH + col * CELL_WIDTH
            sheet.paste(_thumbnail(posters.get(str(movie_id))), (left, top + PAD // 2))
            caption_y = top + PAD // 2 + THUMB_HEIGHT + 2
            draw.text((left, caption_y), str(movie_id)[:16], fill="black", font=font)
            draw.text((left, caption_y + 12), f"p {prob:.2f}", fill="dimgray", font=font)
    return sheet


def _thumbnail(data: bytes | None):
    """The poster resized to the cell; a grey cell where it is missing or unreadable (the sheet still renders)."""
    from PIL import Image

    from posterfusion.features.catalogue import decode_rgb

    try:
        return decode_rgb(data).resize((THUMB_WIDTH, THUMB_HEIGHT), Image.Resampling.BILINEAR)
    except ValueError:
        return Image.new("RGB", (THUMB_WIDTH, THUMB_HEIGHT), "lightgray")
