"""Ingest: read every configured source into Parquet shards of raw bytes, unchanged.

Nothing is decoded here (clean does that once); files that cannot even be read go to the
ingest quarantine with their reason. A source that is empty or has a single class stops
the stage: there is nothing to learn a class-conditional model from.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from synthloop.config import (
    DemoSource,
    ImageFolderSource,
    IngestConfig,
    ManifestSource,
    TorchvisionSource,
    source_name,
)
from synthloop.dataset import (
    INGESTED_SCHEMA,
    QUARANTINE_SCHEMA,
    ShardWriter,
    atomic_dir,
    content_id,
    remove_stale_temporaries,
    write_json,
    write_table,
)
from synthloop.sharding import Shard, StageSpec, cached_result, digest, run_uncached
from tasks.ingest.demo import read_demo
from tasks.ingest.sources import (
    FileRef,
    Record,
    Rejected,
    SourceError,
    list_image_folder,
    list_manifest,
    read_image_folder,
    read_manifest,
    read_ref,
    read_torchvision,
    torchvision_count,
)

log = logging.getLogger(__name__)


def read_source(source: object) -> Iterator[Record]:
    """Every record of one configured source, whatever its kind."""
    readers = {
        ImageFolderSource: read_image_folder,
        # Read on its own, a manifest may reach its own folder only.
        ManifestSource: lambda s: read_manifest(s, [s.path.resolve().parent]),
        TorchvisionSource: read_torchvision,
        DemoSource: read_demo,
    }
    return readers[type(source)](source)


@dataclass
class SourceSummary:
    items: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    per_class: Counter[str] = field(default_factory=Counter)


def run_ingest(cfg: IngestConfig) -> dict:
    """Read all sources into `cfg.output`; returns the summary also written to `cfg.report`."""
    return run_uncached(SHARDING, cfg)


# --- plan -> shard -> merge (synthloop/sharding.py) ------------------------------------------


@dataclass(frozen=True)
class Generated:
    """Items `start` to `stop` of a source that makes its items (torchvision, demo)."""

    start: int
    stop: int


@dataclass(frozen=True)
class FileRun:
    """Consecutive listed files of one folder and label, as a planned shard keeps them: their
    names in one string, NUL-separated (no file name holds a NUL), a dozen bytes a file
    where a FileRef takes about 260."""

    directory: str
    label: str
    names: str

    def refs(self) -> Iterator[FileRef]:
        prefix = os.path.join(self.directory, "")  # os.path.join(directory, name) = prefix + name
        for name in self.names.split("\0"):
            yield FileRef(prefix + name, self.label)


Entry = tuple[int, FileRef | FileRun | Rejected | Generated]  # (source index, what to read)


def list_entries(cfg: IngestConfig) -> Iterator[Entry]:
    """Every source's entries in reading order, without reading any file."""
    for index, source in enumerate(cfg.sources):
        if isinstance(source, ImageFolderSource):
            yield from ((index, entry) for entry in list_image_folder(source))
        elif isinstance(source, ManifestSource):
            yield from ((index, entry) for entry in list_manifest(source, cfg.allowed_roots))
        else:
            yield index, Generated(0, _generated_count(source))


def chunk_entries(entries: Iterable[Entry], size: int) -> Iterator[list[Entry]]:
    """Consecutive chunks of `size` entries; a generated range counts as its length and is
    split at chunk boundaries."""
    chunk: list[Entry] = []
    room = size
    for index, entry in entries:
        start, stop = (entry.start, entry.stop) if isinstance(entry, Generated) else (0, 1)
        while start < stop:
            take = min(room, stop - start)
            part = Generated(start, start + take) if isinstance(entry, Generated) else entry
            chunk.append((index, part))
            start, room = start + take, room - take
            if room == 0:
                yield chunk
                chunk, room = [], size
    if chunk:
        yield chunk


