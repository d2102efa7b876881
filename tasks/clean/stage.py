"""The clean stage as a sharded stage (synthloop/sharding.py): plan -> shard -> merge.

Contract: `plan_clean` cuts the ingested part files into shards of at most SHARD_BATCHES *
BATCH_ROWS rows; `run_clean_shard` runs pass 1 on one shard into a folder of its own (staged
rows, quarantine, numbers, counts); `merge_clean` (tasks/clean/merge.py) turns the folders,
in shard order, into the stage's outputs. The outputs do not depend on how the rows were
sharded, nor on where or in how many processes pass 1 ran.

`SHARDING` is what the flow computes shards with beforehand (`flows/sharded.py`): each
shard decodes in the thread that runs it. A run of the stage in this process
(`run_stage`, `run_clean`) is a `StageRun`: its shards, computed one after another in the
main thread, share one pool of decode workers, and the Great Expectations import runs
beside them; both are the run's own attributes, handed to its merge, never module state.
Both entry points allocate Arrow buffers from the system allocator while they run
(`workers.system_arrow_memory`: less resident memory than pyarrow's default).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthloop.config import CleanConfig, Params
from synthloop.dataset import QUARANTINE_SCHEMA, shard_paths, write_table
from synthloop.sharding import Shard, StageSpec, chunks, digest, run_inline, run_uncached
from tasks.clean.decode import BATCH_ROWS, NUMBERS, empty_numbers
from tasks.clean.merge import merge_clean
from tasks.clean.workers import (
    DecodePool,
    decode_workers,
    start_gx_import,
    system_arrow_memory,
)

log = logging.getLogger(__name__)

SHARD_BATCHES = 8  # pass-1 batches (of BATCH_ROWS rows) per shard, at most
COLUMNS = ["id", "label", "source", "path", "image"]


@dataclass(frozen=True)
class CleanWork:
    """Rows `start` to `stop` of the ingested part file `part`; `total_rows` of the whole
    input decides whether the stage's own run decodes in worker processes."""

    part: str
    start: int
    stop: int
    total_rows: int


def plan_clean(cfg: CleanConfig) -> list[Shard]:
    """Per ingested part file, shards of SHARD_BATCHES * BATCH_ROWS rows. Fingerprint: the
    part's name, size and mtime (ingest rewrites a part whenever its rows change)."""
    paths = shard_paths(cfg.input)
    counts = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    total = sum(counts)
    pieces = [
        (path, rows)
        for path, count in zip(paths, counts, strict=True)
        for rows in chunks(count, SHARD_BATCHES * BATCH_ROWS)
    ]
    shards = []
    for index, (path, rows) in enumerate(pieces):
        stat = path.stat()
        fingerprint = digest(path.name, stat.st_size, stat.st_mtime_ns, rows.start, rows.stop)
        work = CleanWork(path.name, rows.start, rows.stop, total)
        shards.append(Shard("clean", index, len(pieces), fingerprint, work))
    return shards


def run_clean_shard(cfg: CleanConfig, shard: Shard, out: Path) -> dict:
    """Pass 1 on one shard's rows, in this thread (what a flow's task runner computes)."""
    return stage_shard(cfg, shard.work, out, DecodePool(1))


def stage_shard(cfg: CleanConfig, work: CleanWork, out: Path, pool: DecodePool) -> dict:
    """Pass 1 on the work's rows through `pool`: the kept rows, converted, staged as
    out/part-*.parquet (IMAGE_SCHEMA), the per-image rejections as out/quarantine.parquet,
    and the numbers the whole-dataset rules need as out/<name>.npy; returns the counts."""
    results = list(pool.stage(_read_rows(cfg, work), out, cfg))
    quarantined = [row for r in results for row in r.quarantined]
    write_table(out / "quarantine.parquet", quarantined, QUARANTINE_SCHEMA)
    for name in NUMBERS:  # stage_batch gives each, empty or not, its dtype and width
        parts = [getattr(r, name) for r in results]
        np.save(out / f"{name}.npy", np.concatenate(parts) if parts else empty_numbers(name, cfg))
    return {
        "rows": sum(r.rows for r in results),
        "kept": sum(len(r.ids) for r in results),
        "resized": sum(r.resized for r in results),
        "channels_converted": sum(r.channels_converted for r in results),
    }


def _read_rows(cfg: CleanConfig, work: CleanWork) -> Iterator[pa.RecordBatch]:
    """The work's rows in batches of at most BATCH_ROWS."""
    position = 0
    source = pq.ParquetFile(Path(cfg.input) / work.part)
    for batch in source.iter_batches(batch_size=BATCH_ROWS, columns=COLUMNS):
        lo, hi = max(work.start - position, 0), min(work.stop - position, batch.num_rows)
        if lo < hi:
            yield batch.slice(lo, hi - lo)
        position += batch.num_rows
        if position >= work.stop:
            return


SHARDING = StageSpec(
    stage="clean",
    config=lambda params: params.clean,
    plan=plan_clean,
    run_shard=run_clean_shard,
    merge=merge_clean,
)


class StageRun:
    """One run of the stage in this process, with the resources its steps share.

    Its shards are computed one after another in the main thread: one pool of decode
    workers serves them all (started by the first, ~0.3 s per worker) and is released by
    the merge, which waits for the workers' exit at its end. With workers this process
    mostly waits, so Great Expectations is imported meanwhile; without, the import and the
    decoding would take turns on the interpreter lock, slower than one after the other
    (measured: +0.7 s at 100k). A shard computed on another thread decodes in that thread.
    `spec()` is `SHARDING` with this run's shard and merge steps (the same module, so the
    same shard cache keys).
    """

    def __init__(self, validate: bool = True) -> None:
        self.validate = validate
        self.pool: DecodePool | None = None
        self.gx_import: threading.Thread | None = None

    def spec(self) -> StageSpec:
        return replace(SHARDING, run_shard=self.run_shard, merge=self.merge)

    def run_shard(self, cfg: CleanConfig, shard: Shard, out: Path) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return run_clean_shard(cfg, shard, out)
        if self.pool is None:
            self.pool = DecodePool(decode_workers(cfg, shard.work.total_rows))
            # only a run that validates imports GX: an unjoined import would outlive the run
            if self.validate and self.pool.workers > 1 and self.gx_import is None:
                self.gx_import = start_gx_import()
        try:
            return stage_shard(cfg, shard.work, out, self.pool)
        except BaseException:
            # Cancel what is queued, wait for what runs: no worker outlives the stage.
            pool, self.pool = self.pool, None
            pool.__exit__(None, None, None)
            raise

    def merge(self, cfg: CleanConfig, folders: list[Path]) -> dict:
        pool, gx_import, self.pool, self.gx_import = self.pool, self.gx_import, None, None
        with contextlib.ExitStack() as stack:
            if pool is not None:
                pool.finish()  # the workers exit in the background while the merge runs
                stack.enter_context(pool)  # waits for their exit at the end
            log.info("clean: pass 1 used %d process(es)", pool.workers if pool else 1)
            return merge_clean(cfg, folders, self.validate, gx_import if self.validate else None)


def run_clean(cfg: CleanConfig, validate: bool = True) -> dict:
    """Clean `cfg.input` into `cfg.output/{train,val,test}`; returns the report it writes."""
    with system_arrow_memory():
        return run_uncached(StageRun(validate).spec(), cfg)


def run_stage(params: Params) -> dict:
    """The DVC stage: reuse the shards the flow computed beforehand, compute the rest."""
    with system_arrow_memory():
        return run_inline(StageRun().spec(), params)
