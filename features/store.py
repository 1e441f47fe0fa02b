"""Incremental per-poster stores: keys, planning, and runs that are only ever added.

Several stages keep one row per catalogue poster and must compute only what is missing:
object features (per detector), backbone features (per backbone, weights and image size),
predictions (per model version). They share:

* **keys**: rows are joined on a few string columns (``movie_id``, ``poster_sha256``, …)
  folded into one string per row (:func:`join_keys`), because pyarrow's ``is_in`` takes one
  column; :func:`plan_missing` says which catalogue rows lack a key and in which files they are;
* **runs**: a :class:`FeatureStore` only ever *adds* a run, published whole (locally written under a
  ``_`` name and renamed into place; on an object store its files, then its ``_PUBLISHED`` marker), so
  readers never see half a run and a rerun of a finished catalogue computes nothing.

Committing single files and leases on an output are :mod:`posterfusion.features.lease`.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from posterfusion.errors import UserFileNotFound
from posterfusion.locations import Location, ParquetFiles

KEY_SEPARATOR = "\x1f"  # cannot occur in an IMDb id, a hex digest or a model version


def join_keys(table: pa.Table, columns: Sequence[str], suffix: str | None = None) -> pa.Array:
    """One string per row joining ``columns`` (and a constant ``suffix``, e.g. a model version)."""
    parts = [table[c] for c in columns]
    if suffix is not None:
        parts.append(pa.array([suffix] * table.num_rows, pa.string()))
    keys = pc.binary_join_element_wise(*parts, KEY_SEPARATOR)
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


def keep_keys(batch: pa.Table, keys: pa.Array, columns: Sequence[str], suffix: str | None = None) -> pa.Table:
    """Ray Data map: only the rows whose key is in ``keys``."""
    return batch.filter(pc.is_in(join_keys(batch, columns, suffix), value_set=keys))


def split_key(key: str) -> tuple[str, ...]:
    return tuple(key.split(KEY_SEPARATOR))


def plan_missing(files: ParquetFiles, present: pa.Array, columns: Sequence[str],
                 suffix: str | None = None) -> tuple[ParquetFiles, pa.Array, int]:
    """(files holding missing rows, the missing keys, all rows) of a catalogue against ``present`` keys.

    Reads only the key columns of each file.
    """
    import pyarrow.parquet as pq

    wanted = [join_keys(pq.read_table(f, columns=list(columns), filesystem=files.filesystem), columns, suffix)
              for f in files.paths]
    missing = [keys.filter(pc.invert(pc.is_in(keys, value_set=present))) for keys in wanted]
    todo_files = [f for f, keys in zip(files.locations, missing, strict=True) if len(keys)]
    todo = pc.unique(pa.concat_arrays(missing)) if missing else pa.array([], pa.string())
    return ParquetFiles(todo_files), todo, sum(len(keys) for keys in wanted)


class FeatureStore:
    """``ROOT/<name>/run-*/…parquet``: one row per key, runs only ever added; ``ROOT`` a path or a URI.

    A row may carry an error column (``error_column``): such rows are kept as a record of
    what failed, but do not count as present, so the next run computes them again.
    """

    def __init__(self, root: str | Path | Location, name: str, schema: pa.Schema, key_columns: Sequence[str],
                 error_column: str | None = None):
        self.root, self.name, self.schema = Location.parse(root), name, schema
        self.key_columns, self.error_column = list(key_columns), error_column

    @property
    def folder(self) -> Location:
        return self.root / self.name

    def files(self) -> list[str]:
        """Files of complete runs, as paths in :attr:`folder`'s file system.

        Locally every file of a run folder (a rename published it; ``_``/``.`` folders are runs in
        progress); on an object store the files a run's ``_PUBLISHED`` marker lists, and a run
        without one (in progress, or its writer died) is skipped.
        """
        return ParquetFiles(self._published()).paths

    def _published(self) -> list[Location]:
        found = self.folder.list_files(".parquet")
        if self.folder.is_local:
            return found
        runs = sorted({f.relative_to(self.folder).split("/", 1)[0] for f in found})
        return [f for run in runs for f in self._run_files(self.folder / run)]

    @staticmethod
    def _run_files(run: Location) -> list[Location]:
        try:
            return [f for f in run.published_files() if f.name.endswith(".parquet")]
        except UserFileNotFound:
            return []

    def read(self, columns: list[str] | None = None, filter=None) -> pa.Table:
        """Every stored row, oldest run first (error rows and stale keys too)."""
        files = ParquetFiles(self._published())
        if not len(files):
            return self.schema.empty_table().select(columns or self.schema.names)
        return files.dataset(schema=self.schema).to_table(columns=columns, filter=filter)

    def present_keys(self) -> pa.Array:
        """Keys with a good row: what a run need not compute again."""
        columns = self.key_columns + ([self.error_column] if self.error_column else [])
        table = self.read(columns)
        if self.error_column:
            table = table.filter(pc.is_null(table[self.error_column]))
        return join_keys(table, self.key_columns)

    def latest(self, columns: list[str] | None = None, include_errors: bool = False):
        """One row per key (the newest run wins), as a pandas frame indexed by the key columns.

        Error rows are left out unless ``include_errors``, whether or not ``columns`` names the error column.
        """
        extra = [self.error_column] if columns and self.error_column and self.error_column not in columns else []
        frame = self.read(columns and [*columns, *extra]).to_pandas()
        if self.error_column and not include_errors:
            frame = frame[frame[self.error_column].isna()]
        frame = frame.drop(columns=extra).drop_duplicates(self.key_columns, keep="last")
        return frame.set_index(self.key_columns).sort_index()

    def write_run(self, write: Callable[[Location], None]) -> Location:
        """``write(where)`` fills a new run, published whole; the run's location.

        Locally ``where`` is a hidden ``_run-…`` folder renamed into place once complete; on an object
        store it is the run's own prefix, and its ``_PUBLISHED`` marker is written once ``write``
        returned (a run that fails leaves no marker, and its uploads are deleted).
        """
        name = f"run-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        final = self.folder / name
        if not final.is_local:
            try:
                write(final)
            except BaseException:
                final.delete()
                raise
            final.mark_published(final.list_files(".parquet"))
            return final
        staging = self.folder.local_path / f"_{name}"
        try:
            write(Location(staging))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        staging.mkdir(parents=True, exist_ok=True)  # a run that wrote no file still leaves its folder
        staging.rename(final.local_path)
        return final
