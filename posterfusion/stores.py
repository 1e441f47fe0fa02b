"""What each object store's client needs, and what its errors mean to a user.

Shared by :mod:`posterfusion.locations` (pyarrow's file systems) and :mod:`posterfusion.conditional`
(boto3's conditional requests): both read credentials and endpoints from the same standard
environment, and both turn a store's error into one line naming the location.
"""

from __future__ import annotations

import os

from posterfusion.errors import UserError, UserFileNotFound, UserValueError


class LocationError(UserError, OSError):
    """A location that cannot be used as it is: missing bucket, no access, unreachable, unknown scheme."""


def explain(location, exc: BaseException, doing: str) -> UserError | None:
    """The :class:`UserError` a storage exception means for ``location`` (a Location), or None for a bug."""
    code, status = error_code(exc)
    text = " ".join(str(exc).split())
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"the endpoint {endpoint}" if endpoint and location.scheme == "s3" else "its storage endpoint"
    if "Unrecognized filesystem type" in text or "not compiled with" in text or "support not enabled" in text.lower():
        return LocationError(f"{location}: no file system handles the scheme '{location.scheme}://'")
    if code == "NoSuchBucket" or "NO_SUCH_BUCKET" in text or "bucket does not exist" in text.lower():
        return LocationError(f"{location}: the bucket '{location.bucket}' does not exist")
    if code in _DENIED or status == 403 or any(m in text for m in ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE",
                                                                   "HTTP status 403", "AccessDenied")):
        return LocationError(f"{location}: access denied while {doing} — check the credentials "
                             "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3://)")
    if code == "NoCredentials":
        return LocationError(f"{location}: no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                             "or AWS_PROFILE)")
    if code == "Unreachable" or any(m in text for m in _UNREACHABLE):
        return LocationError(f"{location}: cannot reach {where} while {doing}")
    if code in ("NoSuchKey", "404") or status == 404 or isinstance(exc, FileNotFoundError):
        return UserFileNotFound(f"{location}: nothing there")
    if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return LocationError(f"{location}: {exc.strerror or text} while {doing}")
    if isinstance(exc, OSError) or code:
        return LocationError(f"{location}: {doing} failed: {text[:300]}")
    if type(exc).__name__ == "ArrowInvalid":
        return UserValueError(f"{location}: not a usable location: {text[:300]}")
    return None


_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
           "AllAccessDisabled", "InvalidClientTokenId", "AuthFailure"}
_UNREACHABLE = ("curlCode: 7", "Couldn't connect", "Could not connect", "Connection refused", "NETWORK_CONNECTION",
                "Could not resolve host", "Failed to connect", "Timeout was reached", "curlCode: 28")


def error_code(exc: BaseException) -> tuple[str, int | None]:
    """botocore's error code and HTTP status (``Unreachable``/``NoCredentials`` for its connection errors)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return (response.get("Error", {}).get("Code", ""),
                response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    name = type(exc).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"):
        return "Unreachable", None
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return "NoCredentials", None
    return "", None


ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")


def environment() -> tuple:
    """The standard variables a store client reads: a client made under other values is not reused."""
    return tuple(os.environ.get(name) for name in ENVIRONMENT)