def plan_ingest(cfg: IngestConfig) -> list[Shard]:
    """Shards of `cfg.shard_rows` entries of the listing of all sources. The listing is
    walked once, a shard's entries at a time, and each shard keeps its files as `FileRun`s
    (`compact`): the plan's memory is a few bytes per file, not the listing's objects."""
    roots: dict[int, str] = {}  # a torchvision root's digest, once per source
    planned = []
    for work in chunk_entries(list_entries(cfg), cfg.shard_rows):
        stats = [_entry_stat(cfg, index, entry, roots) for index, entry in work]
        compacted = compact(work)  # the same entries: digested faster than a FileRef each
        planned.append((digest(compacted, stats), compacted))
    return [
        Shard("ingest", number, len(planned), fingerprint, work)
        for number, (fingerprint, work) in enumerate(planned)
    ]


def compact(work: list[Entry]) -> tuple[Entry, ...]:
    """The entries, in order, with each run of FileRefs that share a source, a folder and a
    label made one `FileRun` (which gives back the same paths); other entries as they are."""
    out: list[Entry] = []
    run: tuple[int, str, str] | None = None  # (source index, folder, label) of `names`
    names: list[str] = []

    def close() -> None:
        if run is not None:
            out.append((run[0], FileRun(run[1], run[2], "\0".join(names))))
            names.clear()

    prefix = ""  # os.path.join(run's folder, "")
    for index, entry in work:
        if isinstance(entry, FileRef):
            path = entry.path
            if run is not None and run[0] == index and run[2] == entry.label:
                name = path[len(prefix) :]
                if path.startswith(prefix) and name and "/" not in name and "\0" not in name:
                    names.append(name)  # the fast path: the run's folder again
                    continue
            directory, name = os.path.split(path)
            if name and "\0" not in name and os.path.join(directory, name) == path:
                close()
                run, prefix = (index, directory, entry.label), os.path.join(directory, "")
                names.append(name)
                continue
        close()
        run = None
        out.append((index, entry))
    close()
    return tuple(out)


def run_ingest_shard(cfg: IngestConfig, shard: Shard, out: Path) -> dict:
    """Read one shard's entries: its rows to `rows.parquet`, its rejects to
    `quarantine.parquet`; returns its per-source counts."""
    summaries: dict[int, SourceSummary] = {}
    quarantine: list[dict] = []
    block: dict[str, list] = {name: [] for name in INGESTED_SCHEMA.names}
    with pq.ParquetWriter(out / "rows.parquet", INGESTED_SCHEMA) as writer:
        for index, record in _read_entries(cfg, shard.work):
            name = source_name(cfg.sources[index], index)
            summary = summaries.setdefault(index, SourceSummary())
            if isinstance(record, Rejected):
                summary.quarantined[record.reason] += 1
                quarantine.append(_quarantine_row(name, record))
                continue
            summary.items += 1
            summary.per_class[record.label] += 1
            for column, value in zip(
                ("id", "label", "source", "path", "image"),
                (content_id(record.data), record.label, name, record.path, record.data),
                strict=True,
            ):
                block[column].append(value)
            if len(block["id"]) >= _BLOCK_ROWS:
                _flush(writer, block)
        _flush(writer, block)
    write_table(out / "quarantine.parquet", quarantine, QUARANTINE_SCHEMA)
    return {
        "sources": {
            str(i): {"items": s.items, "quarantined": s.quarantined, "per_class": s.per_class}
            for i, s in summaries.items()
        }
    }


