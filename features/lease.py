"""Leases on an output, and the one way its files are committed.

* **commits**: :func:`commit_file` writes a single file as a dot-file, fsyncs it and renames it into
  place (on an object store: one PUT), so a reader (or a rerun after a crash) sees the whole file or
  none of it;
* **leases** on an output (:func:`output_lease`): one writer at a time, and the record of which files it
  committed (:func:`committed_files`): a :class:`Lease` (``O_EXCL`` and ``rename``) on a POSIX file
  system, an :class:`ObjectLease` (conditional writes) on an object store.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from posterfusion.errors import UserError
from posterfusion.locations import Location

log = logging.getLogger(__name__)


def commit_file(path: str | Path | Location, write: Callable[[Path], None]) -> Path | Location:
    """Write ``path`` atomically: ``write(staging)`` into a dot-file beside it, fsync, rename.

    Readers skip dot-files, so a crash leaves either the old state or the whole new file. On an
    object store ``write`` fills a local temporary file, uploaded in one PUT (atomic there).
    """
    location = Location.parse(path)
    location.write_via(write)
    return location.local_path if location.is_local else location


def commit_text(path: str | Path | Location, text: str) -> Path | Location:
    """:func:`commit_file` for a small text file (JSON summaries, manifests)."""
    return commit_file(path, lambda staging: staging.write_text(text))


class LeaseHeld(UserError, RuntimeError):
    """Another live run holds the output's lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it looked dead: no heartbeat for ``stale_s``); it must stop writing."""


