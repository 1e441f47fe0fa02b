"""Poster similarity: the embeddings job, nearest-neighbour search, ``similar_posters`` and the contact sheet.

A module fixture computes the embeddings of the session's sample with its quick ``cnn`` bundle
(``quick_bundles``) once; each test then reads them.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from posterfusion.features.catalogue import catalogue_files
from posterfusion.features.metadata import FIELDS as METADATA_COLUMNS
from posterfusion.jobs.contact_sheet import CELL_WIDTH, LABEL_WIDTH, ROW_HEIGHT, contact_sheet
from posterfusion.jobs.embed import EmbedConfig, format_embed_summary, run_embeddings
from posterfusion.models.similarity import format_similar, nearest, read_scores, similar_posters


@pytest.fixture(scope="module")
def built(quick_bundles, tmp_path_factory):
    root = quick_bundles
    bundle, out = root / "models" / "quick" / "cnn-s0", tmp_path_factory.mktemp("similar")
    summary = run_embeddings(EmbedConfig(model=bundle, catalogue=root / "catalogue", out=out / "emb", batch_size=16))
    catalogue = catalogue_files(root / "catalogue").dataset().to_table().to_pandas()
    stored = pads.dataset(str(out / "emb" / "embeddings"), format="parquet").to_table().to_pandas()
    return {"root": out, "bundle": bundle, "catalogue_path": root / "catalogue", "summary": summary,
            "catalogue": catalogue, "stored": stored}


def _unique_poster(built) -> dict:
    """A catalogue row whose poster bytes occur once, so "itself" is unambiguous."""
    catalogue = built["catalogue"]
    counts = catalogue["poster_sha256"].value_counts()
    return catalogue[catalogue["poster_sha256"].map(counts) == 1].iloc[0].to_dict()


def test_embeddings_job_writes_one_unit_vector_per_poster(built):
    from posterfusion.models.bundle import load_bundle, model_version

    root, stored, catalogue = built["root"], built["stored"], built["catalogue"]
    hidden = load_bundle(built["bundle"]).config.model.hidden
    assert built["summary"]["rows"] == len(catalogue) == len(stored)
    assert built["summary"]["dim"] == hidden
    assert sorted(stored["movie_id"]) == sorted(catalogue["movie_id"])
    vectors = np.stack(stored["embedding"].to_list())
    assert vectors.shape == (len(catalogue), hidden) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert set(stored["model_version"]) == {model_version(built["bundle"])}
    genres = json.loads((root / "emb" / "embeddings" / "_manifest.json").read_text())["genres"]
    assert len(genres) > 3
    assert all(len(top) == 3 and set(top) <= set(genres) for top in stored["top_genres"])


def test_batch_and_online_embeddings_agree(built):
    """The actor and a Predictor called directly see the same inputs (poster + catalogue metadata)."""
    from posterfusion.models.predictor import Predictor

    predictor = Predictor(built["bundle"])
    rows = built["catalogue"].head(4).reset_index(drop=True)
    scored = predictor.score(rows["poster"].tolist(), rows[list(METADATA_COLUMNS)], embed=True)
    stored = built["stored"].set_index("movie_id").loc[rows["movie_id"]]
    np.testing.assert_allclose(scored.embeddings, np.stack(stored["embedding"].to_list()), atol=1e-5)
    np.testing.assert_allclose(scored.probabilities, np.stack(stored["probabilities"].to_list()), atol=1e-5)
    record = {field: rows.loc[0, field] for field in METADATA_COLUMNS}
    np.testing.assert_allclose(predictor.embed_one(rows.loc[0, "poster"], record), scored.embeddings[0], atol=1e-6)


def test_a_stored_vector_finds_its_own_poster_first(built):
    row = _unique_poster(built)
    stored = built["stored"].set_index("movie_id")
    hits = nearest(built["root"] / "emb", np.asarray(stored.loc[row["movie_id"], "embedding"]), k=5)
    assert len(hits) == 5
    assert hits[0][0] == row["movie_id"] and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_similar_posters_leaves_the_query_out_and_ranks_by_similarity(built, tmp_path):
    root, row = built["root"], _unique_poster(built)
    poster = tmp_path / "query.jpg"
    poster.write_bytes(row["poster"])
    results = similar_posters(built["bundle"], built["catalogue_path"], poster, k=6, embeddings=root / "emb")
    assert len(results) == 6
    assert row["movie_id"] not in {r["movie_id"] for r in results}
    assert [r["similarity"] for r in results] == sorted((r["similarity"] for r in results), reverse=True)
    catalogue = built["catalogue"].set_index("movie_id")
    for r in results:  # titles and labels come from the catalogue (no title where no metadata joined)
        title = catalogue.at[r["movie_id"], "title"]
        assert r["title"] == (title if isinstance(title, str) else None)
        assert r["genres"] == list(catalogue.at[r["movie_id"], "genres"]) and len(r["predicted"]) == 3
    text = format_similar(results)
    assert len(text.splitlines()) == 6 and results[0]["movie_id"] in text.splitlines()[0]
    # Bytes work as well as a path and give the same answer.
    assert similar_posters(built["bundle"], built["catalogue_path"], row["poster"], k=6,
                           embeddings=root / "emb" / "embeddings") == results


def test_similar_posters_explains_missing_or_foreign_embeddings(built, tmp_path):
    root = built["root"]
    poster = built["catalogue"]["poster"].iloc[0]
    with pytest.raises(FileNotFoundError, match="run the embeddings job"):
        similar_posters(built["bundle"], built["catalogue_path"], poster)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    table = pads.dataset(str(root / "emb" / "embeddings"), format="parquet").to_table()
    version = table.schema.get_field_index("model_version")
    pq.write_table(table.set_column(version, "model_version", pa.array(["0" * 16] * table.num_rows)),
                   foreign / "part.parquet")
    with pytest.raises(ValueError, match="rerun the embeddings job"):
        similar_posters(built["bundle"], built["catalogue_path"], poster, embeddings=foreign)


def test_contact_sheet_has_one_row_per_genre(built, tmp_path):
    root = built["root"]
    scores = read_scores(root / "emb")
    genres = [c for c in scores.columns if c != "movie_id"][:3]
    assert len(scores) == len(built["catalogue"]) and len(genres) == 3
    out = contact_sheet(scores, built["catalogue_path"], genres, tmp_path / "sheet.png", per_genre=4)
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (LABEL_WIDTH + 4 * CELL_WIDTH, 3 * ROW_HEIGHT)
        # The first poster cell of the first row is the poster, not the white background.
        cell = np.asarray(image.convert("RGB"))[10:100, LABEL_WIDTH + 10:LABEL_WIDTH + 60]
        assert cell.std() > 5
    # The embeddings folder can stand in for the scores frame: same sheet, byte for byte.
    again = contact_sheet(root / "emb", built["catalogue_path"], genres, tmp_path / "again.png", per_genre=4)
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(out.read_bytes()).digest()


def test_embeddings_of_one_split_replace_an_older_run(built, tmp_path):
    stale = tmp_path / "embeddings" / "stale.parquet"
    stale.parent.mkdir()
    stale.write_bytes(b"from an older run")
    summary = run_embeddings(EmbedConfig(model=built["bundle"], catalogue=built["catalogue_path"], out=tmp_path,
                                         split="val", actors=1))
    val = built["catalogue"].loc[built["catalogue"]["split"] == "val", "movie_id"]
    stored = pads.dataset(str(tmp_path / "embeddings"), format="parquet").to_table().to_pandas()
    assert summary["rows"] == len(val) == len(stored) > 0 and sorted(stored["movie_id"]) == sorted(val)
    assert not stale.exists() and not list(tmp_path.glob("_*"))
    assert f"{len(val)} posters × {summary['dim']} dims" in format_embed_summary(summary)
    with pytest.raises(ValueError, match="split must be one of"):
        EmbedConfig(model=built["bundle"], catalogue=built["catalogue_path"], out=tmp_path, split="holdout")
