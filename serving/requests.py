"""The HTTP side of a request: reading and checking what a client sent, before it reaches the model.

Every refusal is an :class:`ApiError` (a 4xx with a stable code and a message); the routes in
:mod:`posterfusion.serving.deployments` turn it into the JSON error body.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from posterfusion.serving.config import ServeConfig
from posterfusion.serving.schemas import MovieMetadata

PAGE = Path(__file__).with_name("index.html")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")


class ApiError(Exception):
    """A request the service refuses: HTTP status, a stable code, and what is wrong."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# Decode failures the replica reports, mapped to statuses (413 for the pixel cap: too big, not malformed).
DECODE_STATUS = {"image_too_large": 413, "unsupported_format": 415}


async def read_json_field(value, field: str, limit: int):
    """A form field (text, or a file part: ``curl -F metadata=@m.json``) parsed as JSON; None when absent.

    Bounded before parsing (413), and every way ``json.loads`` can refuse — bad syntax, an integer
    of thousands of digits, nesting deeper than the parser recurses — is the client's 422.
    """
    if value is None:
        return None
    raw = value if isinstance(value, str) else await value.read(limit + 1)
    if len(raw) > limit:
        raise ApiError(413, "metadata_too_large", f"{field} is over {limit} bytes")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "invalid_metadata", f"{field} is not UTF-8 text") from None
    if raw.strip() == "":
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_metadata", f"{field} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except (ValueError, RecursionError) as exc:
        message = f"{field} cannot be parsed: {type(exc).__name__}: {exc}"[:300]
        raise ApiError(422, "invalid_metadata", message) from None


def parse_metadata(value) -> dict | None:
    """A metadata object → the Predictor's record (only the fields given); 422 says which field is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_metadata", f"metadata must be a JSON object, got {type(value).__name__}")
    try:
        return MovieMetadata.model_validate(value).model_dump(exclude_none=True)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'metadata'}: {e['msg']}" for e in exc.errors())
        raise ApiError(422, "invalid_metadata", problems) from None


def batch_metadata(value, n: int) -> list[dict | None]:
    if value is None:
        return [None] * n
    if not isinstance(value, list) or len(value) != n:
        raise ApiError(422, "invalid_metadata", f"metadata must be a JSON list with one entry (object or null) "
                       f"per poster: {n}")
    return [parse_metadata(v) for v in value]


def raise_first(results: list) -> None:
    """All posters of a batch request are answered, or the first problem is (4xx, naming the poster)."""
    for result in results:
        if isinstance(result, BaseException):
            raise result


def check_poster_part(part, limit: int, name: str) -> None:
    """An uploaded part must be a non-empty image of at most ``limit`` bytes (415 / 400 / 413)."""
    if part is None or isinstance(part, str):
        raise ApiError(400, "missing_poster", f"multipart field '{name}' with an image file is required")
    content_type = (part.content_type or "").split(";")[0].strip().lower()
    if content_type not in IMAGE_TYPES and content_type != "application/octet-stream":
        raise ApiError(415, "unsupported_media_type",
                       f"'{name}' is {content_type or 'untyped'}; send one of {', '.join(IMAGE_TYPES)}")
    if part.size is not None and part.size > limit:
        raise ApiError(413, "poster_too_large", f"'{name}' is {part.size} bytes; the limit is {limit}")


def _form_options(config: ServeConfig, posters: int) -> dict:
    """Starlette's own part-size check would answer an oversized metadata field 400: the body is
    already capped by :func:`read_body`, and the metadata's own limit is :func:`read_json_field`'s 413."""
    return {"max_files": config.max_batch_posters + 1, "max_fields": 8, "max_part_size": body_limit(config, posters)}


def body_limit(config: ServeConfig, posters: int) -> int:
    return config.max_upload_bytes * posters + config.max_metadata_bytes + 1_000_000


async def read_body(request, limit: int) -> bytes:
    """The whole body, counted while it streams: a chunked upload (no Content-Length) is cut off at ``limit``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, "body_too_large", f"request body is {length} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request, config: ServeConfig, posters: int = 1):
    """The multipart body, refusing a wrong content type (415) or an oversized body (413) first.

    The body is read under :func:`read_body`'s cap, then parsed from memory: Starlette alone
    would spool file parts of any size to disk.
    """
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with an image in 'poster' (got {content_type or 'no content type'})")
    body = await read_body(request, body_limit(config, posters))

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(**_form_options(config, posters))
    except HTTPException as exc:
        raise ApiError(400, "bad_multipart", str(exc.detail)) from None
    except Exception as exc:  # a malformed multipart body (starlette raises several kinds)
        raise ApiError(400, "bad_multipart", f"could not parse the multipart body: {exc}"[:300]) from None
