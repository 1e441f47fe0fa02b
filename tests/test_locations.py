"""A location is a local path or a URI, and behaves the same on both; leases on an object store.

Every storage test runs twice: on a temporary directory and on a bucket of a real S3 API (moto's
server on 127.0.0.1, the session's ``s3_endpoint``). The lease tests drive the object-store
protocol (:class:`~posterfusion.features.lease.ObjectLease`) on both too: locally through the same
conditional writes (``link``, rename-aside), on S3 through ``If-None-Match``/``If-Match``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, ValidationError

from posterfusion.errors import UserError, UserFileNotFound
from posterfusion.features.lease import (
    Lease,
    LeaseHeld,
    LeaseLost,
    ObjectLease,
    committed_files,
    output_lease,
    record_commits,
)
from posterfusion.locations import Location

from s3server import credentials_checked, new_bucket


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    """An empty place to write: a temporary directory, or a prefix in a fresh bucket."""
    if request.param == "local":
        return Location(tmp_path / "root")
    request.getfixturevalue("s3_endpoint")
    return Location(f"s3://{new_bucket()}/root")


@pytest.fixture
def bucket(s3_endpoint) -> str:
    return new_bucket()


# ---------------------------------------------------------------------------- parsing


def test_the_text_alone_says_path_or_uri_and_str_gives_it_back():
    assert str(Location("s3://bkt/pre/fix")) == "s3://bkt/pre/fix" and not Location("s3://bkt/x").is_local
    assert str(Location("s3://bkt/pre/")) == "s3://bkt/pre"
    assert Location("gs://bkt/x").scheme == "gs"
    assert Location("runs/out").is_local and str(Location("runs/out")) == "runs/out"
    assert Location(Path("/tmp/x")).local_path == Path("/tmp/x")
    assert Location("file:///tmp/x").local_path == Path("/tmp/x")
    loc = Location("s3://bkt/pre")
    assert Location(loc) == loc and Location.parse(loc) is loc and hash(Location("s3://bkt/pre")) == hash(loc)


def test_an_s3_uri_is_never_read_as_a_local_path(tmp_path, monkeypatch, s3_endpoint):
    """``pathlib`` turns ``s3://b/cat`` into ``s3:/b/cat``; a Location reads both as the URI, and is no path."""
    bucket = new_bucket()
    monkeypatch.chdir(tmp_path)
    for given in (f"s3://{bucket}/cat", Path(f"s3://{bucket}/cat"), f"s3:/{bucket}/cat"):
        loc = Location(given)
        assert str(loc) == f"s3://{bucket}/cat" and not loc.is_local
        (loc / "data.txt").write_text("remote")
    with pytest.raises(TypeError, match="not a local path"):
        open(Location(f"s3://{bucket}/cat/data.txt"), "w")  # noqa: SIM115
    with pytest.raises(TypeError):
        Path(Location(f"s3://{bucket}/cat"))
    with pytest.raises(TypeError):
        _ = Location(f"s3://{bucket}/cat").local_path
    assert list(tmp_path.iterdir()) == []  # no local "s3:" folder
    assert Location(f"s3://{bucket}/cat/data.txt").read_text() == "remote"


def test_children_names_and_parents():
    loc = Location("s3://bkt/a")
    assert str(loc / "b" / "c.txt") == "s3://bkt/a/b/c.txt" == str(loc.join("b", "c.txt")) == str(loc / "b/c.txt")
    assert (loc / "b").name == "b" and (loc / "b").parent == loc and Location("s3://bkt").parent == Location("s3://bkt")
    assert (loc / "b" / "c").relative_to(loc) == "b/c"
    assert (loc / "b").bucket == "bkt" and (loc / "b").key == "a/b"
    local = Location("/data/out")
    assert str(local / "x" / "y") == "/data/out/x/y" and (local / "x").parent == local and local.name == "out"


def test_a_config_holds_a_location_and_writes_its_text_back():
    class Config(BaseModel):
        out: Location

    config = Config(out="s3://bkt/pre")
    assert config.out == Location("s3://bkt/pre") and json.loads(config.model_dump_json()) == {"out": "s3://bkt/pre"}
    assert Config(out=Path("/tmp/p")).out.is_local
    with pytest.raises(ValidationError, match="local path or a URI"):
        Config(out=3)


def test_pyarrow_gets_the_file_system_and_path(root):
    table = pa.table({"a": [1, 2]})
    (root / "t.parquet").write_bytes(_parquet_bytes(table))
    child = root / "t.parquet"
    assert pq.read_table(child.fs_path, filesystem=child.filesystem).equals(table)
    if not root.is_local:
        assert child.fs_path == f"{root.bucket}/root/t.parquet"


