"""Clean: decode-verify, relabel, convert, de-duplicate and split the ingested images.

Rules, in the order a row meets them (its first failure is its quarantine reason):
  label_not_allowed   label (after clean.label_map) outside the clean.labels allow-list
  zero_byte           an empty file
  not_an_image        no image format recognised
  too_many_pixels     header dimensions over clean.max_pixels (checked before decoding)
  truncated           the decoder failed part-way (truncated or corrupt data)
  blank               near-constant pixels (std below clean.blank_std)
  conflicting_labels  identical pixels under different labels: every copy goes
  exact_duplicate     identical pixels (after conversion) as a kept row
  near_duplicate      dHash within clean.near_duplicate_distance bits of a kept row (the
                      candidates), confirmed on grey thumbnails of side
                      min(clean.near_duplicate_size, clean.image_size), each
                      standardised (mean removed, divided by its pixel std): mean absolute
                      difference within clean.near_duplicate_difference (plain, or blurred
                      and aligned for a crop of a few pixels), pixel stds within a ratio
                      of clean.near_duplicate_contrast, and for RGB colour planes that
                      agree (tasks/near_duplicates.py; relative, so sparse images such as
                      handwriting are judged on their strokes, not on their white
                      background)

Two passes keep memory bounded: pass 1 streams the ingested shards, decodes each image
once, writes the converted PNG to a staging area and keeps only a few numbers per row;
the duplicate and split decisions are made on those numbers; pass 2 streams the staged
rows into `train/`, `val/` and `test/`. Pass 2 also keeps the PNGs of the first
clean.near_duplicate_sheet_pairs near-duplicates (by removed id) and their keepers, for the
sheet at clean.near_duplicate_sheet (reports/near_duplicates.png): each removed image
beside the kept image it matched.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from synthloop.config import CleanConfig, ConfigError, Params, SplitConfig
from synthloop.dataset import (
    IMAGE_SCHEMA,
    QUARANTINE_SCHEMA,
    atomic_dir,
    atomic_file,
    read_columns,
    remove_stale_temporaries,
    shard_paths,
    write_json,
    write_table,
)
from synthloop.sharding import (
    Shard,
    StageSpec,
    cached_result,
    chunks,
    digest,
    run_inline,
    run_uncached,
)
from tasks import near_duplicates

if TYPE_CHECKING:
    import pandas as pd  # imported where used: decode workers never need it (~0.3 s each)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_COLUMN = IMAGE_SCHEMA.get_field_index("split")
_MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class Converted:
    """A decoded image, converted to the configured size and channels."""

    pixels: np.ndarray  # (H, W) or (H, W, 3) uint8
    png: bytes
    resized: bool
    mode_changed: bool


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str
    keeper: int | None = None  # near_duplicate: the kept row it matched (pass-1 position)


# --- per-image rules (pure functions) ---------------------------------------------------


def map_label(label: str, cfg: CleanConfig) -> str | Rejection:
    label = cfg.label_map.get(label, label)
    if cfg.labels is not None and label not in cfg.labels:
        return Rejection("label_not_allowed", f"label {label!r} is not in clean.labels")
    return label


def convert_image(data: bytes, cfg: CleanConfig) -> Converted | Rejection:
    """Decode-verify one image and convert it; never raises on bad bytes."""
    if not data:
        return Rejection("zero_byte", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Rejection("not_an_image", "no image format recognised")
    except Image.DecompressionBombError as err:
        return Rejection("too_many_pixels", str(err))
    width, height = image.size
    if width * height > cfg.max_pixels:
        return Rejection(
            "too_many_pixels", f"{width}x{height} is over clean.max_pixels={cfg.max_pixels}"
        )
    source_format = image.format
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return Rejection("truncated", f"{type(err).__name__}: {err}")

    mode = _MODES[cfg.channels]
    mode_changed = image.mode != mode
    if mode_changed:
        image = image.convert(mode)
    size = (cfg.image_size, cfg.image_size)
    resized = image.size != size
    if resized:
        image = image.resize(size, Image.Resampling.BILINEAR)
    if source_format == "PNG" and not (mode_changed or resized):
        png = data  # already what we would write: keep the original bytes
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        png = buf.getvalue()
    return Converted(_pixels(image), png, resized, mode_changed)


def _pixels(image: Image.Image) -> np.ndarray:
    """The same read-only array as np.asarray(image) for an "L" or "RGB" image, faster."""
    width, height = image.size
    shape = (height, width) if image.mode == "L" else (height, width, len(image.getbands()))
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(shape)


def is_blank(pixels: np.ndarray, cfg: CleanConfig) -> bool:
    return float(pixels.std()) < cfg.blank_std


def pixel_hash(pixels: np.ndarray) -> int:
    """64-bit hash of the exact pixels and shape."""
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=8, person=bytes(pixels.shape[:3]))
    return int.from_bytes(digest.digest(), "little")


# --- the same per-image numbers for many same-shape images at once ----------------------
# Pass 1 computes these on chunks of rows; each equals, row by row, the per-image function
# above, only without a Python call per image (thumbnails and dHashes: tasks/near_duplicates).


def _stds(pixels: np.ndarray) -> np.ndarray:
    """Per-row pixel std of an (m, ...) uint8 stack, from exact integer sums.

    Agrees with `pixels[i].std()` to ~1e-13; callers re-check rows near a threshold with
    numpy's own std, so decisions match `is_blank` exactly.
    """
    flat = pixels.reshape(len(pixels), -1)
    k = flat.shape[1]
    total = flat.sum(axis=1, dtype=np.int64)
    squares = flat.astype(np.uint16)
    squares *= squares  # 255**2 fits in uint16
    numerator = k * squares.sum(axis=1, dtype=np.int64) - total * total
    return np.sqrt(numerator.astype(np.float64)) / k


def _std_is_exactable(shape: tuple[int, ...]) -> bool:
    """Whether `_stds`' int64 sums cannot overflow for images of this shape."""
    k = int(np.prod(shape))
    return k * k * 255 * 255 < 2**62


