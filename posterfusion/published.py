"""Directories published whole, and local copies of remote files: the part of a location readers trust.

* :meth:`~Publishing.publish_dir` sends a local folder so no reader ever sees half of it: locally staged
  in a dot-folder and renamed; on an object store every file PUT, then the manifest ``_PUBLISHED``
  (each file's name and sha256) last. :meth:`~Publishing.mark_published` does the last step for files
  a writer already put there (Ray Data's ``write_parquet``).
* :meth:`~Publishing.published_files` is what readers read: on an object store exactly the files the
  manifest lists, and a prefix without one is refused (a publish in progress or failed).
* :meth:`~Publishing.cached_dir` / :meth:`~Publishing.cached_file`: a bundle or a weights file as a local
  path, downloaded once under ``$POSTERFUSION_HOME/cache`` (keyed by the URI, and a directory's manifest).

:class:`Publishing` is a mixin of :class:`~posterfusion.locations.Location`; it relies on the location's
listing, reads and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from posterfusion.errors import UserFileNotFound

PUBLISHED = "_PUBLISHED"  # the manifest a published directory ends with


class Publishing:
    """Publishing a directory whole, reading only what was published, and local copies."""

    __slots__ = ()

    def published_files(self) -> list:  # of Locations (this module cannot import the class it is mixed into)
        """The files of a directory published whole (:meth:`publish_dir`, :meth:`mark_published`).

        Local: every file below (a rename published it). Object store: exactly the files its
        ``_PUBLISHED`` manifest lists; without the manifest nothing is published there, and the
        error says whether something half-written or nothing at all is there.
        """
        if self.is_local:
            if not self.local_path.is_dir():
                raise UserFileNotFound(f"{self}: no such directory")
            return self.list_files()
        return [self / name for name in json.loads(self._manifest())["files"]]

    def _manifest(self) -> bytes:
        try:
            return (self / PUBLISHED).read_bytes()
        except UserFileNotFound:
            what = "a publish is in progress or failed" if self.is_dir() else "nothing is there"
            raise UserFileNotFound(f"{self}: not a published directory (no {PUBLISHED} marker; {what})") from None

    def download_dir(self, dest: str | os.PathLike) -> Path:
        """A published directory (see :meth:`publish_dir`) into the local folder ``dest``.

        A local source is copied as it is (a rename published it); an object-store prefix must hold
        the ``_PUBLISHED`` manifest, and exactly the files it lists are copied.
        """
        dest = Path(dest)
        digests = {} if self.is_local else json.loads(self._manifest()).get("sha256", {})
        for source in self.published_files():
            name = source.relative_to(self)
            data = source.read_bytes()
            if name in digests and hashlib.sha256(data).hexdigest() != digests[name]:
                raise UserFileNotFound(f"{source}: not the file its {PUBLISHED} manifest names (republished "
                                       "while being read?); read it again")
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return dest

    def cached_dir(self) -> Path:
        """This published directory as a local folder: itself when local, else a copy downloaded once.

        The copy lives under ``$POSTERFUSION_HOME/cache``, keyed by the URI and the manifest's bytes
        (which hold every file's sha256): a version republished under the same URI is another copy,
        and every process on a machine (Ray actors, Serve replicas) shares one download.
        """
        if self.is_local:
            if not self.local_path.is_dir():
                raise UserFileNotFound(f"{self}: no such directory")
            return self.local_path
        key = hashlib.sha256(str(self).encode() + b"\0" + self._manifest()).hexdigest()[:24]
        return _cached(cache_root() / "dirs" / key, self.download_dir)

    def cached_file(self) -> Path:
        """This file as a local path: itself when local, else a copy downloaded once, keyed by the URI.

        For immutable files named by version (weights): a file replaced under the same URI is not
        fetched again.
        """
        if self.is_local:
            return self.local_path
        key = hashlib.sha256(str(self).encode()).hexdigest()[:24]
        return _cached(cache_root() / "files" / key, lambda staging: (staging / self.name).write_bytes(
            self.read_bytes())) / self.name

    def publish_dir(self, source: str | os.PathLike) -> None:
        """The local directory ``source`` to this location, such that no reader ever sees half of it.

        Local: copied into a dot-folder beside, then renamed into place (an older version is moved
        aside first, then deleted). Object store: every file PUT, then the manifest ``_PUBLISHED``
        (each file's name and sha256) last; :meth:`download_dir` requires it. Republishing over an older
        version replaces the manifest last, so a reader gets the old files or the new ones.
        """
        source = Path(source)
        files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        files = [f for f in files if f != PUBLISHED]
        manifest = _manifest_text(files, {f: _file_sha256(source / f) for f in files})
        if self.is_local:
            self._publish_local(source, manifest)
            return
        for name in files:
            (self / name).upload_file(source / name)
        (self / PUBLISHED).write_text(manifest)

    def mark_published(self, files: list) -> None:
        """Publish files already written below this location (by Ray Data, say): the manifest, last.

        Until it is written, :meth:`published_files` refuses the prefix, so a reader never takes a
        half-written output for a whole one.
        """
        (self / PUBLISHED).write_text(_manifest_text([f.relative_to(self) for f in files]))

    def _publish_local(self, source: Path, manifest: str) -> None:
        token = uuid.uuid4().hex[:8]
        staging = self.local_path.with_name(f".{self.local_path.name}.{token}")
        aside = self.local_path.with_name(f".{self.local_path.name}.old-{token}")
        with self._errors("publishing"):
            try:
                shutil.copytree(source, staging)
                (staging / PUBLISHED).write_text(manifest)
                with contextlib.suppress(FileNotFoundError):
                    self.local_path.rename(aside)
                staging.rename(self.local_path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                shutil.rmtree(aside, ignore_errors=True)


def _manifest_text(files: list[str], sha256: dict[str, str] | None = None) -> str:
    return json.dumps({"files": files} | ({"sha256": sha256} if sha256 else {}), indent=1)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def cache_root() -> Path:
    """Where local copies of remote files are kept: ``$POSTERFUSION_HOME/cache`` (machine-local state)."""
    home = os.environ.get("POSTERFUSION_HOME") or os.path.join(
        os.environ.get("POSTERFUSION_REAL_HOME") or os.path.expanduser("~"), ".cache", "posterfusion")
    return Path(home) / "cache"


def _cached(target: Path, fill) -> Path:
    """``target``, filled once by ``fill(staging)`` into a folder beside it and renamed into place.

    Processes racing to fill it each stage their own copy; the first rename wins, the others drop theirs.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        staging.mkdir()
        fill(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
