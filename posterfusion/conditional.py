"""Conditional writes on any location: what a lease needs (create if absent, replace or delete if unchanged).

* **locally**: compare-and-rename under ``flock`` on a hidden ``.<name>.lock`` beside the file; an
  ETag is ``inode-mtime-size`` of the version read (each write is a new file, renamed into place);
* **on S3**: ``PutObject`` with ``If-None-Match: *`` or ``If-Match: <etag>`` and ``DeleteObject`` with
  ``If-Match`` through boto3 — pyarrow's file systems expose no conditional writes — atomic on S3 itself;
* **any other scheme** (``gs://``, …): best effort — read, compare, write, read back: a conflict is
  noticed unless two writers race within one round trip, in which case both may "win".

:class:`ConditionalWrites` is a mixin of :class:`~posterfusion.locations.Location`, kept apart so the
location module stays about reading, writing and publishing; it relies on the location's
``is_local``, ``scheme``, ``bucket``, ``key``, plain reads and writes, and its ``_staged``/``_errors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from typing import ClassVar

from posterfusion.stores import environment, error_code, explain


class ConditionalWrites:
    """Create-exclusive, replace-if-match and delete-if-match on the location this is mixed into."""

    __slots__ = ()

    def read_versioned(self) -> tuple[bytes, str] | None:
        """(content, ETag) of this file, or None when it does not exist: what a conditional write compares to."""
        if self.is_local:
            try:
                with open(self.local_path, "rb") as handle:
                    return handle.read(), local_etag(os.fstat(handle.fileno()))
            except FileNotFoundError:
                return None
        if self.scheme == "s3":
            return S3(self).read()
        data = self.read_bytes() if self.is_file() else None
        return None if data is None else (data, digest(data))

    def create_exclusive(self, data: bytes) -> str | None:
        """Create this file holding ``data`` unless it exists: its ETag, or None when it already existed."""
        if self.is_local:
            return self._create_local(data)
        if self.scheme == "s3":
            return S3(self).put(data, IfNoneMatch="*")
        if self.exists():
            return None
        self.write_bytes(data)
        return self._read_back(data)

    def replace_if_match(self, data: bytes, etag: str) -> str | None:
        """Overwrite this file with ``data`` if it is still the version ``etag``: the new ETag, or None."""
        if self.is_local:
            return self._replace_local(data, etag)
        if self.scheme == "s3":
            return S3(self).put(data, IfMatch=etag)
        current = self.read_versioned()
        if current is None or current[1] != etag:
            return None
        self.write_bytes(data)
        return self._read_back(data)

    def delete_if_match(self, etag: str) -> bool:
        """Delete this file if it is still the version ``etag``; whether it was deleted."""
        if self.is_local:
            return self._delete_local(etag)
        if self.scheme == "s3":
            return S3(self).delete(etag)
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
                os.link(staging, self.local_path)  # never over an existing file: O_EXCL with the content already in
            except FileExistsError:
                return None
            return local_etag(staging.stat())

    def _replace_local(self, data: bytes, etag: str) -> str | None:
        with self._errors("writing"), self._staged(data) as staging, self._exclusive():
            if self._local_version() != etag:
                return None
            new = local_etag(staging.stat())
            staging.replace(self.local_path)  # atomic: readers see the old version or the new one, never nothing
            return new

    def _delete_local(self, etag: str) -> bool:
        with self._errors("deleting"), self._exclusive():
            if self._local_version() != etag:
                return False
            self.local_path.unlink()
            return True

    def _local_version(self) -> str | None:
        try:
            return local_etag(self.local_path.stat())
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One conditional write at a time on this file: ``flock`` on a hidden ``.<name>.lock`` beside it.

        Why a lock and not rename-aside (the :class:`~posterfusion.features.lease.Lease` takeover): a
        rewrite by rename-aside leaves a moment with no file, in which a :meth:`create_exclusive` would
        wrongly succeed. ``flock`` excludes other processes and other threads alike (each call opens its
        own descriptor); on NFS, Linux maps it to NFS byte-range locks.
        """
        import fcntl

        lock = self.local_path.with_name(f".{self.local_path.name}.lock")
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock


def local_etag(stat: os.stat_result) -> str:
    """Every local write makes a new file (staged, then renamed or linked), so inode + mtime + size name a version."""
    return f"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{stat.st_size:x}"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class S3:
    """S3's conditional requests through boto3, for one object (pyarrow exposes none)."""

    _clients: ClassVar[dict] = {}
    _lock = threading.Lock()

    def __init__(self, location):
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
            code, status = error_code(exc)
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
                return
            explained = explain(self.location, exc, doing)
            if explained is None:
                raise
            raise explained from None

    @classmethod
    def client(cls):
        """One boto3 client per process and S3 environment (clients are thread-safe; creating one is not)."""
        settings = environment()
        with cls._lock:
            if settings not in cls._clients:
                import boto3

                cls._clients[settings] = boto3.session.Session().client("s3")
            return cls._clients[settings]
