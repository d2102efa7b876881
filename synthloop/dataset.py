"""The one place datasets touch disk: Parquet shards, one row per image, written atomically.

A dataset is a directory of `part-NNNNN.parquet` shards. Writers stream rows in bounded
batches into a temporary directory beside the target and rename it into place on success,
so a killed process leaves the previous version intact.

- A write that fails part-way (a full disk, an I/O error) removes its temporary, leaves the
  previous version as it was, and says so: the error carries a note naming the output.
- A process killed between moving the previous version aside and moving the new one in
  leaves no output but `.<name>.old-<pid>`: `remove_stale_temporaries`, which every stage
  calls before it writes, puts that previous version back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# The columns every image dataset carries (docs/data.md, "Where every output lands").
IMAGE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("parent_id", pa.string()),
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int8()),
        ("path", pa.string()),
    ]
)

# Ingested rows are raw file bytes: not yet decoded, so no size or split yet.
INGESTED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("image", pa.binary()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("label", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def file_hash(path: Path, digest_size: int = 16, algorithm: str = "blake2b") -> str:
    """A file's hex digest, read in 1 MiB blocks (weights files can be large): blake2b for
    our own ids, "md5" to compare with DVC's records."""
    digest = (
        hashlib.blake2b(digest_size=digest_size)
        if algorithm == "blake2b"
        else hashlib.new(algorithm)
    )
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_id(data: bytes) -> str:
    """A row's stable id: the hash of its image bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _kept_previous(target, err)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        _kept_previous(target, err)
        raise
    if target.exists():  # a replaced file keeps its permissions (mkstemp makes 0600)
        os.chmod(tmp, target.stat().st_mode & 0o7777)
    os.replace(tmp, target)


def _kept_previous(target: Path, err: BaseException) -> None:
    """Say, on the error itself, which output was not replaced and that the previous one
    stands (the error may be a reader's, e.g. a missing input, so it is not re-typed)."""
    if isinstance(err, Exception):
        previous = "previous version left as it was" if target.exists() else "no previous version"
        err.add_note(f"{target}: the new version was not written; {previous}")
        log.error("%s: not written (%s: %s); %s", target, type(err).__name__, err, previous)


def write_json(target: Path, payload: dict[str, Any]) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def remove_stale_temporaries(target: Path) -> None:
    """Drop temporaries a killed run left beside `target`; put back the previous version of
    `target` when a run was killed between moving it aside and moving its new one in."""
    target = Path(target)
    if target.parent.is_dir():
        moved_aside = sorted(target.parent.glob(f".{target.name}.old-*"))
        if moved_aside and not target.exists():
            os.replace(moved_aside[-1], target)
            log.warning("%s: restored the previous version a killed run had moved aside", target)
        for stale in target.parent.glob(f".{target.name}.*-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


class ShardWriter:
    """Buffers rows and writes one Parquet shard per `shard_rows` rows into `directory`."""

    def __init__(self, directory: Path, schema: pa.Schema, shard_rows: int = 8192) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.shard_rows = shard_rows
        self._columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._batches: list[pa.RecordBatch] = []  # rows given as Arrow, before _columns'
        self._buffered = 0
        self.shards = 0
        self.rows = 0

    def append(self, row: dict[str, Any]) -> None:
        for name, values in self._columns.items():
            values.append(row.get(name))
        self._buffered += 1
        if self._buffered >= self.shard_rows:
            self.flush()

    def extend(self, columns: dict[str, list[Any]], rows: int) -> None:
        """Append `rows` rows given column by column (a column not given is null): the same
        shards as `append` once per row, without a dict per row."""
        start = 0
        while start < rows:
            take = min(rows - start, self.shard_rows - self._buffered)
            for name, values in self._columns.items():
                given = columns.get(name)
                values.extend(given[start : start + take] if given is not None else [None] * take)
            self._buffered += take
            start += take
            if self._buffered >= self.shard_rows:
                self.flush()

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Append the rows of an Arrow record batch of `schema`: the same shards as `append`
        once per row, without a round trip through Python objects."""
        self._move_columns_to_batches()  # rows appended before this batch stay first
        start = 0
        while start < batch.num_rows:
            take = min(batch.num_rows - start, self.shard_rows - self._buffered)
            self._batches.append(batch.slice(start, take))
            self._buffered += take
            start += take
            if self._buffered >= self.shard_rows:
                self.flush()

    def _move_columns_to_batches(self) -> None:
        if any(self._columns.values()):
            self._batches.append(pa.record_batch(self._columns, schema=self.schema))
            self._columns = {name: [] for name in self.schema.names}

    def flush(self) -> None:
        if not self._buffered:
            return
        if self._batches:
            self._move_columns_to_batches()
            # One chunk per column, as pa.table(lists) gives: the same pages, the same bytes.
            table = pa.Table.from_batches(self._batches, schema=self.schema).combine_chunks()
        else:
            table = pa.table(self._columns, schema=self.schema)
        pq.write_table(table, self.directory / f"part-{self.shards:05d}.parquet")
        self.shards += 1
        self.rows += self._buffered
        self._columns = {name: [] for name in self.schema.names}
        self._batches = []
        self._buffered = 0

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()


def write_table(target: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """Write a small table (a quarantine list, a summary) as one Parquet file, atomically."""
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_file(target) as tmp:
        pq.write_table(table, tmp)


def shard_paths(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such dataset (run the stage that makes it)")
    return sorted(directory.glob("part-*.parquet"))


def iter_batches(
    directory: Path, columns: list[str] | None = None, batch_rows: int = 4096
) -> Iterator[pa.RecordBatch]:
    """Stream a dataset's rows in bounded batches, shard by shard, in a stable order."""
    for path in shard_paths(directory):
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)


def read_columns(directory: Path, columns: list[str]) -> pa.Table:
    """Read only the named (small) columns of a whole dataset."""
    paths = shard_paths(directory)
    if not paths:
        return pa.schema([]).empty_table()
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in paths)
