"""The poster catalogue: its Parquet schema, the per-poster decode check, and the splits.

The catalogue is the one table every later stage reads: one row per poster, holding the
original image bytes (so scoring needs no file system of the source), labels, a
deterministic split, quality flags and joined metadata. ``docs/catalogue.md`` documents it.
"""

from __future__ import annotations

import hashlib
import io
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from posterfusion.errors import UserFileNotFound
from posterfusion.locations import PUBLISHED, Location, ParquetFiles

SPLITS = ("train", "val", "test")
SMALL_WIDTH = 150  # the README's thumbnails are under 150 px wide
MAX_PIXELS = 50_000_000  # larger images are rejected as possible decompression bombs

# The metadata a source may join to a poster: the one list of those columns and their types. The
# readers type their frames from it (features/sources.py); the encoder reads a subset (FIELDS).
METADATA_SCHEMA = pa.schema([
    pa.field("year", pa.int32()),
    pa.field("runtime", pa.float32()),
    pa.field("imdb_score", pa.float32()),
    pa.field("num_votes", pa.int64()),
    pa.field("budget", pa.float64()),
    pa.field("gross", pa.float64()),
    pa.field("content_rating", pa.string()),
    pa.field("language", pa.string()),
    pa.field("country", pa.string()),
    pa.field("popularity", pa.float32()),
    pa.field("overview", pa.string()),
])