def _pixel_hashes(pixels: list[np.ndarray]) -> np.ndarray:
    """(m,) uint64: `pixel_hash` of each image."""
    digests = b"".join(
        hashlib.blake2b(p.tobytes(), digest_size=8, person=bytes(p.shape[:3])).digest()
        for p in pixels
    )
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


# --- whole-dataset rules (pure functions over arrays) -----------------------------------


def resolve_duplicates(
    ids: np.ndarray,
    labels: np.ndarray,
    pixel_hashes: np.ndarray,
    dhashes: np.ndarray,
    thumbnails: np.ndarray,
    max_distance: int,
    max_difference: float,
    max_contrast: float,
) -> tuple[np.ndarray, list[Rejection | None]]:
    """Decide which rows survive de-duplication.

    Near-duplicates: dHashes within `max_distance` bits propose a pair; their thumbnails
    within `max_difference` and `max_contrast` of each other confirm it
    (`near_duplicates.relative_difference`: relative to their own pixel std). A hash alone
    is too coarse: distinct 8x8 digits and distinct sparse drawings of one character often
    share a dHash.
    Rows are ranked by id so the survivor of a group does not depend on file order.
    Returns (keep mask, a Rejection or None per row); a dropped row's detail names its keeper.
    """
    n = len(ids)
    keep = np.ones(n, dtype=bool)
    rejections: list[Rejection | None] = [None] * n
    # Only rows whose pixel hash repeats can be exact duplicates: group just those.
    hashes = pixel_hashes.astype(np.uint64)
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts[inverse.reshape(-1)] > 1)
    import pandas as pd

    frame = pd.DataFrame(
        {"id": ids[repeated], "label": labels[repeated], "h": hashes[repeated]}, index=repeated
    )
    frame = frame.sort_values("id", kind="stable")
    for _, group in frame.groupby("h", sort=False):
        rows = group.index.to_numpy()
        if group["label"].nunique() > 1:
            detail = "same pixels labelled " + ", ".join(sorted(group["label"].unique()))
            for r in rows:
                keep[r] = False
                rejections[r] = Rejection("conflicting_labels", detail)
        else:
            for r in rows[1:]:
                keep[r] = False
                rejections[r] = Rejection("exact_duplicate", f"same pixels as {ids[rows[0]]}")

    survivors = np.flatnonzero(keep)
    survivors = survivors[np.argsort(ids[survivors], kind="stable")]
    # Positions in `survivors`, which is id-ordered: a pair's first row ranks first.
    pairs = near_duplicates.confirmed_pairs(
        dhashes, thumbnails, survivors, max_distance, max_difference, max_contrast
    )
    dropped, keepers = near_duplicates.drop_order(pairs, len(survivors))
    for j, i in zip(survivors[dropped].tolist(), survivors[keepers].tolist(), strict=True):
        keep[j] = False
        detail = f"within {max_distance} dHash bits of {ids[i]}"
        rejections[j] = Rejection("near_duplicate", detail, keeper=i)
    return keep, rejections