class Lease:
    """An exclusive, heartbeated lease on an output directory: ``OUT/_lease``.

    Why a lock file and not a table format with conditional commits: the outputs are plain
    Parquet folders on a local or shared POSIX file system, where ``O_EXCL`` creation and
    ``rename`` are atomic, and one writer at a time is all a nightly job needs. The holder
    touches the file every ``heartbeat_s``; a lease not touched for ``stale_s`` (or held by a
    process on this host that no longer exists) belongs to a dead run and is taken over — by
    renaming it aside first, which only one taker can do; a taker that finds it moved aside a
    *fresh* lease (another taker's, created after it looked) links it back. While it holds the
    lease, a run may delete other runs' staging files: their writers are dead.

    Fencing: a run that was only slow (a paused VM, a stalled disk) may find its lease taken
    over. Its heartbeat notices the file is no longer its own, and :meth:`check`, called before
    every commit, raises :class:`LeaseLost`, so it never writes beside the new holder.
    """

    NAME = "_lease"

    def __init__(self, out: str | Path, run_id: str, wait_s: float = 0.0, heartbeat_s: float = 5.0,
                 stale_s: float = 30.0):
        self.path = Path(out) / self.NAME
        self.run_id, self.wait_s, self.heartbeat_s, self.stale_s = run_id, wait_s, heartbeat_s, stale_s
        self._stop = None
        self.lost = False

    def __enter__(self) -> Lease:
        import time

        deadline = time.monotonic() + self.wait_s
        while not self._try_acquire():
            holder = self._holder()
            if self._stale(holder):
                self._take_over(holder)
                continue
            if time.monotonic() >= deadline:
                raise LeaseHeld(f"{self.path.parent} is being written by run {holder.get('run_id')} "
                                f"(pid {holder.get('pid')} on {holder.get('host')}); wait for it, or pass a "
                                "longer wait — a dead run's lease is taken over once it is stale")
            time.sleep(min(1.0, self.heartbeat_s))
        self._start_heartbeat()
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._holder().get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)

    def _try_acquire(self) -> bool:
        import json
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now(UTC).isoformat(timespec="seconds")}, handle)
        return True

    def _holder(self) -> dict:
        import json

        try:
            return json.loads(self.path.read_text()) | {"mtime": self.path.stat().st_mtime}
        except (FileNotFoundError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        import socket
        import time

        if not holder:
            return False  # released (or being written) just now: try again
        if time.time() - holder["mtime"] > self.stale_s:
            return True
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, TypeError):
                return False
        return False

    def _take_over(self, stale: dict) -> None:
        """Move the ``stale`` holder's lease aside; a fresh one moved aside by mistake goes back."""
        import json

        aside = self.path.with_name(f"{self.NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            self.path.rename(aside)  # one taker wins; the others find nothing to rename
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except ValueError:
            moved = {}
        if moved.get("run_id") != stale.get("run_id"):  # another taker's fresh lease: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # atomic, and never over a lease created meanwhile
        aside.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds the lease (call it before each commit)."""
        if self.lost or self._holder().get("run_id") != self.run_id:
            self.lost = True
            raise LeaseLost(f"run {self.run_id} lost its lease on {self.path.parent}: another run took it over "
                            "as stale; this run stops writing")

    def _start_heartbeat(self) -> None:
        import threading

        self._stop = threading.Event()

        def beat(stop: threading.Event) -> None:
            while not stop.wait(self.heartbeat_s):
                if self._holder().get("run_id") != self.run_id:  # taken over: never refresh another's lease
                    self.lost = True
                    return
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    self.lost = True
                    return

        threading.Thread(target=beat, args=(self._stop,), daemon=True, name="lease-heartbeat").start()

    def commit(self, path: str | Path | Location, write: Callable[[Path], None]) -> Path | Location:
        """Commit one data file under the lease: fenced by :meth:`check`, then renamed into place."""
        self.check()
        return commit_file(path, write)

    def remove_dead(self, pattern: str) -> int:
        """Delete other runs' staging dot-files beside the data files ``pattern`` (under OUT) names.

        Under the lease their writers are dead; ``run_date=*/part-*.parquet`` removes
        ``run_date=*/.part-*.parquet*``.
        """
        folder, name = os.path.split(pattern)
        removed = 0
        for staging in self.path.parent.glob(os.path.join(folder, f".{name}*")):
            if self.run_id not in staging.name:
                staging.unlink(missing_ok=True)
                removed += 1
        return removed


class OutputLease(Protocol):
    """What a job writing an output needs from its lease, whatever the output's store."""

    run_id: str

    def __enter__(self) -> OutputLease: ...

    def __exit__(self, *exc) -> None: ...

    def check(self) -> None: ...

    def commit(self, path: Location, write: Callable[[Path], None]) -> Path | Location: ...

    def remove_dead(self, pattern: str) -> int: ...


def output_lease(out: str | Path | Location, run_id: str, wait_s: float = 0.0, heartbeat_s: float = 5.0,
                 stale_s: float = 30.0) -> OutputLease:
    """The lease for ``out``: a :class:`Lease` on a local path, an :class:`ObjectLease` on an object store."""
    out = Location.parse(out)
    kind = Lease if out.is_local else ObjectLease
    return kind(out, run_id, wait_s=wait_s, heartbeat_s=heartbeat_s, stale_s=stale_s)


def committed_files(out: str | Path | Location, pattern: str) -> list[Location]:
    """The files under ``out`` matching ``pattern`` that runs committed: the only ones a reader may read.

    Local: every file in place (a rename committed it; dot-files and ``_`` folders are skipped).
    Object store: only the files named in commit records and the live lease (:class:`ObjectLease`),
    never a bare listing, where a dead or fenced run's uploads would show.
    """
    out = Location.parse(out)
    files = out.list_files() if out.is_local else ObjectLease.committed_files(out)
    return [f for f in files if fnmatch.fnmatchcase(f.relative_to(out), pattern)]


class ObjectLease:
    """An exclusive, heartbeated lease on an object-store prefix, which is also the record of what was committed.

    Why not :class:`Lease`: an object store has no ``O_EXCL`` and no rename, and pyarrow's file
    systems expose no conditional writes; S3 has them (``If-None-Match``/``If-Match``, through
    boto3, :meth:`Location.create_exclusive`), and they are all this protocol needs:

    * **take**: ``OUT/_lease`` is created with ``If-None-Match: *`` — one run wins;
    * **heartbeat**: every ``heartbeat_s`` the holder rewrites it with ``If-Match`` its last ETag; a
      failed match means it was taken over: the run is fenced (:class:`LeaseLost`) and writes no more;
    * **take over**: a lease whose heartbeat is older than ``stale_s`` (by the holder's clock, written
      in it: clocks must agree to well within ``stale_s``) or whose holder is a dead process on this
      host is replaced with ``If-Match`` its ETag — one taker wins — after the taker recorded the stale
      holder's committed files (below);
    * **commit**: the data file is PUT under a name of its own run, then the lease is rewritten
      (``If-Match``) with that name appended to its ``committed`` list. A fenced run's rewrite fails, so
      its file is an orphan: never read, deleted by a later holder (:meth:`remove_dead`);
    * **release**: the holder writes ``OUT/_commits/<run_id>.json`` (its committed list; merged with
      ``If-None-Match``/``If-Match`` should a taker have written it first), then deletes the lease
      (``If-Match``);
    * **readers** (:func:`committed_files`) read the live lease, *then* every commit record: a run
      releasing in between wrote its record before deleting its lease, so nothing committed is missed.

    What holds on other schemes (``gs://`` …, where :class:`~posterfusion.locations.Location` can only
    read, compare, write and read back): the lease is best-effort. Readers still see only committed
    files, and a dead run's uploads never show. A run that starts while another holds a live lease
    waits or stops. But two runs taking a free (or stale) lease within one round trip of each other
    may both believe they hold it, and a fenced run's commit racing a takeover within one round trip
    may still land: then rows can be scored twice (never lost). Run one writer per output there
    (one scheduled job), or write to ``s3://`` or a POSIX path.
    """

    NAME = "_lease"
    COMMITS = "_commits"

    def __init__(self, out: str | Path | Location, run_id: str, wait_s: float = 0.0, heartbeat_s: float = 5.0,
                 stale_s: float = 30.0):
        self.out = Location.parse(out)
        self.location = self.out / self.NAME
        self.run_id, self.wait_s, self.heartbeat_s, self.stale_s = run_id, wait_s, heartbeat_s, stale_s
        self.committed: list[str] = []
        self.etag: str | None = None
        self.lost = False
        self.since = datetime.now(UTC).isoformat(timespec="seconds")
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None
        self._beating: threading.Thread | None = None

    def __enter__(self) -> ObjectLease:
        deadline = time.monotonic() + self.wait_s
        while not self._try_acquire():
            current = self.location.read_versioned()
            if current is None:
                continue  # released just now: try again
            holder = _lease_body(current[0])
            if self._stale(holder):
                if self._take_over(holder, current[1]):
                    break
                continue
            if time.monotonic() >= deadline:
                raise LeaseHeld(f"{self.out} is being written by run {holder.get('run_id')} (pid {holder.get('pid')} "
                                f"on {holder.get('host')}); wait for it, or pass a longer wait — a dead run's lease "
                                "is taken over once it is stale")
            time.sleep(min(1.0, self.heartbeat_s))
        self._start_heartbeat()
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._stop.set()
            self._beating.join()
        if self.lost:
            return
        record_commits(self.out, self.run_id, self.committed)
        self.location.delete_if_match(self.etag)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if a heartbeat or a commit found the lease taken over."""
        if self.lost:
            raise LeaseLost(f"run {self.run_id} lost its lease on {self.out}: another run took it over as stale; "
                            "this run stops writing")

    def commit(self, path: Location, write: Callable[[Path], None]) -> Location:
        """PUT the data file, then name it in the lease (``If-Match``): committed only if the lease is still ours."""
        self.check()
        location = Location.parse(path)
        name = location.relative_to(self.out)
        commit_file(location, write)
        if not self._rewrite([name]):
            raise LeaseLost(f"run {self.run_id} lost its lease on {self.out} before committing {name}: another run "
                            "took it over as stale; the file is an orphan that readers ignore")
        return location

    def remove_dead(self, pattern: str) -> int:
        """Delete data files matching ``pattern`` that no run committed: uploads of dead or fenced runs."""
        committed = {str(f) for f in self.committed_files(self.out)}
        dead = [f for f in self.out.list_files() if fnmatch.fnmatchcase(f.relative_to(self.out), pattern)
                and str(f) not in committed and self.run_id not in f.name]
        for orphan in dead:
            orphan.delete()
        return len(dead)

    @classmethod
    def committed_files(cls, out: Location) -> list[Location]:
        """Files named by the live lease and by every commit record (the lease first: see the class)."""
        live = (out / cls.NAME).read_versioned()
        names = set(_lease_body(live[0]).get("committed", [])) if live else set()
        for record in (out / cls.COMMITS).list_files(suffix=".json"):
            names |= set(json.loads(record.read_text())["files"])
        return sorted(out / name for name in names)

    def _body(self, committed: list[str]) -> bytes:
        import socket

        return json.dumps({"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                           "since": self.since, "heartbeat_at": time.time(), "committed": committed}).encode()

    def _try_acquire(self) -> bool:
        etag = self.location.create_exclusive(self._body([]))
        if etag is not None:
            self.etag = etag
        return etag is not None

    def _stale(self, holder: dict) -> bool:
        import socket

        if time.time() - float(holder.get("heartbeat_at", 0)) > self.stale_s:
            return True
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, TypeError, KeyError):
                return False
        return False

    def _take_over(self, stale: dict, etag: str) -> bool:
        """Record the stale holder's commits, then replace its lease if it is still that version."""
        if stale.get("run_id"):
            record_commits(self.out, stale["run_id"], stale.get("committed", []))
        new = self.location.replace_if_match(self._body([]), etag)
        if new is None:
            return False
        log.warning("took over the stale lease of run %s on %s", stale.get("run_id"), self.out)
        self.etag = new
        return True

    def _rewrite(self, added: list[str]) -> bool:
        """Rewrite the lease (``If-Match`` its last ETag), ``added`` appended; False (and fenced) if it is not ours.

        Under the lock, so a heartbeat never writes back a committed list older than a commit's.
        """
        with self._lock:
            if self.lost:
                return False
            committed = [*self.committed, *added]
            etag = self.location.replace_if_match(self._body(committed), self.etag)
            if etag is None:
                self.lost = True
                return False
            self.etag, self.committed = etag, committed
            return True

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._beating = threading.Thread(target=self._beat, args=(self._stop,), daemon=True,
                                         name="object-lease-heartbeat")
        self._beating.start()

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                if not self._rewrite([]):
                    return
            except UserError as error:  # the store is unreachable for now: the lease may go stale, commits fence
                log.warning("lease heartbeat on %s failed: %s", self.out, error)


def record_commits(out: Location, run_id: str, files: list[str]) -> None:
    """``OUT/_commits/<run_id>.json`` names at least ``files``: created, or merged with what a taker wrote first."""
    if not files:
        return
    record = out / ObjectLease.COMMITS / f"{run_id}.json"
    while True:
        current = record.read_versioned()
        known = json.loads(current[0])["files"] if current else []
        merged = sorted(set(known) | set(files))
        if current is not None and merged == sorted(known):
            return
        body = json.dumps({"run_id": run_id, "files": merged}, indent=1).encode()
        done = record.create_exclusive(body) if current is None else record.replace_if_match(body, current[1])
        if done is not None:
            return


def _lease_body(data: bytes) -> dict:
    """A lease's JSON (``{}`` if unreadable: no heartbeat, so stale)."""
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
