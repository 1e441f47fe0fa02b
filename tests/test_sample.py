"""``posterfusion sample``: synthetic posters in the real layout, with learnable cues."""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from posterfusion.features.sources import read_metadata, read_multilabel
from posterfusion.jobs.sample import GENRE_CUES, SampleConfig, write_sample


def test_sample_is_read_by_the_real_reader(tmp_path):
    summary = write_sample(SampleConfig(out=tmp_path, n=30, unlabelled=5))
    rows = list(read_multilabel(tmp_path))
    assert sum(r.labelled for r in rows) == 30 and sum(not r.labelled for r in rows) == 5
    assert all(r.movie_id.startswith("tt9000") and set(r.genres) <= set(GENRE_CUES) for r in rows)
    assert all(1 <= len(r.genres) <= 3 for r in rows if r.labelled)
    assert len(read_metadata(summary["metadata"])) == summary["metadata_rows"] > 0


def test_sample_is_reproducible(tmp_path):
    write_sample(SampleConfig(out=tmp_path / "a", n=5, unlabelled=0, seed=3))
    write_sample(SampleConfig(out=tmp_path / "b", n=5, unlabelled=0, seed=3))
    assert (tmp_path / "a/train.csv").read_text() == (tmp_path / "b/train.csv").read_text()


def test_genre_cues_are_learnable_from_pixels(tmp_path):
    write_sample(SampleConfig(out=tmp_path, n=240, unlabelled=0))
    rows = list(read_multilabel(tmp_path))
    x = np.stack([np.asarray(Image.open(r.poster_path).resize((16, 24)), np.float32).ravel() / 255
                  for r in rows])
    for genre in ("Comedy", "Horror"):
        y = np.array([genre in r.genres for r in rows])
        model = LogisticRegression(max_iter=2000).fit(x[:160], y[:160])
        assert roc_auc_score(y[160:], model.predict_proba(x[160:])[:, 1]) > 0.8, genre