# ---------------------------------------------------------------------------- reading and writing


def test_write_read_list_and_delete(root):
    assert not root.exists() and root.list_files() == []
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.parquet").write_bytes(b"b")
    (root / "sub" / "deeper" / "c.parquet").write_bytes(b"c")
    (root / "_hidden" / "d.parquet").write_bytes(b"d")
    (root / ".staging.parquet").write_bytes(b"e")
    assert root.exists() and root.is_dir() and (root / "a.txt").is_file() and not (root / "a.txt").is_dir()
    assert (root / "a.txt").read_text() == "a" and (root / "sub" / "b.parquet").read_bytes() == b"b"
    assert [f.relative_to(root) for f in root.list_files()] == ["a.txt", "sub/b.parquet", "sub/deeper/c.parquet"]
    assert [f.relative_to(root) for f in root.list_files(".parquet")] == ["sub/b.parquet", "sub/deeper/c.parquet"]
    assert [f.name for f in (root / "sub").list_files(recursive=False)] == ["b.parquet"]
    (root / "a.txt").write_text("again")  # an overwrite is whole too
    assert (root / "a.txt").read_text() == "again"
    (root / "a.txt").delete()
    (root / "sub").delete()
    (root / "nothing").delete()  # nothing there is fine
    assert [f.relative_to(root) for f in root.list_files()] == []
    assert not (root / "sub").exists()


def test_a_local_write_leaves_no_staging_file_behind(tmp_path):
    loc = Location(tmp_path / "x" / "f.json")
    for n in range(3):
        loc.write_text(str(n))
    assert loc.read_text() == "2" and [p.name for p in (tmp_path / "x").iterdir()] == ["f.json"]


def test_a_published_directory_is_read_whole_or_not_at_all(root, tmp_path):
    source = tmp_path / "bundle"
    (source / "weights").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "weights" / "model.safetensors").write_bytes(b"w" * 1000)
    target = root / "bundle"
    target.publish_dir(source)
    copy = target.download_dir(tmp_path / "copy")
    assert (copy / "config.json").read_text() == "{}"
    assert (copy / "weights" / "model.safetensors").read_bytes() == b"w" * 1000
    (source / "config.json").unlink()
    (source / "new.json").write_text("[]")
    target.publish_dir(source)  # a republish: readers get the files of the new manifest only
    again = target.download_dir(tmp_path / "again")
    assert sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file() and p.name[0] != "_") \
        == ["new.json", "weights/model.safetensors"]


def test_an_unfinished_publish_on_an_object_store_is_refused(bucket, tmp_path):
    half = Location(f"s3://{bucket}/bundle")
    (half / "config.json").write_text("{}")  # the files went up, the marker never did
    with pytest.raises(UserFileNotFound, match=r"s3://.*/bundle: not a published directory \(no _PUBLISHED marker; "
                                               r"a publish is in progress or failed\)"):
        half.download_dir(tmp_path / "copy")
    with pytest.raises(UserFileNotFound, match="nothing is there"):
        Location(f"s3://{bucket}/empty").download_dir(tmp_path / "copy")


# ---------------------------------------------------------------------------- conditional writes


def test_conditional_writes_compare_versions(root):
    lease = root / "_lease"
    assert lease.read_versioned() is None and lease.replace_if_match(b"x", "nope") is None
    first = lease.create_exclusive(b"one")
    assert first and lease.create_exclusive(b"two") is None and lease.read_versioned() == (b"one", first)
    assert lease.replace_if_match(b"two", "not-the-etag") is None
    second = lease.replace_if_match(b"two", first)
    assert second and second != first and lease.read_text() == "two"
    assert lease.replace_if_match(b"three", first) is None  # an old version no longer matches
    assert not lease.delete_if_match(first) and lease.exists()
    assert lease.delete_if_match(second) and not lease.exists() and not lease.delete_if_match(second)


def test_other_schemes_get_best_effort_conditional_writes(monkeypatch):
    """pyarrow's in-memory file system stands in for ``gs://`` and the like: read, compare, write, read back."""
    import uuid

    from posterfusion import locations

    monkeypatch.setattr(locations, "_BUCKET_SCHEMES", (*locations._BUCKET_SCHEMES, "mock"))  # one per bucket
    root = Location(f"mock://bkt-{uuid.uuid4().hex[:8]}/root")
    test_conditional_writes_compare_versions(root)
    with _lease(root, "first"), pytest.raises(LeaseHeld):
        _lease(root, "second").__enter__()
    with _lease(root, "second") as second:
        second.commit(root / "run_date=2026-01-01" / "part-second-00000.parquet", _part(_keys("m1")))
    assert [f.name for f in ObjectLease.committed_files(root)] == ["part-second-00000.parquet"]


