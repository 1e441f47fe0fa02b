"""The metadata encoder: training-split statistics, top-k categories, missing metadata as the normal case."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from posterfusion.features.metadata import CATEGORICAL, FIELDS, NUMERIC, MetadataEncoder

TRAIN = pd.DataFrame({
    "movie_id": ["a", "b", "c", "d", "e"],
    "year": [1990, 2000, 2010, None, pd.NA],
    "runtime": [90.0, 120.0, np.nan, np.nan, np.nan],
    "num_votes": [0, math.e - 1, None, None, None],  # log1p → 0, 1
    "content_rating": ["PG", "R", "R", "PG-13", None],
    "language": ["English", "English", "French", "German", None],
    "country": [None, None, None, None, None],
    # imdb_score, budget, gross and popularity columns are absent: all missing
})


def test_fit_uses_population_mean_and_std():
    encoder = MetadataEncoder.fit(TRAIN)
    assert encoder.numeric["year"].mean == 2000.0
    assert encoder.numeric["year"].std == pytest.approx(math.sqrt(200 / 3))  # ddof=0 over 1990, 2000, 2010
    assert encoder.numeric["runtime"].mean == 105.0 and encoder.numeric["runtime"].std == 15.0
    assert encoder.numeric["num_votes"].mean == pytest.approx(0.5)
    assert encoder.numeric["num_votes"].std == pytest.approx(0.5)
    assert encoder.numeric["imdb_score"].mean == 0.0 and encoder.numeric["imdb_score"].std == 1.0  # never seen
    features = encoder.transform(TRAIN.iloc[:2])
    names = encoder.feature_names()
    assert features.dtype == np.float32 and features.shape == (2, encoder.dim) and len(names) == encoder.dim
    row = dict(zip(names, features[0], strict=True))
    assert row["year"] == pytest.approx(-10 / math.sqrt(200 / 3))
    assert row["runtime"] == pytest.approx(-1.0) and row["num_votes"] == pytest.approx(-1.0)
    assert row["content_rating=PG"] == 1 and row["content_rating=R"] == 0 and row["language=English"] == 1
    assert row["year_missing"] == 0 and row["imdb_score_missing"] == 1 and row["country_missing"] == 1
    assert row["has_metadata"] == 1


def test_an_all_missing_row_is_zeros_plus_missing_flags():
    encoder = MetadataEncoder.fit(TRAIN)
    empty = pd.DataFrame({"year": [pd.NA], "content_rating": [None], "budget": [np.nan]})
    features = dict(zip(encoder.feature_names(), encoder.transform(empty)[0], strict=True))
    for name, value in features.items():
        assert value == (1.0 if name.endswith("_missing") else 0.0), name
    assert sum(name.endswith("_missing") for name in features) == len(FIELDS)
    np.testing.assert_array_equal(encoder.transform_records([None]), encoder.transform(empty))
    np.testing.assert_array_equal(encoder.transform_records([{}]), encoder.transform(empty))


def test_top_k_keeps_the_most_frequent_and_the_rest_is_other():
    encoder = MetadataEncoder.fit(TRAIN, top_k=2)
    assert encoder.categories["content_rating"] == ["R", "PG"]  # R twice; PG before PG-13 on the tie
    assert encoder.categories["country"] == []
    names = encoder.feature_names()
    assert encoder.dim == len(NUMERIC) + 3 + 3 + 1 + len(FIELDS) + 1
    rows = encoder.transform(pd.DataFrame({"content_rating": ["PG-13", "NC-17", "R"], "country": ["USA", None, None]}))
    other, r = names.index("content_rating=other"), names.index("content_rating=R")
    assert rows[0, other] == 1 and rows[1, other] == 1  # beyond top-k and unseen both → other
    assert rows[2, r] == 1 and rows[2, other] == 0
    assert rows[0, names.index("country=other")] == 1 and rows[1, names.index("country=other")] == 0


def test_values_are_clipped_and_negatives_do_not_break_the_log():
    encoder = MetadataEncoder.fit(TRAIN)
    rows = encoder.transform(pd.DataFrame({"year": [3000, 1000], "num_votes": [-5, np.inf]}))
    names = encoder.feature_names()
    assert rows[:, names.index("year")].tolist() == [5.0, -5.0]
    assert rows[0, names.index("num_votes")] == pytest.approx(-1.0)  # clipped to 0 before log1p
    assert rows[1, names.index("num_votes_missing")] == 1  # non-finite counts as missing
    assert np.isfinite(rows).all()


def test_save_load_round_trip(tmp_path):
    encoder = MetadataEncoder.fit(TRAIN)
    encoder.save(tmp_path / "metadata_encoder.json")
    loaded = MetadataEncoder.load(tmp_path / "metadata_encoder.json")
    assert loaded == encoder
    np.testing.assert_array_equal(loaded.transform(TRAIN), encoder.transform(TRAIN))


def test_transform_records_matches_the_frame_path_and_checks_its_input():
    encoder = MetadataEncoder.fit(TRAIN)
    records = [{"year": 1990, "runtime": 90.0, "num_votes": 0, "content_rating": "PG", "language": "English"},
               None, {"year": float("nan"), "content_rating": None}]
    frame = pd.DataFrame([records[0], {}, {}])
    np.testing.assert_array_equal(encoder.transform_records(records), encoder.transform(frame))
    assert encoder.transform_records([]).shape == (0, encoder.dim)
    with pytest.raises(ValueError, match="genre"):
        encoder.transform_records([{"year": 1990, "genre": "Drama"}])
    with pytest.raises(ValueError, match="year"):
        encoder.transform_records([{"year": "1990"}])
    with pytest.raises(ValueError, match="language"):
        encoder.transform_records([{"language": 7}])
    assert set(CATEGORICAL) <= set(FIELDS)


def test_every_list_of_metadata_fields_derives_from_one_source():
    """The encoder's INPUT_FIELDS, the catalogue schema, the readers' dtypes and the API's model agree."""
    from posterfusion.features.catalogue import CATALOGUE_SCHEMA, METADATA_SCHEMA
    from posterfusion.features.metadata import INPUT_FIELDS
    from posterfusion.features.sources import metadata_dtypes
    from posterfusion.serving.schemas import MovieMetadata

    assert set(INPUT_FIELDS) == set(METADATA_SCHEMA.names) and set(METADATA_SCHEMA.names) <= set(CATALOGUE_SCHEMA.names)
    assert set(metadata_dtypes()) == {"title", *METADATA_SCHEMA.names}
    assert set(MovieMetadata.model_fields) == set(INPUT_FIELDS)