CATALOGUE_SCHEMA = pa.schema([
    pa.field("movie_id", pa.string(), nullable=False),
    pa.field("title", pa.string()),
    pa.field("poster", pa.binary(), nullable=False),
    pa.field("poster_sha256", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("genres", pa.list_(pa.string()), nullable=False),
    pa.field("labelled", pa.bool_(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("grayscale", pa.bool_(), nullable=False),
    pa.field("small", pa.bool_(), nullable=False),
    pa.field("landscape", pa.bool_(), nullable=False),
    pa.field("duplicate_poster", pa.bool_(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("poster_file", pa.string()),
    *METADATA_SCHEMA,
    pa.field("metadata_sources", pa.list_(pa.string())),
])

@dataclass(frozen=True)
class PosterCheck:
    """What the decode check learnt about one poster file."""

    data: bytes | None
    sha256: str | None
    width: int = 0
    height: int = 0
    grayscale: bool = False
    reject_reason: str | None = None


def check_poster(path: str) -> PosterCheck:
    """Read a poster file (a path or a URI) and decode it fully; say why it is unusable if it is.

    Reasons: ``missing_file``, ``empty_file``, ``not_an_image``, ``truncated_image``,
    ``image_too_large``, ``unreadable_file``. A full ``load()`` (not just ``verify()``) is what
    catches JPEGs cut short.
    """
    if not path:
        return PosterCheck(None, None, reject_reason="missing_file")
    try:
        data = Location(path).read_bytes()
    except FileNotFoundError:
        return PosterCheck(None, None, reject_reason="missing_file")
    except OSError as exc:
        return PosterCheck(None, None, reject_reason=f"unreadable_file: {exc.strerror or exc}"[:200])
    if not data:
        return PosterCheck(None, None, reject_reason="empty_file")
    return inspect_image_bytes(data)


class PosterDecodeError(ValueError):
    """Poster bytes that are not a usable image; ``str(error)`` is the reason code."""


def _pil_open(stream: io.BytesIO) -> Image.Image:
    """Pillow's own ``Image.open``, even where Ultralytics has patched it (see ``objects.yolo_class``)."""
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)(stream)


@dataclass(frozen=True)
class DecodeLimits:
    """What a decoder accepts: a pixel cap, the image formats, and how small a JPEG may be decoded.

    The catalogue default is generous (``MAX_PIXELS``, any format Pillow reads); the online
    service is stricter (:data:`SERVING_LIMITS`): a poster-sized cap, so a few-KB PNG cannot
    force a ~150 MB decode, only the formats posters come in, and JPEG "draft" decoding, which
    lets libjpeg scale a large JPEG down by 2–8× while decoding instead of after.
    """

    max_pixels: int = MAX_PIXELS
    formats: tuple[str, ...] | None = None  # Pillow format names; None = any
    draft: tuple[int, int] | None = None  # decode JPEGs at no less than this size


SERVING_LIMITS = DecodeLimits(max_pixels=16_000_000, formats=("JPEG", "PNG", "WEBP"), draft=(1280, 1280))


def decode_image(data: bytes | None, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode poster bytes fully: the one decoder of ingest, training, scoring and serving.

    Guards: a pixel cap against decompression bombs (checked from the header, before any
    pixel is decoded), the accepted formats, and a full ``load()``, which is what catches
    JPEGs cut short. Raises :class:`PosterDecodeError` with a reason code: ``empty_file``,
    ``not_an_image``, ``unsupported_format``, ``image_too_large``, ``truncated_image: …``.
    """
    if not data:
        raise PosterDecodeError("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _pil_open(io.BytesIO(bytes(data)))
            if limits.formats is not None and image.format not in limits.formats:
                raise PosterDecodeError(f"unsupported_format: {image.format}; send {', '.join(limits.formats)}")
            if image.width * image.height > limits.max_pixels:
                raise PosterDecodeError("image_too_large")
            if limits.draft is not None and image.format == "JPEG":
                image.draft("RGB", limits.draft)
            image.load()
            return image
    except PosterDecodeError:
        raise
    except UnidentifiedImageError:
        raise PosterDecodeError("not_an_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PosterDecodeError("image_too_large") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PosterDecodeError(f"truncated_image: {exc}"[:200]) from None


def decode_rgb(data: bytes | None, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """:func:`decode_image`, converted to RGB (what every model input starts from)."""
    image = decode_image(data, limits)
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise PosterDecodeError(f"unsupported_mode: {image.mode}") from exc


def inspect_image_bytes(data: bytes) -> PosterCheck:
    """The ingest check: decode, and describe the poster or say why it is unusable."""
    sha = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image(data)
    except PosterDecodeError as exc:
        return PosterCheck(None, sha, reject_reason=str(exc))
    return PosterCheck(data, sha, image.width, image.height, _is_grayscale(image))


def _is_grayscale(image: Image.Image) -> bool:
    """True for one-channel images and for RGB posters whose channels (almost) agree."""
    if image.mode in ("1", "L", "LA", "I", "F", "I;16"):
        return True
    import numpy as np

    thumb = np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.int16)
    spread = thumb.max(axis=2) - thumb.min(axis=2)
    return float(spread.mean()) < 4.0


def split_of(key: str, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """Deterministic split from a stable hash of ``key`` (not Python's salted ``hash``)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"


def assign_splits(ids_by_sha: dict[str, list[str]], val_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> dict[str, str]:
    """Split per movie id, forcing byte-identical posters into one split.

    Every id sharing a poster hash takes the split of the smallest id in the group, so no
    poster can be trained on and then tested on under another id.
    """
    splits: dict[str, str] = {}
    for ids in ids_by_sha.values():
        split = split_of(min(ids), val_fraction, test_fraction)
        for movie_id in ids:
            splits[movie_id] = split
    return splits


def catalogue_files(catalogue: str | Path | Location) -> ParquetFiles:
    """The Parquet files of a catalogue ``posterfusion ingest`` wrote (its folder, or the folder's ``data``).

    Locally every ``data/*.parquet`` file; on an object store the files its ``_PUBLISHED`` manifest
    lists, written last by ingest: a prefix without one holds no catalogue (yet: an ingest in progress
    or failed), never a partial one. The result is what pyarrow and Ray Data take: a file system and paths.
    """
    root = Location.parse(catalogue)
    if root.is_local:
        data = root / "data" if (root / "data").is_dir() else root
        files = data.list_files(".parquet", recursive=False)
        if not files:
            raise UserFileNotFound(f"no catalogue Parquet files under {data}")
        return ParquetFiles(files)
    if root.name == "data" and not (root / PUBLISHED).exists():
        root = root.parent
    try:
        files = [f for f in root.published_files() if f.relative_to(root).startswith("data/")
                 and f.name.endswith(".parquet")]
    except UserFileNotFound as error:
        raise UserFileNotFound(f"no catalogue under {root}: {str(error).split(': ', 1)[-1]}") from None
    if not files:
        raise UserFileNotFound(f"no catalogue Parquet files under {root / 'data'}")
    return ParquetFiles(files)


def catalogue_identity(catalogue: str | Path | Location) -> dict:
    """Where a catalogue is and what it holds: a fingerprint of every row's id, poster hash, split and labels.

    A bundle records it, so a later stage can tell that a bundle was trained on another (or an
    older) catalogue instead of silently reusing it. Reads only the small columns.
    """
    table = catalogue_files(catalogue).read(columns=["movie_id", "poster_sha256", "split", "labelled", "genres"])
    rows = sorted(zip(*(table[c].to_pylist() for c in table.column_names), strict=True))
    digest = hashlib.sha256(repr(rows).encode()).hexdigest()[:16]
    return {"path": str(Location.parse(catalogue).absolute()), "fingerprint": digest, "rows": len(rows)}