def test_one_of_many_concurrent_creators_wins(root):
    target, wins = root / "_lease", []
    barrier = threading.Barrier(6)

    def create(n: int) -> None:
        barrier.wait()
        if target.create_exclusive(f"run {n}".encode()):
            wins.append(n)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1 and target.read_text() == f"run {wins[0]}"


# ---------------------------------------------------------------------------- errors a user can fix


def _one_line(error: Exception, *parts: str) -> str:
    text = str(error)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


def test_an_unknown_scheme_is_one_clear_line():
    with pytest.raises(UserError) as error:
        Location("nosuchfs://bkt/x").read_text()
    _one_line(error.value, "nosuchfs://bkt/x", "no file system handles the scheme 'nosuchfs://'")


def test_a_missing_bucket_and_a_missing_file_are_named(s3_endpoint, bucket):
    missing = Location("s3://no-such-bucket-here/pre")
    for action in (lambda: (missing / "f").read_text(), lambda: (missing / "f").write_text("x"),
                   lambda: (missing / "_lease").create_exclusive(b"x")):
        with pytest.raises(UserError) as error:
            action()
        _one_line(error.value, "s3://no-such-bucket-here/pre/", "the bucket 'no-such-bucket-here' does not exist")
    with pytest.raises(UserFileNotFound) as error:
        Location(f"s3://{bucket}/nothing.json").read_text()
    _one_line(error.value, f"s3://{bucket}/nothing.json: nothing there")


def test_wrong_credentials_are_one_clear_line(s3_endpoint, bucket):
    loc = Location(f"s3://{bucket}/f.txt")
    loc.write_text("x")
    with credentials_checked(s3_endpoint):  # the dummy keys are no user the server knows now
        for action in (loc.read_text, loc.exists, lambda: loc.create_exclusive(b"y"), lambda: loc.write_text("z")):
            with pytest.raises(UserError) as error:
                action()
            _one_line(error.value, f"s3://{bucket}/f.txt", "access denied", "AWS_ACCESS_KEY_ID")


def test_an_unreachable_endpoint_is_one_clear_line(s3_endpoint, monkeypatch):
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    loc = Location("s3://some-bucket/f.txt")
    for action in (loc.read_versioned, loc.exists):  # boto3, then pyarrow (which retries for a few seconds)
        with pytest.raises(UserError) as error:
            action()
        _one_line(error.value, "s3://some-bucket/f.txt", f"cannot reach the endpoint http://127.0.0.1:{port}")


# ---------------------------------------------------------------------------- leases on an object store


def _lease(out: Location, run_id: str, **kwargs) -> ObjectLease:
    return ObjectLease(out, run_id, **{"heartbeat_s": 0.05, "stale_s": 1.0, **kwargs})


def _part(table: pa.Table):
    return lambda staging: pq.write_table(table, staging)


def _keys(*movies: str) -> pa.Table:
    n = len(movies)
    return pa.table({"movie_id": list(movies), "poster_sha256": ["h"] * n, "model_version": ["v"] * n})


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_the_output_decides_the_lease():
    assert isinstance(output_lease("/tmp/out", "r"), Lease)
    assert isinstance(output_lease("s3://bkt/out", "r"), ObjectLease)
    assert isinstance(output_lease("gs://bkt/out", "r"), ObjectLease)  # best effort there (see its docstring)


def test_a_second_run_is_refused_while_the_first_lives_and_gets_it_after(root):
    with _lease(root, "first") as first:
        time.sleep(1.3)  # longer than stale_s: only the heartbeat keeps it fresh
        with pytest.raises(LeaseHeld, match=f"{root} is being written by run first"):
            _lease(root, "second", wait_s=0.3).__enter__()
        first.check()
    assert not (root / "_lease").exists()
    with _lease(root, "second") as second:
        assert json.loads((root / "_lease").read_text())["run_id"] == "second" and not second.lost


def test_a_waiting_run_gets_the_lease_when_the_holder_releases(root):
    holder = _lease(root, "first").__enter__()
    threading.Timer(0.3, holder.__exit__).start()
    with _lease(root, "second", wait_s=10) as second:
        assert second.etag