OVERVIEWS = pd.DataFrame({
    "year": [1990, 2000, None, None, 2010],
    "overview": ["A detective hunts a killer.", "Aliens invade a small town.", "The detective and the aliens.",
                 None, "   "],
})


def test_an_overview_is_read_as_unit_length_tfidf_words_of_the_training_vocabulary():
    """Words seen in training only; a row without an overview (or only blanks) has zeros and its missing flag."""
    encoder = MetadataEncoder.fit(OVERVIEWS, text_words=50)
    names, encoded = encoder.feature_names(), encoder.transform(OVERVIEWS)
    start, stop = encoder.text_span
    assert names[start:stop] == [f"overview={w}" for w in encoder.text["overview"].words]
    assert "detective" in encoder.text["overview"].words and "the" not in encoder.text["overview"].words
    words = encoded[:, start:stop]
    np.testing.assert_allclose(np.linalg.norm(words[:3], axis=1), 1.0, rtol=1e-6)
    assert not words[3:].any()
    np.testing.assert_array_equal(encoded[:, names.index("overview_missing")], [0, 0, 0, 1, 1])
    unseen = encoder.transform(pd.DataFrame({"overview": ["Zombies everywhere."]}))
    assert not unseen[0, start:stop].any() and unseen[0, names.index("has_metadata")] == 1  # it has an overview
    detective = encoder.text["overview"].words.index("detective")
    assert words[0, detective] > 0 and words[1, detective] == 0


def test_an_encoder_without_text_encodes_as_before_and_a_request_with_only_an_overview_has_metadata():
    """Bundles fitted before the overview existed load and encode unchanged; the overview is a field of its own."""
    plain, worded = MetadataEncoder.fit(OVERVIEWS), MetadataEncoder.fit(OVERVIEWS, text_words=50)
    assert plain.text == {} and plain.text_span is None and "overview_missing" not in plain.feature_names()
    saved = plain.model_dump(mode="json")
    del saved["text"]  # as an encoder saved before text was read
    old = MetadataEncoder.model_validate(saved)
    np.testing.assert_array_equal(old.transform(OVERVIEWS), plain.transform(OVERVIEWS))
    only = worded.transform_records([{"overview": "A killer detective."}, None])
    names = worded.feature_names()
    assert only[0, names.index("has_metadata")] == 1 and only[0, names.index("year_missing")] == 1
    assert only[1, names.index("has_metadata")] == 0 and not only[1, slice(*worded.text_span)].any()
    assert plain.transform_records([{"overview": "A killer detective."}])[0, plain.feature_names().index(
        "has_metadata")] == 0  # an encoder that reads no text: an overview alone is no metadata to it
    with pytest.raises(ValueError, match="overview"):
        worded.transform_records([{"overview": 3}])
