"""The per-poster decode check, quality flags and deterministic splits."""

from __future__ import annotations

import io
from collections import Counter

from PIL import Image

from posterfusion.features.catalogue import assign_splits, check_poster, split_of

from support import jpeg_bytes, noisy_jpeg_bytes


def test_a_good_poster_passes_with_its_size(tmp_path):
    path = tmp_path / "ok.jpg"
    path.write_bytes(jpeg_bytes(size=(60, 90)))
    check = check_poster(str(path))
    assert check.reject_reason is None
    assert (check.width, check.height) == (60, 90)
    assert len(check.sha256) == 64 and check.data == path.read_bytes()
    assert not check.grayscale


def test_each_kind_of_bad_file_has_its_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    data = noisy_jpeg_bytes(0)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    reasons = {name: check_poster(str(tmp_path / name)).reject_reason
               for name in ["missing.jpg", "empty.jpg", "text.jpg", "cut.jpg"]}
    assert reasons["missing.jpg"] == "missing_file"
    assert reasons["empty.jpg"] == "empty_file"
    assert reasons["text.jpg"] == "not_an_image"
    assert reasons["cut.jpg"].startswith("truncated_image")


def test_a_decompression_bomb_is_rejected_without_decoding_it(tmp_path):
    buffer = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(buffer, "PNG")  # 60 Mpx, a few KB on disk
    (tmp_path / "bomb.png").write_bytes(buffer.getvalue())
    assert check_poster(str(tmp_path / "bomb.png")).reject_reason == "image_too_large"


def test_grayscale_posters_are_flagged(tmp_path):
    (tmp_path / "grey.jpg").write_bytes(jpeg_bytes(color=(90, 90, 90)))
    buffer = io.BytesIO()
    Image.new("L", (40, 60), 120).save(buffer, "JPEG")
    (tmp_path / "mono.jpg").write_bytes(buffer.getvalue())
    assert check_poster(str(tmp_path / "grey.jpg")).grayscale
    assert check_poster(str(tmp_path / "mono.jpg")).grayscale


def test_split_is_deterministic_and_roughly_80_10_10():
    ids = [f"tt{i:07d}" for i in range(5000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    counts = Counter(splits)
    assert 3800 < counts["train"] < 4200 and 380 < counts["val"] < 620 and 380 < counts["test"] < 620


def test_byte_identical_posters_share_one_split():
    ids = [f"tt{i:07d}" for i in range(200)]
    groups = {"same": ids[:50], **{f"sha{i}": [i_] for i, i_ in enumerate(ids[50:])}}
    splits = assign_splits(groups)
    assert len({splits[i] for i in ids[:50]}) == 1
    assert splits[ids[60]] == split_of(ids[60])
