"""Pass 2: stream the staged rows into `train/`, `val/` and `test/` by the merge's decisions.

Contract: the staged rows are read in pass-1 order (shard by shard, file by file) and row i
of that order is routed by `keep[i]` and `splits[i]` (an index into SPLITS): a kept row is
written, with its split, to out_dir/<split> by `ShardWriter` (as Arrow batches: no row
becomes Python objects); a dropped row becomes a quarantine row with its rejection. Nothing
is decoded: the PNG bytes staged in pass 1 are what lands in the dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthloop.dataset import IMAGE_SCHEMA, ShardWriter
from tasks.clean.decode import BATCH_ROWS
from tasks.clean.rules import Rejection
from tasks.clean.splits import SPLITS

SPLIT_COLUMN = IMAGE_SCHEMA.get_field_index("split")


def staged_files(folder: Path) -> list[Path]:
    """A shard's staged rows, in order (one file per pass-1 batch)."""
    return sorted(folder.glob("part-*.parquet"))


def staged_batches(folders: list[Path]) -> Iterator[pa.RecordBatch]:
    """The shards' staged rows in pass-1 order, in batches of at most BATCH_ROWS."""
    for folder in folders:
        for path in staged_files(folder):
            yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)


def route_staged(
    staged: Iterator[pa.RecordBatch],
    out_dir: Path,
    keep: np.ndarray,
    splits: np.ndarray,
    rejections: list[Rejection | None],
    shard_rows: int,
    wanted: np.ndarray,
    quarantine: Callable[[list[dict]], None],
) -> dict[int, bytes]:
    """Pass 2: write the staged rows (in pass-1 order) to out_dir/<split>; hands the
    quarantine rows of those not kept, in order, to `quarantine` a batch at a time, and
    returns the converted PNG of each `wanted` row (sorted pass-1 positions) by position."""
    writers = {s: ShardWriter(out_dir / s, IMAGE_SCHEMA, shard_rows) for s in SPLITS}
    images: dict[int, bytes] = {}
    position = 0
    for batch in staged:
        n = batch.num_rows
        lo, hi = np.searchsorted(wanted, [position, position + n])
        if hi > lo:
            column = batch.column("image")
            images.update((int(r), column[int(r) - position].as_py()) for r in wanted[lo:hi])
        kept_here = keep[position : position + n]
        split_here = splits[position : position + n]
        for code, split in enumerate(SPLITS):
            rows = np.flatnonzero(kept_here & (split_here == code))
            if len(rows):
                part = batch.take(pa.array(rows))
                split_column = pa.array([split] * len(rows), pa.string())
                writers[split].write_batch(part.set_column(SPLIT_COLUMN, "split", split_column))
        dropped = np.flatnonzero(~kept_here)
        if len(dropped):
            quarantine(_quarantine_rows(batch, dropped, rejections, position))
        position += n
    for writer in writers.values():
        writer.close()
    return images


def _quarantine_rows(
    batch: pa.RecordBatch, dropped: np.ndarray, rejections: list[Rejection | None], position: int
) -> list[dict]:
    """QUARANTINE_SCHEMA rows of the batch's `dropped` rows (the batch starts at pass-1
    position `position`)."""
    part = batch.take(pa.array(dropped))
    col = {c: part.column(c).to_pylist() for c in ("id", "source", "path", "label")}
    rows = []
    for k, i in enumerate(dropped.tolist()):
        rejection = rejections[position + i]
        rows.append(
            {
                "id": col["id"][k],
                "source": col["source"][k],
                "path": col["path"][k],
                "label": col["label"][k],
                "reason": rejection.reason,
                "detail": rejection.detail,
            }
        )
    return rows
