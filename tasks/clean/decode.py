"""Pass 1 on a batch of ingested rows: the per-image rules, the converted kept rows staged
to a Parquet file, and the few numbers per kept row that the whole-dataset rules need.

Contract: `stage_batch` (and `decode_chunk` within it) is pure apart from writing its one
staging file: the same batch and config give the same file and the same `StagedBatch` in
any process, so a decode worker (tasks/clean/workers.py) and the stage's own process are
interchangeable. Rows keep their input order; each rejected row carries its first failed
rule. A shard stores each `NUMBERS` field of its batches as <name>.npy
(tasks/clean/stage.py), which the merge reads back (tasks/clean/merge.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthloop.config import CleanConfig
from synthloop.dataset import IMAGE_SCHEMA
from tasks.clean.hashing import row_numbers, thumbnail_side, thumbnail_width
from tasks.clean.rules import Converted, Rejection, blank_flags, convert_image, map_label
from tasks.clean.splits import split_keys

# Ingested rows per pass-1 task (fewer at the end of a shard); also pass 2's batches.
# Read by stage.py, workers.py and route.py: a test that changes it patches each.
BATCH_ROWS = 4096
MAX_CHUNK_ROWS = 4096  # rows decoded at once within a task (fewer for large images)
# Per kept row, as .npy.
NUMBERS = ("split_keys", "pixel_hashes", "dhashes", "thumbnails", "crop_dhashes")


def chunk_rows(cfg: CleanConfig) -> int:
    """Rows per pass-1 chunk: MAX_CHUNK_ROWS, fewer where that would pass 8 MiB of pixels."""
    pixel_bytes = cfg.image_size * cfg.image_size * cfg.channels
    return max(1, min(MAX_CHUNK_ROWS, (8 << 20) // pixel_bytes))


def empty_numbers(name: str, cfg: CleanConfig) -> np.ndarray:
    """A `NUMBERS` field with no rows: the dtype and width of a full one."""
    if name == "thumbnails":
        return np.empty((0, thumbnail_width(cfg)), np.uint8)
    return np.empty(0, np.uint64)


@dataclass(frozen=True)
class DecodedChunk:
    """Pass 1's outcome for one chunk of ingested rows; row numbers count from the chunk's
    first row. Small: a converted PNG comes back only where it differs from the input."""

    labels: list[str | None]  # per row: the mapped label, or the raw one it was rejected for
    rejected: list[tuple[int, Rejection]]  # (row, first failed rule), in row order
    kept: list[int]  # rows that pass every per-image rule, in row order
    pngs: list[bytes | None]  # per kept row: the converted PNG; None where the input is it
    resized: int
    channels_converted: int
    pixel_hashes: np.ndarray  # per kept row (m,) uint64
    dhashes: np.ndarray  # (m,) uint64
    thumbnails: np.ndarray  # (m, thumbnail_width(cfg)) uint8
    crop_dhashes: np.ndarray  # (m,) uint64


def decode_chunk(labels: list[str | None], images: list[bytes], cfg: CleanConfig) -> DecodedChunk:
    """Apply the per-image rules to one chunk (label, decode-verify, convert, blank) and
    compute the kept rows' hashes. Pure: the same chunk gives the same result in any process."""
    mapped: dict[str | None, str | Rejection] = {}  # map_label is pure: once per label
    out_labels: list[str | None] = []
    outcome: list[Converted | Rejection] = []
    for raw, data in zip(labels, images, strict=True):
        label = mapped[raw] if raw in mapped else mapped.setdefault(raw, map_label(raw, cfg))
        if isinstance(label, Rejection):
            out_labels.append(raw)
            outcome.append(label)
        else:
            out_labels.append(label)
            outcome.append(convert_image(data, cfg))
    decoded = [r.pixels for r in outcome if isinstance(r, Converted)]
    blank = iter(blank_flags(decoded, cfg))
    rejected: list[tuple[int, Rejection]] = []
    kept: list[int] = []
    pngs: list[bytes | None] = []
    kept_pixels: list[np.ndarray] = []
    resized = channels_converted = 0
    for j, result in enumerate(outcome):
        if isinstance(result, Rejection):
            rejected.append((j, result))
            continue
        if next(blank):
            rejected.append((j, Rejection("blank", f"std {result.pixels.std():.2f}")))
            continue
        resized += result.resized
        channels_converted += result.mode_changed
        kept.append(j)
        pngs.append(None if result.png is images[j] else result.png)
        kept_pixels.append(result.pixels)
    side = thumbnail_side(cfg)
    if kept_pixels:
        numbers = row_numbers(kept_pixels, side)
    else:
        empty = np.empty(0, dtype=np.uint64)
        numbers = (empty, empty, empty_numbers("thumbnails", cfg), empty)
    return DecodedChunk(out_labels, rejected, kept, pngs, resized, channels_converted, *numbers)