def split_keys(ids: list[str] | np.ndarray, seed: int) -> np.ndarray:
    """(n,) uint64: each id's seeded split hash (the first 8 bytes of blake2b("seed:id"),
    big-endian, so keys order exactly as their hex digests do)."""
    digests = b"".join(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def assign_splits(
    ids: np.ndarray,
    labels: np.ndarray,
    split: SplitConfig,
    seed: int,
    keys: np.ndarray | None = None,
) -> np.ndarray:
    """Deterministic stratified split: within each class, rows ordered by a seeded hash of
    their id; the first share goes to val, the next to test (at least
    `split.test_min_per_class`), the rest to train. `keys`, if given, is
    `split_keys(ids, seed)` computed beforehand."""
    if keys is None:
        keys = split_keys(ids, seed)
    splits = np.empty(len(ids), dtype=object)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rows = rows[np.argsort(keys[rows], kind="stable")]
        n_val, n_test = split.counts(len(rows))
        splits[rows[:n_val]] = "val"
        splits[rows[n_val : n_val + n_test]] = "test"
        splits[rows[n_val + n_test :]] = "train"
    return splits


# --- pass 1, one chunk of rows at a time (what the decode workers run) -------------------


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
    thumbnails: np.ndarray  # (m, near_duplicates.row_width) uint8


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
    blank = iter(_blank_flags(decoded, cfg))
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
    side = _side(cfg)
    if kept_pixels:
        numbers = _row_numbers(kept_pixels, side)
    else:
        empty = np.empty(0, dtype=np.uint64)
        numbers = (empty, empty, _empty("thumbnails", cfg))
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
    thumbnails: np.ndarray  # (m, near_duplicates.row_width) uint8


def stage_batch(batch: pa.RecordBatch, staging_file: str, cfg: CleanConfig) -> StagedBatch:
    """Pass 1 on one batch of ingested rows, `chunk_rows(cfg)` rows at a time: the per-image
    rules, then the kept rows, converted, into `staging_file` (IMAGE_SCHEMA; one row group
    per chunk). Runs in a decode worker or in the stage's own process alike."""
    quarantined: list[dict] = []
    ids: list[str] = []
    labels: list[str] = []
    numbers: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    resized = channels_converted = 0
    step = chunk_rows(cfg)
    with pq.ParquetWriter(staging_file, IMAGE_SCHEMA) as writer:
        for lo in range(0, batch.num_rows, step):
            part = batch.slice(lo, step)
            col = {name: part.column(name).to_pylist() for name in ("id", "label", "image")}
            chunk = decode_chunk(col["label"], col["image"], cfg)
            if chunk.rejected:
                source, path = part.column("source"), part.column("path")
                for j, rejection in chunk.rejected:
                    quarantined.append(
                        {
                            "id": col["id"][j],
                            "source": source[j].as_py(),
                            "path": path[j].as_py(),
                            "label": chunk.labels[j],
                            "reason": rejection.reason,
                            "detail": rejection.detail,
                        }
                    )
            if not chunk.kept:
                continue
            m = len(chunk.kept)
            kept_ids = [col["id"][j] for j in chunk.kept]
            kept_labels = [chunk.labels[j] for j in chunk.kept]
            images = col["image"]
            take = pa.array(chunk.kept, pa.int64())
            columns = {
                "id": pa.array(kept_ids, pa.string()),
                "label": pa.array(kept_labels, pa.string()),
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
            writer.write_table(pa.table(columns, schema=IMAGE_SCHEMA))
            ids.extend(kept_ids)
            labels.extend(kept_labels)
            resized += chunk.resized
            channels_converted += chunk.channels_converted
            numbers.append((chunk.pixel_hashes, chunk.dhashes, chunk.thumbnails))
    if numbers:
        hashes, dhashes, thumbnails = (np.concatenate(n) for n in zip(*numbers, strict=True))
    else:
        hashes = dhashes = np.empty(0, dtype=np.uint64)
        thumbnails = _empty("thumbnails", cfg)
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
    )


BATCH_ROWS = 4096  # ingested rows per pass-1 task (fewer at the end of a shard)
MAX_CHUNK_ROWS = 4096  # rows decoded at once within a task (fewer for large images)

# Below this many ingested rows pass 1 runs in this process. Starting a worker (a fresh
# interpreter importing numpy, Pillow, pyarrow and this module: ~0.3 s of CPU, more without
# cached bytecode) and feeding it cost about as much as decoding ~10,000 small images; on 2
# cores the pool was no faster than one process at 20,000 (16x16 PNGs, validation on) and
# ~1.7x faster in pass 1 at 100,000. Small runs (tests, the demo) also stay in-process.
POOL_MIN_ROWS = 20_000


def chunk_rows(cfg: CleanConfig) -> int:
    """Rows per pass-1 chunk: MAX_CHUNK_ROWS, fewer where that would pass 8 MiB of pixels."""
    pixel_bytes = cfg.image_size * cfg.image_size * cfg.channels
    return max(1, min(MAX_CHUNK_ROWS, (8 << 20) // pixel_bytes))


def decode_workers(cfg: CleanConfig, rows: int) -> int:
    """How many processes pass 1 uses for `rows` ingested rows: 1 means this one.

    clean.workers (0: one per usable CPU core), never more than there are batches of
    BATCH_ROWS, and 1 below POOL_MIN_ROWS rows."""
    if rows < POOL_MIN_ROWS:
        return 1
    workers = cfg.workers or _cpu_count()
    return max(1, min(workers, -(-rows // BATCH_ROWS)))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _DecodePool:
    """Pass 1's decode worker processes, or none (`workers` <= 1: all in this process).

    `stage` runs `stage_batch` on each batch; `finish` lets the workers exit in the
    background while the stage goes on; leaving the `with` block waits for them, or, on an
    error, cancels what is queued and waits for what is running.

    (This process only feeds the workers and keeps their results: decoding here as well,
    with one worker fewer, used less CPU time in all but was slower on 2 free cores, its
    decoding and the Great Expectations import taking turns on one interpreter lock.)
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._exiting: threading.Thread | None = None
        if workers > 1:
            # spawn, not fork: the caller may have threads (the GX import, torch) that fork
            # would copy mid-operation. Workers are this process's children: their CPU time
            # and peak RSS show in getrusage(RUSAGE_CHILDREN) once they are waited for.
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_sigint,
            )

    def stage(
        self, batches: Iterator[pa.RecordBatch], staging: Path, cfg: CleanConfig
    ) -> Iterator[StagedBatch]:
        """`stage_batch` of each batch into staging/part-<n>.parquet, in batch order; with
        workers, at most `workers + 2` batches submitted and not yet consumed, so memory
        stays bounded however large the input."""

        def file(n: int) -> str:
            return str(staging / f"part-{n:09d}.parquet")

        if self._pool is None:
            for n, batch in enumerate(batches):
                yield stage_batch(batch, file(n), cfg)
            return
        pending: deque[Future] = deque()
        for n, batch in enumerate(batches):
            pending.append(self._pool.submit(stage_batch, _compact(batch), file(n), cfg))
            if len(pending) > self.workers + 1:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def finish(self) -> None:
        if self._pool is not None and self._exiting is None:
            self._exiting = threading.Thread(
                target=self._pool.shutdown, name="clean-decode-pool-exit", daemon=True
            )
            self._exiting.start()

    def __enter__(self) -> _DecodePool:
        return self

    def __exit__(self, *_: object) -> None:
        if self._pool is None:
            return
        if self._exiting is not None:
            self._exiting.join()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _compact(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with buffers of its own rows only: a slice pickles its parent's buffers."""
    if batch.get_total_buffer_size() <= 2 * batch.nbytes + 4096:
        return batch
    return pa.RecordBatch.from_arrays(
        [pa.concat_arrays([c]) for c in batch.columns], schema=batch.schema
    )


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops the pool and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prefetch_gx() -> threading.Thread:
    """Import Great Expectations (seconds, mostly idle-core time) in the background while
    pass 1 runs; validation joins the thread first. A failed import is left for the real
    import in the main thread to report."""

    def run() -> None:
        try:
            from tasks.expectations import _import_gx

            _import_gx()
        except Exception:  # the main thread imports it again, and reports the error
            pass

    thread = threading.Thread(target=run, name="clean-gx-import", daemon=True)
    thread.start()
    return thread


class _TableShards:
    """ShardWriter's shards (the same files, byte for byte) from Arrow record batches of
    IMAGE_SCHEMA rows, without a round trip through Python objects."""

    def __init__(self, directory: Path, shard_rows: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_rows = shard_rows
        self.shards = 0
        self._parts: list[pa.RecordBatch] = []
        self._buffered = 0

    def write(self, batch: pa.RecordBatch) -> None:
        start = 0
        while start < batch.num_rows:
            take = min(batch.num_rows - start, self.shard_rows - self._buffered)
            self._parts.append(batch.slice(start, take))
            self._buffered += take
            start += take
            if self._buffered >= self.shard_rows:
                self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        # One chunk per column, as ShardWriter's pa.table(lists): the same pages.
        table = pa.Table.from_batches(self._parts, schema=IMAGE_SCHEMA).combine_chunks()
        pq.write_table(table, self.directory / f"part-{self.shards:05d}.parquet")
        self.shards += 1
        self._parts = []
        self._buffered = 0

    def close(self) -> None:
        self.flush()


# --- the stage: plan -> shard -> merge (synthloop/sharding.py) ---------------------------

SHARD_BATCHES = 8  # pass-1 batches (of BATCH_ROWS rows) per shard, at most
COLUMNS = ["id", "label", "source", "path", "image"]
_NUMBERS = ("split_keys", "pixel_hashes", "dhashes", "thumbnails")  # per kept row, as .npy


def _side(cfg: CleanConfig) -> int:
    return near_duplicates.thumbnail_side(cfg.image_size, cfg.near_duplicate_size)


def _empty(name: str, cfg: CleanConfig) -> np.ndarray:
    """A shard's <name>.npy when it keeps no row: the dtype and width of a full one."""
    if name == "thumbnails":
        return np.empty((0, near_duplicates.row_width(_side(cfg), cfg.channels)), np.uint8)
    return np.empty(0, np.uint64)


def run_clean(cfg: CleanConfig, validate: bool = True) -> dict:
    """Clean `cfg.input` into `cfg.output/{train,val,test}`; returns the report it writes."""
    spec = SHARDING if validate else replace(SHARDING, merge=partial(merge_clean, validate=False))
    return run_uncached(spec, cfg)


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
    """Pass 1 on one shard's rows: the kept rows, converted, staged as out/part-*.parquet
    (IMAGE_SCHEMA), the per-image rejections as out/quarantine.parquet, and the numbers the
    whole-dataset rules need as out/<name>.npy; returns the counts."""
    work: CleanWork = shard.work
    pool = _pass1_pool(cfg, work.total_rows)
    try:
        results = list(pool.stage(_read_rows(cfg, work), out, cfg))
    except BaseException:
        _drop_pool()  # cancel what is queued, wait for what runs: no worker outlives the stage
        raise
    quarantined = [row for r in results for row in r.quarantined]
    write_table(out / "quarantine.parquet", quarantined, QUARANTINE_SCHEMA)
    for name in _NUMBERS:  # stage_batch gives each, empty or not, its dtype and width
        parts = [getattr(r, name) for r in results]
        np.save(out / f"{name}.npy", np.concatenate(parts) if parts else _empty(name, cfg))
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


# The stage's own run computes its missing shards one after another in the main thread:
# one pool of decode workers serves them all (started once, ~0.3 s per worker), released
# by the merge. Shards computed on a flow's task runner (threads, Dask workers) decode in
# their own thread: the runner already runs them in parallel, and a Dask worker process
# may not have children.
_pool: _DecodePool | None = None
_gx_import: threading.Thread | None = None


def _pass1_pool(cfg: CleanConfig, rows: int) -> _DecodePool:
    global _pool, _gx_import
    if threading.current_thread() is not threading.main_thread():
        return _DecodePool(1)
    if _pool is None:
        _pool = _DecodePool(decode_workers(cfg, rows))
        # With workers this process mostly waits: import Great Expectations meanwhile.
        # Without, the import and the decoding would take turns on the interpreter lock,
        # slower than one after the other (measured: +0.7 s at 100k).
        if _pool.workers > 1 and _gx_import is None:
            _gx_import = _prefetch_gx()
    return _pool


def _release_pool() -> tuple[_DecodePool | None, threading.Thread | None]:
    """The pass-1 pool (its workers now exiting in the background) and the GX import
    thread, handed to the merge, which waits for both."""
    global _pool, _gx_import
    pool, gx_import, _pool, _gx_import = _pool, _gx_import, None, None
    if pool is not None:
        pool.finish()
    return pool, gx_import


def _drop_pool() -> None:
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.__exit__(None, None, None)


def merge_clean(cfg: CleanConfig, folders: list[Path], validate: bool = True) -> dict:
    """The shards' pass-1 results in shard order, then the whole-dataset decisions
    (duplicates, conflicting labels, split), pass 2, the expectations and the report."""
    pool, gx_import = _release_pool()
    with contextlib.ExitStack() as stack:
        if pool is not None:
            stack.enter_context(pool)  # waits for the workers' exit at the end
        workers = pool.workers if pool is not None else 1
        log.info("clean: pass 1 used %d process(es)", workers)
        return _merge(cfg, folders, validate, gx_import if validate else None)


def _merge(
    cfg: CleanConfig, folders: list[Path], validate: bool, gx_import: threading.Thread | None
) -> dict:
    remove_stale_temporaries(cfg.output)
    quarantine: list[dict] = []
    reasons: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    ingested = 0

    # Per kept row, a shard at a time: what the whole-dataset rules need, compactly (an id
    # as a numpy StringDType string: about half of a Python str in a list).
    ids: list[np.ndarray] = []  # (m,) StringDType
    labels: list[np.ndarray] = []  # (m,) object, one str object per label and shard
    numbers: dict[str, list[np.ndarray]] = {name: [] for name in _NUMBERS[:3]}  # (m,) uint64
    # (n, row_width) uint8 thumbnails go to a file (784 B a row for 28x28 grey): only
    # near-duplicate candidates' are read back.
    thumbnails = _RowFile(near_duplicates.row_width(_side(cfg), cfg.channels))
    with atomic_dir(cfg.output) as out_dir, thumbnails:
        staging = out_dir / "_staging"
        staging.mkdir()
        thumbnails.open(staging / "thumbnails.u8")  # removed with the staging area
        for folder in folders:
            summary = cached_result(folder) or {}
            ingested += summary["rows"]
            rows = pq.read_table(folder / "quarantine.parquet").to_pylist()
            for row in rows:
                reasons[row["reason"]] += 1
            quarantine.extend(rows)
            if not summary["kept"]:
                continue
            converted["resized"] += summary["resized"]
            converted["channels_converted"] += summary["channels_converted"]
            kept = pa.concat_tables(
                pq.read_table(p, columns=["id", "label"]) for p in _staged(folder)
            )
            ids.append(np.array(kept["id"].to_pylist(), dtype=np.dtypes.StringDType()))
            label = kept["label"].combine_chunks().dictionary_encode()
            names = np.array(label.dictionary.to_pylist(), dtype=object)
            labels.append(names[label.indices.to_numpy()])
            for name, parts in numbers.items():
                parts.append(np.load(folder / f"{name}.npy"))
            thumbnails.write(np.load(folder / "thumbnails.npy"))

        id_array = _concatenate(ids, np.dtypes.StringDType())
        label_array = _concatenate(labels, object)
        keep, dup_rejections = resolve_duplicates(
            id_array,
            label_array,
            _concatenate(numbers["pixel_hashes"], np.uint64),
            _concatenate(numbers["dhashes"], np.uint64),
            thumbnails.read(),
            cfg.near_duplicate_distance,
            cfg.near_duplicate_difference,
            cfg.near_duplicate_contrast,
        )
        splits = np.empty(len(id_array), dtype=object)
        splits[keep] = assign_splits(
            id_array[keep],
            label_array[keep],
            cfg.split,
            cfg.seed,
            _concatenate(numbers["split_keys"], np.uint64)[keep],
        )
        known = cfg.labels if cfg.labels is not None else sorted(set(label_array[keep]))
        sheet_pairs = _sheet_pairs(id_array, dup_rejections, cfg.near_duplicate_sheet_pairs)
        del id_array, label_array  # pass 2 reads ids and labels back from the shards

        # Pass 2: route the staged rows, in pass-1 order, to their split. (Run beside the
        # validation in a thread it saved 0.2 s at 100,000 rows, lost time at 1,000,000 and
        # raised the peak RSS by 100 MiB there.)
        staged = (b for f in folders for p in _staged(f) for b in _file_batches(p))
        wanted = np.unique(sheet_pairs.ravel())
        duplicates, images = _route_staged(
            staged, out_dir, keep, splits, dup_rejections, cfg, wanted
        )
        shutil.rmtree(staging)
        for row in duplicates:
            reasons[row["reason"]] += 1
        quarantine.extend(duplicates)

        kept_meta = _kept_metadata(out_dir)
        report = _report(cfg, ingested, kept_meta, reasons, converted)
        nothing_kept = nothing_kept_message(ingested, reasons, quarantine, cfg)
        if validate and nothing_kept is None:
            if gx_import is not None:
                gx_import.join()
            from tasks.expectations import raise_on_critical, validate_clean_dataset

            expectations = validate_clean_dataset(
                kept_meta,
                known_labels=list(known),
                height=cfg.image_size,
                width=cfg.image_size,
                channels=cfg.channels,
                split_fractions=cfg.split.fractions(),
                split_tolerance=cfg.split_tolerance,
                min_class_count=cfg.min_class_count,
                docs_dir=cfg.data_docs,
            )
            expectations["data_docs"] = os.path.relpath(
                expectations["data_docs"], cfg.report.parent
            )
            report["expectations"] = expectations
        _write_sheet(cfg.near_duplicate_sheet, sheet_pairs, images)
        report["near_duplicate_sheet"] = {
            "path": os.path.relpath(cfg.near_duplicate_sheet, cfg.report.parent),
            "pairs": len(sheet_pairs),
        }
        write_table(cfg.quarantine, quarantine, QUARANTINE_SCHEMA)
        write_json(cfg.report, report)
        if nothing_kept is not None:
            raise ConfigError(nothing_kept)  # the quarantine says why, row by row
        if validate:
            raise_on_critical(expectations)  # raising here keeps the previous clean data
    log.info(
        "clean: %d ingested -> %d kept, %d quarantined %s",
        ingested,
        report["kept"],
        sum(reasons.values()),
        dict(sorted(reasons.items())),
    )
    return report


def nothing_kept_message(
    ingested: int, reasons: Counter[str], quarantine: list[dict], cfg: CleanConfig
) -> str | None:
    """What to tell the user when every ingested row was quarantined (None: some were kept).
    The usual cause, an allow-list that matches none of the labels, is named as such."""
    if ingested == 0 or sum(reasons.values()) < ingested:
        return None
    where = f"see {cfg.quarantine} for each row"
    not_allowed = reasons.get("label_not_allowed", 0)
    if not_allowed == ingested:
        seen = sorted({str(r["label"]) for r in quarantine if r["reason"] == "label_not_allowed"})
        shown = ", ".join(seen[:10]) + (f" (+{len(seen) - 10} more)" if len(seen) > 10 else "")
        return (
            f"no ingested label is in clean.labels ({', '.join(cfg.labels or [])}); "
            f"{ingested} rows quarantined as label_not_allowed. The data's labels: {shown}. "
            f"Set clean.labels (or clean.label_map) in params.yaml to match them; {where}."
        )
    counts = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    return f"clean kept none of the {ingested} ingested rows ({counts}); {where}."


def _staged(folder: Path) -> list[Path]:
    """A shard's staged rows, in order (one file per pass-1 batch)."""
    return sorted(folder.glob("part-*.parquet"))


def _file_batches(path: Path) -> Iterator[pa.RecordBatch]:
    return pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)


class _RowFile:
    """Fixed-size uint8 rows appended to a file, read back memory-mapped: pages are read
    (and count in the resident set) only where rows are looked at."""

    def __init__(self, row_bytes: int) -> None:
        self.row_bytes = row_bytes
        self.rows = 0
        self._path: Path | None = None
        self._file = None

    def open(self, path: Path) -> None:
        self._path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed by read() or __exit__

    def write(self, rows: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())
        self.rows += len(rows)

    def read(self) -> np.ndarray:
        self._file.close()
        if not self.rows:
            return np.empty((0, self.row_bytes), dtype=np.uint8)
        return np.memmap(self._path, np.uint8, "r", shape=(self.rows, self.row_bytes))

    def __enter__(self) -> _RowFile:
        return self

    def __exit__(self, *_: object) -> None:
        if self._file is not None:
            self._file.close()


def _concatenate(parts: list[np.ndarray], dtype, empty_shape: tuple = (0,)) -> np.ndarray:
    """np.concatenate(parts), emptying `parts` (so they are not held twice)."""
    out = np.concatenate(parts) if parts else np.empty(empty_shape, dtype=dtype)
    parts.clear()
    return out


def _where(col: dict[str, list], i: int) -> dict:
    return {"id": col["id"][i], "source": col["source"][i], "path": col["path"][i]}


def _blank_flags(pixels: list[np.ndarray], cfg: CleanConfig) -> list[bool]:
    """`is_blank` of each image, vectorised when they share a shape."""
    if not pixels:
        return []
    shape = pixels[0].shape
    if not _std_is_exactable(shape) or any(p.shape != shape for p in pixels):
        return [is_blank(p, cfg) for p in pixels]
    stds = _stds(np.stack(pixels))
    flags = stds < cfg.blank_std
    # _stds can differ from numpy's std in the last bits: decide rows that close to the
    # threshold with is_blank itself.
    for j in np.flatnonzero(np.abs(stds - cfg.blank_std) <= 1e-6 * max(1.0, cfg.blank_std)):
        flags[j] = is_blank(pixels[j], cfg)
    return flags.tolist()


def _row_numbers(pixels: list[np.ndarray], side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixel hashes, dHashes, side x side thumbnails) of kept rows, vectorised when they
    share a shape."""
    shape = pixels[0].shape
    if all(p.shape == shape for p in pixels):
        stack = np.stack(pixels)
        return (
            _pixel_hashes(pixels),
            near_duplicates.dhashes(near_duplicates.grays(stack)),
            near_duplicates.thumbnails(stack, side),
        )
    return (
        np.array([pixel_hash(p) for p in pixels], dtype=np.uint64),
        np.array([near_duplicates.dhash(p) for p in pixels], dtype=np.uint64),
        np.stack([near_duplicates.thumbnail(p, side) for p in pixels]),
    )


def _route_staged(
    staged: Iterator[pa.RecordBatch],
    out_dir: Path,
    keep: np.ndarray,
    splits: np.ndarray,
    rejections: list[Rejection | None],
    cfg: CleanConfig,
    wanted: np.ndarray,
) -> tuple[list[dict], dict[int, bytes]]:
    """Pass 2: write the staged rows (in pass-1 order) to out_dir/<split>; returns the
    quarantine rows of those not kept, in order, and the converted PNG of each `wanted`
    row (sorted pass-1 positions) by position."""
    writers = {s: _TableShards(out_dir / s, cfg.shard_rows) for s in SPLITS}
    dropped_rows: list[dict] = []
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
        for split in SPLITS:
            rows = np.flatnonzero(kept_here & (split_here == split))
            if len(rows):
                part = batch.take(pa.array(rows))
                split_column = pa.array([split] * len(rows), pa.string())
                writers[split].write(part.set_column(SPLIT_COLUMN, "split", split_column))
        dropped = np.flatnonzero(~kept_here)
        if len(dropped):
            part = batch.take(pa.array(dropped))
            col = {c: part.column(c).to_pylist() for c in ("id", "source", "path", "label")}
            for k, i in enumerate(dropped.tolist()):
                rejection = rejections[position + i]
                dropped_rows.append(
                    _where(col, k)
                    | {
                        "label": col["label"][k],
                        "reason": rejection.reason,
                        "detail": rejection.detail,
                    }
                )
        position += n
    for writer in writers.values():
        writer.close()
    return dropped_rows, images


def _sheet_pairs(ids: np.ndarray, rejections: list[Rejection | None], limit: int) -> np.ndarray:
    """(k, 2) pass-1 positions (removed, kept) of the first `limit` near-duplicates in
    the order of the removed rows' ids: what reports/near_duplicates.png shows."""
    removed = [j for j, r in enumerate(rejections) if r is not None and r.keeper is not None]
    removed.sort(key=lambda j: ids[j])
    pairs = [(j, rejections[j].keeper) for j in removed[:limit]]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _write_sheet(path: Path, pairs: np.ndarray, images: dict[int, bytes]) -> None:
    """The near-duplicate sheet (`near_duplicates.sheet`) of `pairs`, written atomically."""

    def pixels(row: int) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(images[row])))

    image = near_duplicates.sheet([(pixels(j), pixels(i)) for j, i in pairs.tolist()])
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


def _kept_metadata(out_dir: Path) -> pd.DataFrame:
    import pandas as pd

    columns = ["id", "label", "split", "source", "parent_id", "height", "width", "channels"]
    tables = [read_columns(out_dir / s, columns) for s in SPLITS]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pd.DataFrame(columns=columns)
    # One conversion of the concatenated table: the frame pd.concat of one frame per split
    # gives, without holding both.
    return pa.concat_tables(tables).to_pandas()


def _report(
    cfg: CleanConfig,
    ingested: int,
    kept: pd.DataFrame,
    reasons: Counter[str],
    converted: Counter[str],
) -> dict:
    per_class = {  # grouping the split column alone: no copy of the whole frame per class
        str(label): {s: int((split == s).sum()) for s in SPLITS} | {"total": len(split)}
        for label, split in kept.groupby("label", sort=True)["split"]
    }
    quarantined = dict(sorted(reasons.items()))
    report = {
        "ingested": ingested,
        "kept": len(kept),
        "quarantined": quarantined,
        "quarantined_total": sum(quarantined.values()),
        "per_class": per_class,
        "per_split": {s: int((kept["split"] == s).sum()) for s in SPLITS},
        "converted": dict(converted),
        "image": {"height": cfg.image_size, "width": cfg.image_size, "channels": cfg.channels},
    }
    assert report["ingested"] == report["kept"] + report["quarantined_total"], report
    return report


SHARDING = StageSpec(
    stage="clean",
    config=lambda params: params.clean,
    plan=plan_clean,
    run_shard=run_clean_shard,
    merge=merge_clean,
)


def run_stage(params: Params) -> dict:
    """The DVC stage: reuse the shards the flow computed beforehand, compute the rest."""
    return run_inline(SHARDING, params)