def test_a_stale_lease_is_taken_over_and_its_holder_is_fenced(root):
    zombie = _lease(root, "zombie").__enter__()
    zombie.commit(root / "run_date=2026-01-01" / "part-zombie-00000.parquet", _part(_keys("m1")))
    zombie._stop.set()  # its process stalls: no more heartbeats
    time.sleep(1.2)
    with _lease(root, "taker") as taker:
        with pytest.raises(LeaseLost, match="run zombie lost its lease"):
            zombie.commit(root / "run_date=2026-01-01" / "part-zombie-00001.parquet", _part(_keys("m2")))
        with pytest.raises(LeaseLost):
            zombie.check()
        # its first file was committed (the taker recorded it); the second is an orphan, never read
        names = [f.relative_to(root) for f in ObjectLease.committed_files(root)]
        assert names == ["run_date=2026-01-01/part-zombie-00000.parquet"]
        assert (root / "run_date=2026-01-01" / "part-zombie-00001.parquet").exists()
        assert taker.remove_dead("run_date=*/part-*.parquet") == 1
        assert not (root / "run_date=2026-01-01" / "part-zombie-00001.parquet").exists()
    zombie.__exit__(None, None, None)  # a fenced run's exit changes nothing
    assert json.loads((root / "_commits" / "zombie.json").read_text())["files"] == \
        ["run_date=2026-01-01/part-zombie-00000.parquet"]
    assert not (root / "_lease").exists() and not (root / "_commits" / "taker.json").exists()  # nothing committed


def test_only_one_of_two_takers_of_a_stale_lease_wins(root):
    dead = _lease(root, "dead").__enter__()
    dead._stop.set()
    time.sleep(1.2)
    stale = (root / "_lease").read_versioned()
    holder = json.loads(stale[0])
    first, second = _lease(root, "first"), _lease(root, "second")
    assert first._take_over(holder, stale[1]) and not second._take_over(holder, stale[1])
    assert json.loads((root / "_lease").read_text())["run_id"] == "first"


def test_readers_see_committed_files_only_live_and_after_release(bucket):
    """On an object store readers never list: a file no commit record names is not there for them."""
    from posterfusion.models.predictions import prediction_files, read_predictions, scored_keys

    root = Location(f"s3://{bucket}/predictions")
    folder = root / "run_date=2026-01-02"
    (folder / "part-dead-00000.parquet").write_bytes(_parquet_bytes(_keys("orphan")))  # a dead run's upload
    with _lease(root, "run") as lease:
        lease.commit(folder / "part-run-00000.parquet", _part(_keys("m1", "m2")))
        assert sorted(k.split("\x1f")[0] for k in scored_keys(root).to_pylist()) == ["m1", "m2"]  # the live lease
        lease.commit(folder / "part-run-00001.parquet", _part(_keys("m3")))
    assert json.loads((root / "_commits" / "run.json").read_text())["files"] == [
        "run_date=2026-01-02/part-run-00000.parquet", "run_date=2026-01-02/part-run-00001.parquet"]
    assert [f.rsplit("/", 1)[1] for f in prediction_files(root)] == ["part-run-00000.parquet", "part-run-00001.parquet"]
    assert committed_files(root, "run_date=*/*.parquet") == [Location(f) for f in prediction_files(root)]
    stored = read_predictions(root)
    assert sorted(stored["movie_id"]) == ["m1", "m2", "m3"] and set(stored["run_date"]) == {"2026-01-02"}
    assert sorted(k.split("\x1f")[0] for k in scored_keys(root).to_pylist()) == ["m1", "m2", "m3"]


def test_commit_records_merge_what_a_taker_and_the_holder_wrote(root):
    record_commits(root, "run", ["a.parquet"])
    record_commits(root, "run", ["a.parquet", "b.parquet"])
    record_commits(root, "run", ["a.parquet"])
    record_commits(root, "empty", [])
    assert json.loads((root / "_commits" / "run.json").read_text())["files"] == ["a.parquet", "b.parquet"]
    assert [f.name for f in (root / "_commits").list_files()] == ["run.json"]


def test_a_lease_left_by_a_dead_process_on_this_host_is_taken_over_at_once(root):
    body = {"run_id": "killed", "pid": 2**22 + 11, "host": socket.gethostname(), "heartbeat_at": time.time(),
            "committed": ["run_date=2026-01-01/part-killed-00000.parquet"]}
    (root / "_lease").write_text(json.dumps(body))
    with ObjectLease(root, "next", stale_s=300) as lease:
        assert lease.etag
    assert json.loads((root / "_commits" / "killed.json").read_text())["files"] == body["committed"]


def test_the_environment_points_only_at_loopback(s3_endpoint):
    assert s3_endpoint.startswith("http://127.0.0.1:") and os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true" and "AWS_PROFILE" not in os.environ
