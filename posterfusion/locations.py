"""Where data lives: a local path or a URI, told apart by the text alone.

A :class:`Location` is ``/data/catalogue``, ``runs/out`` or ``s3://bucket/prefix``, ``gs://…``, or
anything else :func:`pyarrow.fs.FileSystem.from_uri` resolves. Every stage reads and writes through
it, so no stage has to tell a path from a URI, and an ``s3://`` argument can never be read as a local
folder ``s3:/bucket/…`` (a text that starts ``scheme:/`` is always a URI, even after ``pathlib``
collapsed its ``//``).

What each kind of store gives, and what the operations here rely on:

* **writes are atomic**: locally a dot-file beside the target, fsynced and renamed into place;
  on an object store one PUT (single or multipart) appears whole or not at all;
* **directories are published whole** (:meth:`Location.publish_dir`): locally staged in a dot-folder
  and renamed; on an object store every file is PUT first and the manifest ``_PUBLISHED`` last, and
  :meth:`Location.download_dir` refuses a prefix without it and copies only the files it lists;
* **conditional writes** (:meth:`~Location.create_exclusive`, :meth:`~Location.replace_if_match`,
  :meth:`~Location.delete_if_match`), what a lease needs. Locally: compare-and-rename under ``flock``
  on a hidden ``.<name>.lock`` beside the file; an ETag is ``inode-mtime-size`` of the version read
  (each write is a new file, renamed into place). On S3: ``PutObject`` with ``If-None-Match: *`` or
  ``If-Match: <etag>`` and ``DeleteObject`` with ``If-Match`` through boto3 — pyarrow's file systems
  expose no conditional writes — atomic on S3 itself. Any other scheme (``gs://``, …): **best
  effort** — read, compare, write, read back: a conflict is noticed unless two writers race within
  one round trip, in which case both may "win" (GCS has generation preconditions, but not through
  pyarrow).

Credentials and endpoints come only from each store's standard environment (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``, ``AWS_REGION``, and
``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, which pyarrow and boto3 both read). A user's mistake —
an unknown scheme, a missing bucket, nothing where something was expected, wrong credentials, an
unreachable endpoint — is a :class:`~posterfusion.errors.UserError` whose one line names the location.

pyarrow's file systems and boto3 are imported lazily, on first use of a location that needs them;
importing this module does no work.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from posterfusion.errors import UserError, UserFileNotFound, UserValueError

PUBLISHED = "_PUBLISHED"  # the manifest a published directory ends with
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/+(.*)$")  # two letters at least: never a Windows drive


class LocationError(UserError, OSError):
    """A location that cannot be used as it is: missing bucket, no access, unreachable, unknown scheme."""


class Location:
    """A local path or a URI; ``str()`` gives it back as given (a URI with its ``//``)."""

    __slots__ = ("_fs", "_path", "_scheme", "_text")

    def __init__(self, where: str | os.PathLike | Location):
        if isinstance(where, Location):
            self._scheme, self._text, self._path, self._fs = where._scheme, where._text, where._path, where._fs
            return
        text = os.fspath(where)
        match = _URI.match(text.replace("\\", "/")) if isinstance(text, str) else None
        self._fs = None
        if match and match.group(1).lower() == "file":
            self._scheme, self._path = "", Path("/" + match.group(2))
            self._text = str(self._path)
        elif match:
            self._scheme, self._path = match.group(1).lower(), None
            self._text = f"{self._scheme}://{match.group(2).rstrip('/')}"
        else:
            self._scheme, self._path, self._text = "", Path(text), str(Path(text))

    @classmethod
    def parse(cls, where: str | os.PathLike | Location) -> Location:
        """``where`` as a Location (itself when it already is one)."""
        return where if isinstance(where, cls) else cls(where)

    # ------------------------------------------------------------------ the value

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"Location({self._text!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and self._text == other._text

    def __lt__(self, other: Location) -> bool:
        return self._text < other._text

    def __hash__(self) -> int:
        return hash(self._text)

    def __fspath__(self) -> str:
        """Only a local location is a path: ``open(s3_location)`` fails instead of writing a local ``s3:`` folder."""
        if self._path is None:
            raise TypeError(f"{self} is not a local path")
        return str(self._path)

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        """Pydantic configs take a ``str``/``Path`` and hold a Location; JSON gives the text back."""
        from pydantic_core import core_schema

        def validate(value) -> Location:
            if not isinstance(value, (str, os.PathLike)):
                raise ValueError("expected a local path or a URI such as s3://bucket/prefix")  # pydantic reports it
            return cls.parse(value)

        return core_schema.no_info_plain_validator_function(
            validate, json_schema_input_schema=core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(str))

    @property
    def scheme(self) -> str:
        """``""`` for a local path, else the URI's scheme (``s3``, ``gs``, …)."""
        return self._scheme

    @property
    def is_local(self) -> bool:
        return self._path is not None

    @property
    def local_path(self) -> Path:
        if self._path is None:
            raise TypeError(f"{self} is not a local path")
        return self._path

    @property
    def bucket(self) -> str:
        """The URI's authority (an object store's bucket)."""
        return self._rest.split("/", 1)[0] if not self.is_local else ""

    @property
    def key(self) -> str:
        """The object key under the bucket (``""`` for the bucket itself)."""
        return self._rest.split("/", 1)[1] if "/" in self._rest else ""

    @property
    def _rest(self) -> str:
        return self._text.split("://", 1)[1]

    @property
    def name(self) -> str:
        return self._path.name if self.is_local else self._rest.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        if self.is_local:
            return Location(self._path.parent)
        if "/" not in self._rest:
            return self
        return Location(f"{self._scheme}://{self._rest.rsplit('/', 1)[0]}")

    def join(self, *parts: str) -> Location:
        """A child: ``loc.join("a", "b/c")`` is ``loc / "a" / "b" / "c"``."""
        names = [p for part in parts for p in str(part).replace("\\", "/").split("/") if p]
        child = Location(self._path.joinpath(*names) if self.is_local else "/".join([self._text, *names]))
        if self._fs is not None:  # a child shares its parent's resolved file system
            child._fs = (self._fs[0], "/".join([self._fs[1].rstrip("/"), *names]))
        return child

    __truediv__ = join

    def relative_to(self, base: Location | str | os.PathLike) -> str:
        """This location's name below ``base``, with ``/`` separators."""
        base_text = str(Location.parse(base)).rstrip("/")
        if not self._text.startswith(base_text + "/"):
            raise ValueError(f"{self} is not under {base_text}")
        return self._text[len(base_text) + 1:].replace("\\", "/")

    # ------------------------------------------------------------------ pyarrow

    @property
    def filesystem(self):
        """The pyarrow file system holding this location (for pyarrow and Ray Data's ``filesystem=``)."""
        return self._resolved()[0]

    @property
    def fs_path(self) -> str:
        """This location's path within :attr:`filesystem`."""
        return self._resolved()[1]

    def _resolved(self):
        if self._fs is None:
            import pyarrow.fs as pafs

            if self.is_local:
                self._fs = (pafs.LocalFileSystem(), os.path.abspath(self._path))
            elif self._scheme in _BUCKET_SCHEMES:
                with self._errors("opening"):
                    self._fs = (_bucket_filesystem(self._scheme, self.bucket, _environment()), self._rest)
            else:
                with self._errors("opening"):
                    self._fs = pafs.FileSystem.from_uri(self._text)
        return self._fs

    # ------------------------------------------------------------------ reading

    def exists(self) -> bool:
        return self._type() != "missing"

    def is_dir(self) -> bool:
        return self._type() == "dir"

    def is_file(self) -> bool:
        return self._type() == "file"

    def _type(self) -> str:
        if self.is_local:
            return "dir" if self._path.is_dir() else "file" if self._path.exists() else "missing"
        import pyarrow.fs as pafs

        with self._errors("looking up"):
            kind = self.filesystem.get_file_info(self.fs_path).type
        return {pafs.FileType.Directory: "dir", pafs.FileType.File: "file"}.get(kind, "missing")

    def read_bytes(self) -> bytes:
        if self.is_local:
            with self._errors("reading"):
                return self._path.read_bytes()
        with self._errors("reading"), self.filesystem.open_input_stream(self.fs_path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def list_files(self, suffix: str = "", recursive: bool = True) -> list[Location]:
        """Files below this location ending in ``suffix``, sorted; ``_``/``.`` names (staging, markers) skipped.

        A location that does not exist lists nothing: callers say what they expected.
        """
        if self.is_local:
            if not self._path.is_dir():
                return []
            found = self._path.rglob("*") if recursive else self._path.iterdir()
            names = [p.relative_to(self._path).as_posix() for p in found if p.is_file()]
        else:
            import pyarrow.fs as pafs

            base = self.fs_path.rstrip("/")
            with self._errors("listing"):
                infos = self.filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True,
                                                                        recursive=recursive))
            names = [info.path[len(base) + 1:] for info in infos if info.type == pafs.FileType.File]
        return sorted(self / name for name in names if name.endswith(suffix) and not _hidden(name))

    def download_dir(self, dest: str | os.PathLike) -> Path:
        """A published directory (see :meth:`publish_dir`) into the local folder ``dest``.

        A local source is copied as it is (a rename published it); an object-store prefix must hold
        the ``_PUBLISHED`` manifest, and exactly the files it lists are copied.
        """
        dest = Path(dest)
        if self.is_local:
            if not self._path.is_dir():
                raise UserFileNotFound(f"{self}: no such directory")
            shutil.copytree(self._path, dest, dirs_exist_ok=True)
            return dest
        manifest = self / PUBLISHED
        if not manifest.is_file():
            what = "a publish is in progress or failed" if self.is_dir() else "nothing is there"
            raise UserFileNotFound(f"{self}: not a published directory (no {PUBLISHED} marker; {what})")
        for name in json.loads(manifest.read_text())["files"]:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((self / name).read_bytes())
        return dest

    # ------------------------------------------------------------------ writing

    def write_bytes(self, data: bytes) -> None:
        """Atomic: a reader sees the old content or all of ``data``."""
        if self.is_local:
            with self._errors("writing"), self._staged(data) as staging:
                staging.replace(self._path)
            return
        with self._errors("writing"), self._output_stream() as stream:
            stream.write(data)  # one write: nothing can raise between opening and completing the upload

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def upload_file(self, source: str | os.PathLike) -> None:
        """A local file to this location, atomically (local: copy beside, fsync, rename; else one PUT)."""
        if self.is_local:
            with self._errors("writing"), self._staged(b"") as staging:
                shutil.copyfile(source, staging)
                _fsync(staging)
                staging.replace(self._path)
            return
        with self._errors("writing"), open(source, "rb") as handle, self._output_stream() as stream:
            shutil.copyfileobj(handle, stream, 8 << 20)

    def _output_stream(self):
        """pyarrow's stream to this object; a file system with real directories gets the parents first."""
        if self._scheme not in _OBJECT_STORES:  # on an object store a directory would be an extra marker object
            self.filesystem.create_dir(self.parent.fs_path, recursive=True)
        return self.filesystem.open_output_stream(self.fs_path)

    def publish_dir(self, source: str | os.PathLike) -> None:
        """The local directory ``source`` to this location, such that no reader ever sees half of it.

        Local: copied into a dot-folder beside, then renamed into place (an older version is moved
        aside first, then deleted). Object store: every file PUT, then the manifest ``_PUBLISHED``
        (the list of files) last; :meth:`download_dir` requires it. Republishing over an older
        version replaces the manifest last, so a reader gets the old files or the new ones.
        """
        source = Path(source)
        files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        manifest = json.dumps({"files": [f for f in files if f != PUBLISHED]}, indent=1)
        if self.is_local:
            self._publish_local(source, manifest)
            return
        for name in files:
            if name != PUBLISHED:
                (self / name).upload_file(source / name)
        (self / PUBLISHED).write_text(manifest)

    def _publish_local(self, source: Path, manifest: str) -> None:
        token = uuid.uuid4().hex[:8]
        staging = self._path.with_name(f".{self._path.name}.{token}")
        aside = self._path.with_name(f".{self._path.name}.old-{token}")
        with self._errors("publishing"):
            try:
                shutil.copytree(source, staging)
                (staging / PUBLISHED).write_text(manifest)
                with contextlib.suppress(FileNotFoundError):
                    self._path.rename(aside)
                staging.rename(self._path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                shutil.rmtree(aside, ignore_errors=True)

    def delete(self) -> None:
        """Remove this file, or this directory/prefix and everything below; nothing there is fine."""
        if self.is_local:
            with self._errors("deleting"):
                if self._path.is_dir():
                    shutil.rmtree(self._path)
                else:
                    self._path.unlink(missing_ok=True)
            return
        kind = self._type()
        with self._errors("deleting"):
            if kind == "file":
                self.filesystem.delete_file(self.fs_path)
            elif kind == "dir":
                self.filesystem.delete_dir(self.fs_path)

    # ------------------------------------------------------------------ conditional writes

    def read_versioned(self) -> tuple[bytes, str] | None:
        """(content, ETag) of this file, or None when it does not exist: what a conditional write compares to."""
        if self.is_local:
            try:
                with open(self._path, "rb") as handle:
                    return handle.read(), _local_etag(os.fstat(handle.fileno()))
            except FileNotFoundError:
                return None
        if self._scheme == "s3":
            return _S3(self).read()
        data = self.read_bytes() if self.is_file() else None
        return None if data is None else (data, _digest(data))

    def create_exclusive(self, data: bytes) -> str | None:
        """Create this file holding ``data`` unless it exists: its ETag, or None when it already existed."""
        if self.is_local:
            return self._create_local(data)
        if self._scheme == "s3":
            return _S3(self).put(data, IfNoneMatch="*")
        if self.exists():
            return None
        self.write_bytes(data)
        return self._read_back(data)

    def replace_if_match(self, data: bytes, etag: str) -> str | None:
        """Overwrite this file with ``data`` if it is still the version ``etag``: the new ETag, or None."""
        if self.is_local:
            return self._replace_local(data, etag)
        if self._scheme == "s3":
            return _S3(self).put(data, IfMatch=etag)
        current = self.read_versioned()
        if current is None or current[1] != etag:
            return None
        self.write_bytes(data)
        return self._read_back(data)

    def delete_if_match(self, etag: str) -> bool:
        """Delete this file if it is still the version ``etag``; whether it was deleted."""
        if self.is_local:
            return self._delete_local(etag)
        if self._scheme == "s3":
            return _S3(self).delete(etag)
        current = self.read_versioned()
        if current is None or current[1] != etag:
            return False
        self.delete()
        return True

    def _read_back(self, data: bytes) -> str | None:
        """Best effort (schemes without conditional writes): ours if what is there now is what we wrote."""
        current = self.read_versioned()
        return current[1] if current is not None and current[0] == data else None

    def _create_local(self, data: bytes) -> str | None:
        with self._errors("writing"), self._staged(data) as staging, self._exclusive():
            try:
                os.link(staging, self._path)  # never over an existing file: O_EXCL with the content already in
            except FileExistsError:
                return None
            return _local_etag(staging.stat())

    def _replace_local(self, data: bytes, etag: str) -> str | None:
        with self._errors("writing"), self._staged(data) as staging, self._exclusive():
            if self._local_version() != etag:
                return None
            new = _local_etag(staging.stat())
            staging.replace(self._path)  # atomic: readers see the old version or the new one, never nothing
            return new

    def _delete_local(self, etag: str) -> bool:
        with self._errors("deleting"), self._exclusive():
            if self._local_version() != etag:
                return False
            self._path.unlink()
            return True

    def _local_version(self) -> str | None:
        try:
            return _local_etag(self._path.stat())
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One conditional write at a time on this file: ``flock`` on a hidden ``.<name>.lock`` beside it.

        Why a lock and not rename-aside (the :class:`~posterfusion.features.store.Lease` takeover): a
        rewrite by rename-aside leaves a moment with no file, in which a :meth:`create_exclusive` would
        wrongly succeed. ``flock`` excludes other processes and other threads alike (each call opens its
        own descriptor); on NFS, Linux maps it to NFS byte-range locks.
        """
        import fcntl

        descriptor = os.open(self._path.with_name(f".{self._path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    @contextlib.contextmanager
    def _staged(self, data: bytes) -> Iterator[Path]:
        """A fsynced dot-file beside this local path holding ``data``, removed afterwards unless renamed."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        staging = self._path.with_name(f".{self._path.name}.{uuid.uuid4().hex[:8]}")
        try:
            with open(staging, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            yield staging
        finally:
            staging.unlink(missing_ok=True)

    # ------------------------------------------------------------------ errors

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """pyarrow's and botocore's errors for things a user can fix → one line naming this location."""
        try:
            yield
        except UserError:
            raise
        except Exception as exc:
            explained = explain(self, exc, doing)
            if explained is None:
                raise
            if isinstance(explained, FileNotFoundError) and not self.is_local and not self._bucket_exists():
                explained = LocationError(f"{self}: the bucket '{self.bucket}' does not exist")
            raise explained from None

    def _bucket_exists(self) -> bool:
        """Whether this URI's bucket is there (pyarrow reports a read from a missing bucket as a missing file)."""
        try:
            return Location(f"{self._scheme}://{self.bucket}").exists()
        except UserError:
            return False


def explain(location: Location, exc: BaseException, doing: str) -> UserError | None:
    """The :class:`UserError` a storage exception means for ``location``, or None for a bug."""
    code, status = _error_code(exc)
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


def _error_code(exc: BaseException) -> tuple[str, int | None]:
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


_BUCKET_SCHEMES = ("s3", "gs", "gcs")  # pyarrow's path there is ``bucket/key``
_OBJECT_STORES = ("s3", "gs", "gcs", "abfs", "abfss", "az")  # no directories: a key is written as it is
_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")


def _environment() -> tuple:
    """The standard variables a store client reads: a client made under other values is not reused."""
    return tuple(os.environ.get(name) for name in _ENVIRONMENT)


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str, environment: tuple):
    """One pyarrow file system per bucket and environment (resolving one asks the store for the bucket's region)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def _hidden(name: str) -> bool:
    return any(part.startswith(("_", ".")) for part in name.split("/"))


def _local_etag(stat: os.stat_result) -> str:
    """Every local write makes a new file (staged, then renamed or linked), so inode + mtime + size name a version."""
    return f"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{stat.st_size:x}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class _S3:
    """S3's conditional requests through boto3, for one object (pyarrow exposes none)."""

    _clients: ClassVar[dict] = {}
    _lock = threading.Lock()

    def __init__(self, location: Location):
        self.location, self.bucket, self.key = location, location.bucket, location.key

    def read(self) -> tuple[bytes, str] | None:
        with self._conditional("reading"):
            answer = self.client().get_object(Bucket=self.bucket, Key=self.key)
            return answer["Body"].read(), answer["ETag"]
        return None

    def put(self, data: bytes, **condition) -> str | None:
        with self._conditional("writing"):
            return self.client().put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        return None

    def delete(self, etag: str) -> bool:
        with self._conditional("deleting"):
            self.client().delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
            return True
        return False

    @contextlib.contextmanager
    def _conditional(self, doing: str) -> Iterator[None]:
        """A failed precondition (412), a concurrent conditional write (409) or a missing key end the block quietly."""
        try:
            yield
        except Exception as exc:
            code, status = _error_code(exc)
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
                return
            explained = explain(self.location, exc, doing)
            if explained is None:
                raise
            raise explained from None

    @classmethod
    def client(cls):
        """One boto3 client per process and S3 environment (clients are thread-safe; creating one is not)."""
        settings = _environment()
        with cls._lock:
            if settings not in cls._clients:
                import boto3

                cls._clients[settings] = boto3.session.Session().client("s3")
            return cls._clients[settings]