def merge_ingest(cfg: IngestConfig, folders: list[Path]) -> dict:
    """The shards, in order, into `cfg.output`, the quarantine and the report: the same
    Parquet shards (by `cfg.shard_rows`) whatever the ingest shards were."""
    summaries = {i: SourceSummary() for i in range(len(cfg.sources))}
    for folder in folders:
        for index, part in (cached_result(folder) or {})["sources"].items():
            summary = summaries[int(index)]
            summary.items += part["items"]
            summary.quarantined.update(part["quarantined"])
            summary.per_class.update(part["per_class"])
    names = {i: source_name(source, i) for i, source in enumerate(cfg.sources)}
    for index, source in enumerate(cfg.sources):
        _check_usable(names[index], source, summaries[index])

    remove_stale_temporaries(cfg.output)
    with atomic_dir(cfg.output) as tmp, ShardWriter(tmp, INGESTED_SCHEMA, cfg.shard_rows) as out:
        for folder in folders:
            rows = pq.ParquetFile(folder / "rows.parquet")
            for batch in rows.iter_batches(batch_size=_BLOCK_ROWS):
                out.extend(batch.to_pydict(), batch.num_rows)
    quarantine = [r for f in folders for r in pq.read_table(f / "quarantine.parquet").to_pylist()]
    write_table(cfg.quarantine, quarantine, QUARANTINE_SCHEMA)

    result = {
        "ingested": sum(s.items for s in summaries.values()),
        "quarantined": sum(sum(s.quarantined.values()) for s in summaries.values()),
        "sources": {
            names[i]: {
                "items": s.items,
                "classes": len(s.per_class),
                "quarantined": dict(sorted(s.quarantined.items())),
            }
            for i, s in summaries.items()
        },
    }
    write_json(cfg.report, result)
    log.info(
        "ingest: %d items from %d source(s), %d quarantined -> %s",
        result["ingested"],
        len(summaries),
        result["quarantined"],
        cfg.output,
    )
    return result


def _generated_count(source: object) -> int:
    if isinstance(source, TorchvisionSource):
        return torchvision_count(source)
    return sum(1 for _ in read_source(source))  # the demo: cheap to make twice


def _read_entries(cfg: IngestConfig, work: Iterable[Entry]) -> Iterator[tuple[int, Record]]:
    for index, entry in work:
        if isinstance(entry, FileRef):
            yield index, read_ref(entry)
        elif isinstance(entry, FileRun):
            yield from ((index, read_ref(ref)) for ref in entry.refs())
        elif isinstance(entry, Rejected):
            yield index, entry
        else:
            source = cfg.sources[index]
            if isinstance(source, TorchvisionSource):
                records = read_torchvision(source, entry.start, entry.stop)
            else:
                records = islice(read_source(source), entry.start, entry.stop)
            yield from ((index, record) for record in records)


def _entry_stat(cfg: IngestConfig, index: int, entry: object, roots: dict[int, str]) -> object:
    """What a shard's result depends on beyond the entry itself: a file's size and mtime
    (as DVC's own change check), a torchvision root's tree of them."""
    if isinstance(entry, FileRef):
        return _file_stat(entry.path)
    source = cfg.sources[index]
    if isinstance(entry, Generated) and isinstance(source, TorchvisionSource):
        if index not in roots:
            files = sorted(p for p in source.root.rglob("*") if p.is_file())
            roots[index] = digest([(str(p), _file_stat(p)) for p in files])
        return roots[index]
    return None


def _file_stat(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _quarantine_row(source: str, record: Rejected) -> dict:
    return {
        "id": None,
        "source": source,
        "path": record.path,
        "label": record.label,
        "reason": record.reason,
        "detail": record.detail,
    }


def _flush(writer: pq.ParquetWriter, block: dict[str, list]) -> None:
    if block["id"]:
        writer.write_table(pa.table(block, schema=INGESTED_SCHEMA))
        for values in block.values():
            values.clear()


_BLOCK_ROWS = 1024


def _check_usable(name: str, source: object, summary: SourceSummary) -> None:
    where = getattr(source, "path", None) or getattr(source, "root", None) or source.kind
    if summary.items == 0:
        rejected = sum(summary.quarantined.values())
        raise SourceError(
            f"source {name!r} ({where}) has no readable files"
            + (f" ({rejected} rejected, see the ingest quarantine)" if rejected else "")
        )
    if len(summary.per_class) < 2:
        only = next(iter(summary.per_class))
        raise SourceError(
            f"source {name!r} ({where}) has one class only ({only!r}); "
            "an image_folder needs one sub-folder per class"
        )


SHARDING = StageSpec(
    stage="ingest",
    config=lambda params: params.ingest,
    plan=plan_ingest,
    run_shard=run_ingest_shard,
    merge=merge_ingest,
)