@dataclass(frozen=True)
class StagedBatch:
    """Pass 1's outcome for one batch of ingested rows, once its kept rows are staged: what
    the parent keeps in memory (a few numbers per kept row) and the quarantine rows."""

    rows: int
    quarantined: list[dict]  # QUARANTINE_SCHEMA rows, in row order
    ids: list[str]  # per kept row, in row order
    labels: list[str]
    split_keys: np.ndarray  # (m,) uint64, split_keys(ids, cfg.seed)
    resized: int
    channels_converted: int
    pixel_hashes: np.ndarray  # (m,) uint64
    dhashes: np.ndarray  # (m,) uint64
    thumbnails: np.ndarray  # (m, thumbnail_width(cfg)) uint8
    crop_dhashes: np.ndarray  # (m,) uint64


def stage_batch(batch: pa.RecordBatch, staging_file: str, cfg: CleanConfig) -> StagedBatch:
    """Pass 1 on one batch of ingested rows, `chunk_rows(cfg)` rows at a time: the per-image
    rules, then the kept rows, converted, into `staging_file` (IMAGE_SCHEMA; one row group
    per chunk). Runs in a decode worker or in the stage's own process alike."""
    quarantined: list[dict] = []
    ids: list[str] = []
    labels: list[str] = []
    numbers: list[tuple[np.ndarray, ...]] = []
    resized = channels_converted = 0
    step = chunk_rows(cfg)
    with pq.ParquetWriter(staging_file, IMAGE_SCHEMA) as writer:
        for lo in range(0, batch.num_rows, step):
            part = batch.slice(lo, step)
            col = {name: part.column(name).to_pylist() for name in ("id", "label", "image")}
            chunk = decode_chunk(col["label"], col["image"], cfg)
            if chunk.rejected:
                quarantined.extend(_quarantine_rows(part, col, chunk))
            if not chunk.kept:
                continue
            kept_ids = [col["id"][j] for j in chunk.kept]
            kept_labels = [chunk.labels[j] for j in chunk.kept]
            writer.write_table(_kept_table(part, col["image"], chunk, kept_ids, kept_labels, cfg))
            ids.extend(kept_ids)
            labels.extend(kept_labels)
            resized += chunk.resized
            channels_converted += chunk.channels_converted
            numbers.append(
                (chunk.pixel_hashes, chunk.dhashes, chunk.thumbnails, chunk.crop_dhashes)
            )
    if numbers:
        hashes, dhashes, thumbnails, crop_dhashes = (
            np.concatenate(n) for n in zip(*numbers, strict=True)
        )
    else:
        hashes = dhashes = crop_dhashes = empty_numbers("dhashes", cfg)
        thumbnails = empty_numbers("thumbnails", cfg)
    return StagedBatch(
        batch.num_rows,
        quarantined,
        ids,
        labels,
        split_keys(ids, cfg.seed),
        resized,
        channels_converted,
        hashes,
        dhashes,
        thumbnails,
        crop_dhashes,
    )


def _quarantine_rows(part: pa.RecordBatch, col: dict[str, list], chunk: DecodedChunk) -> list[dict]:
    """QUARANTINE_SCHEMA rows of the chunk's rejected rows, in row order."""
    source, path = part.column("source"), part.column("path")
    return [
        {
            "id": col["id"][j],
            "source": source[j].as_py(),
            "path": path[j].as_py(),
            "label": chunk.labels[j],
            "reason": rejection.reason,
            "detail": rejection.detail,
        }
        for j, rejection in chunk.rejected
    ]


def _kept_table(
    part: pa.RecordBatch,
    images: list[bytes],
    chunk: DecodedChunk,
    ids: list[str],
    labels: list[str],
    cfg: CleanConfig,
) -> pa.Table:
    """The chunk's kept rows (`ids`, `labels`), converted, as IMAGE_SCHEMA rows (no split
    yet)."""
    m = len(chunk.kept)
    take = pa.array(chunk.kept, pa.int64())
    columns = {
        "id": pa.array(ids, pa.string()),
        "label": pa.array(labels, pa.string()),
        "split": pa.nulls(m, pa.string()),
        "source": part.column("source").take(take),
        "path": part.column("path").take(take),
        "parent_id": pa.nulls(m, pa.string()),
        "image": pa.array(
            [
                images[j] if png is None else png
                for j, png in zip(chunk.kept, chunk.pngs, strict=True)
            ],
            pa.binary(),
        ),
        "height": pa.array([cfg.image_size] * m, pa.int32()),
        "width": pa.array([cfg.image_size] * m, pa.int32()),
        "channels": pa.array([cfg.channels] * m, pa.int8()),
    }
    return pa.table(columns, schema=IMAGE_SCHEMA)
