"""Where data lives: a local path or a URI, told apart by the text alone.

A :class:`Location` is ``/data/catalogue``, ``runs/out`` or ``s3://bucket/prefix``, ``gs://…``, or
anything else :func:`pyarrow.fs.FileSystem.from_uri` resolves. Every stage reads and writes through
it, so no stage has to tell a path from a URI, and an ``s3://`` argument can never be read as a local
folder ``s3:/bucket/…`` (a text that starts ``scheme:/`` is always a URI, even after ``pathlib``
collapsed its ``//``).

What each kind of store gives, and what the operations here rely on:

* **writes are atomic**: locally a dot-file beside the target, fsynced and renamed into place;
  on an object store one PUT (single or multipart) appears whole or not at all;
* **directories are published whole** (:meth:`Location.publish_dir`, :meth:`Location.mark_published`):
  locally staged in a dot-folder and renamed; on an object store every file is PUT first and the
  manifest ``_PUBLISHED`` last, and readers (:meth:`Location.published_files`) refuse a prefix without
  it and read only the files it lists (:mod:`posterfusion.published`);
* **conditional writes** (:meth:`~Location.create_exclusive`, :meth:`~Location.replace_if_match`,
  :meth:`~Location.delete_if_match`), what a lease needs: atomic locally and on S3, best effort on other
  schemes (:mod:`posterfusion.conditional` says how);
* **a local copy** of something immutable (:meth:`Location.cached_file`, :meth:`Location.cached_dir`):
  downloaded once under ``$POSTERFUSION_HOME/cache``, keyed by the URI (and a directory's manifest), so
  code that needs a file — weights, a model bundle — opens a local one;
* **Parquet for pyarrow and Ray Data** (:class:`ParquetFiles`): a file system and paths within it.

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
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from posterfusion.conditional import ConditionalWrites
from posterfusion.errors import UserError
from posterfusion.published import PUBLISHED, Publishing
from posterfusion.stores import LocationError, environment, explain

__all__ = ["PUBLISHED", "Location", "LocationError", "ParquetFiles", "explain"]

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/+(.*)$")  # two letters at least: never a Windows drive


class Location(Publishing, ConditionalWrites):
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

    def absolute(self) -> Location:
        """A local path made absolute (what another process in another directory can use); a URI as it is."""
        return Location(self._path.resolve()) if self.is_local else self

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
                    self._fs = (_bucket_filesystem(self._scheme, self.bucket, environment()), self._rest)
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

    def write_via(self, write) -> None:
        """Whatever ``write(path)`` writes into a local file, here atomically (a library that wants a path).

        Local: a fsynced dot-file beside (keeping the suffix, which some writers read the format
        from), renamed into place (readers skip dot-files). Elsewhere: a temporary local file, uploaded
        in one PUT.
        """
        if self.is_local:
            staging = self._path.with_name(f".{self._path.stem}.{uuid.uuid4().hex[:8]}{self._path.suffix}")
            try:
                with self._errors("writing"):
                    self._path.parent.mkdir(parents=True, exist_ok=True)
                    write(staging)
                    _fsync(staging)
                    staging.replace(self._path)
            finally:
                staging.unlink(missing_ok=True)
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="posterfusion-upload-") as folder:
            staging = Path(folder) / self.name
            write(staging)
            self.upload_file(staging)

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

    def check_store(self) -> None:
        """Refuse, before any work, a store this location cannot be used on: an unknown scheme, a missing
        bucket, wrong credentials, an unreachable endpoint (a local path always passes).

        Reads alone would not tell: pyarrow reports a missing bucket as a missing file.
        """
        if self.is_local:
            return
        if self._scheme in _BUCKET_SCHEMES:
            import pyarrow.fs as pafs

            with self._errors("looking up its bucket"):
                kind = self.filesystem.get_file_info(self.bucket).type
            if kind == pafs.FileType.NotFound:
                raise LocationError(f"{self}: the bucket '{self.bucket}' does not exist")
        self.exists()  # the scheme, the credentials and the endpoint, for the location itself

    def _bucket_exists(self) -> bool:
        """Whether this URI's bucket is there (pyarrow reports a read from a missing bucket as a missing file)."""
        try:
            return Location(f"{self._scheme}://{self.bucket}").exists()
        except UserError:
            return False


_BUCKET_SCHEMES = ("s3", "gs", "gcs")  # pyarrow's path there is ``bucket/key``
_OBJECT_STORES = ("s3", "gs", "gcs", "abfs", "abfss", "az")  # no directories: a key is written as it is
@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str, environment: tuple):
    """One pyarrow file system per bucket and environment (resolving one asks the store for the bucket's region)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def _hidden(name: str) -> bool:
    return any(part.startswith(("_", ".")) for part in name.split("/"))


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class ParquetFiles:
    """Parquet files of one store as pyarrow and Ray Data take them: a file system and paths within it.

    ``pads.dataset(files.paths, filesystem=files.filesystem)``, ``ray.data.read_parquet(files.paths,
    filesystem=files.filesystem)``: the same call for a local folder and a bucket.
    """

    __slots__ = ("filesystem", "locations", "paths")

    def __init__(self, locations: list[Location]):
        self.locations = list(locations)
        self.filesystem = self.locations[0].filesystem if self.locations else None
        self.paths = [f.fs_path for f in self.locations]

    def __len__(self) -> int:
        return len(self.paths)

    def dataset(self, **options):
        """A pyarrow dataset of the files (``options``: ``schema``, ``partitioning``, …)."""
        import pyarrow.dataset as pads

        return pads.dataset(self.paths, filesystem=self.filesystem, format="parquet", **options)

    def read(self, columns: list[str] | None = None, filter=None):
        """Their rows as one Arrow table."""
        return self.dataset().to_table(columns=columns, filter=filter)
