"""The genre vocabulary: synonym merge, non-genre drop, rare-genre folding, multi-hot."""

from __future__ import annotations

import numpy as np

from posterfusion.features.vocab import OTHER, GenreVocabulary, VocabConfig

LISTS = (
    [["Drama"]] * 30 + [["Comedy", "Drama"]] * 20 + [["Music"]] * 15 + [["Musical", "Music"]] * 10
    + [["Western"]] * 3 + [["N/A"]] * 2
)


def test_synonyms_merge_and_a_poster_counts_once():
    vocab = GenreVocabulary.build(LISTS, VocabConfig(min_count=0))
    assert vocab.counts["Music"] == 25  # 15 + 10, not 35
    assert "Musical" not in vocab.genres and vocab.mapping["Musical"] == "Music"


def test_non_genres_are_dropped_and_rare_genres_fold_into_other():
    vocab = GenreVocabulary.build(LISTS, VocabConfig(min_count=5))
    assert vocab.genres == ["Drama", "Music", "Comedy", OTHER]
    assert vocab.mapping["Western"] == OTHER and vocab.mapping["N/A"] is None
    assert vocab.counts[OTHER] == 3


def test_top_n_keeps_the_most_frequent():
    vocab = GenreVocabulary.build(LISTS, VocabConfig(min_count=0, top_n=2))
    assert vocab.genres == ["Drama", "Music", OTHER]
    no_other = GenreVocabulary.build(LISTS, VocabConfig(min_count=0, top_n=2, fold_into_other=False))
    assert no_other.genres == ["Drama", "Music"] and no_other.mapping["Comedy"] is None


def test_multi_hot_encoding_and_unseen_labels(tmp_path):
    vocab = GenreVocabulary.build(LISTS, VocabConfig(min_count=5))
    np.testing.assert_array_equal(vocab.encode(["Comedy", "Musical"]), [0, 1, 1, 0])
    np.testing.assert_array_equal(vocab.encode(["Film-Noir"]), [0, 0, 0, 1])  # unseen → Other
    np.testing.assert_array_equal(vocab.encode(["N/A"]), [0, 0, 0, 0])
    assert vocab.encode_many([]).shape == (0, 4)
    vocab.save(tmp_path / "genres.json")
    assert GenreVocabulary.load(tmp_path / "genres.json") == vocab
