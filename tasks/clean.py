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
  near_duplicate      dHash within clean.near_duplicate_distance bits of a kept row, and
                      8x8 thumbnails within clean.near_duplicate_difference

Two passes keep memory bounded: pass 1 streams the ingested shards, decodes each image
once, writes the converted PNG to a staging area and keeps only a few numbers per row;
the duplicate and split decisions are made on those numbers; pass 2 streams the staged
rows into `train/`, `val/` and `test/`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from synthloop.config import CleanConfig
from synthloop.dataset import (
    IMAGE_SCHEMA,
    QUARANTINE_SCHEMA,
    ShardWriter,
    atomic_dir,
    iter_batches,
    read_columns,
    remove_stale_temporaries,
    write_json,
    write_table,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
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


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """An 8x8 grey thumbnail (64 bytes): what near-duplicate checks compare."""
    gray = pixels if pixels.ndim == 2 else pixels.mean(axis=2).astype(np.uint8)
    if gray.shape == (8, 8):
        return gray.ravel()
    return np.asarray(Image.fromarray(gray).resize((8, 8), Image.Resampling.BOX)).ravel()


def dhash(pixels: np.ndarray) -> int:
    """64-bit difference hash: is each of 8x8 cells brighter than its right neighbour."""
    gray = pixels if pixels.ndim == 2 else pixels.mean(axis=2).astype(np.uint8)
    small = np.asarray(Image.fromarray(gray).resize((9, 8), Image.Resampling.BILINEAR), np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int(np.packbits(bits, bitorder="little").view("<u8")[0])


# --- the same per-image numbers for many same-shape images at once ----------------------
# Pass 1 computes these on chunks of rows; each equals, row by row, the per-image function
# above (tests/test_clean_rules.py checks it), only without a Python call per image.


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


def _grays(pixels: np.ndarray) -> np.ndarray:
    """(m, H, W) grey of an (m, H, W) or (m, H, W, 3) stack, as in `thumbnail`/`dhash`.

    mean(axis=2) of three uint8 values is an exact float sum / 3, and astype(uint8)
    truncates it: that is the integer sum // 3.
    """
    if pixels.ndim == 3:
        return pixels
    total = pixels[..., 0].astype(np.uint16)
    total += pixels[..., 1]
    total += pixels[..., 2]
    total //= 3
    return total.astype(np.uint8)


def _resize_many(gray: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize each (H, W) image of an (m, H, W) uint8 stack to `size` (w, h), equal to
    `Image.fromarray(gray[i]).resize(size, resample)` for every i.

    Pillow resamples in two separable passes, horizontal then vertical, rounding to uint8
    in between, with coefficients that depend only on the sizes. So the horizontal pass is
    run on the images stacked vertically (rows are filtered independently) and the vertical
    pass on them side by side (columns are filtered independently).
    """
    m, h, w = gray.shape
    out_w, out_h = size
    if (w, h) == (out_w, out_h):
        return gray.copy()
    out = gray
    if out_w != w:
        tall = Image.fromarray(np.ascontiguousarray(out.reshape(m * h, w)))
        out = _array(tall.resize((out_w, m * h), resample)).reshape(m, h, out_w)
    if out_h != h:
        wide = np.ascontiguousarray(out.transpose(1, 0, 2)).reshape(h, m * out_w)
        wide = _array(Image.fromarray(wide).resize((m * out_w, out_h), resample))
        out = wide.reshape(out_h, m, out_w).transpose(1, 0, 2)
    return np.ascontiguousarray(out)


def _array(image: Image.Image) -> np.ndarray:
    width, height = image.size
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(height, width)


def _thumbnails(gray: np.ndarray) -> np.ndarray:
    """(m, 64) uint8: `thumbnail` of each image."""
    return _resize_many(gray, (8, 8), Image.Resampling.BOX).reshape(len(gray), 64)


def _dhashes(gray: np.ndarray) -> np.ndarray:
    """(m,) uint64: `dhash` of each image."""
    small = _resize_many(gray, (9, 8), Image.Resampling.BILINEAR).astype(np.int16)
    bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(gray), 64)
    return np.packbits(bits, axis=1, bitorder="little").view("<u8").ravel()


def _pixel_hashes(pixels: list[np.ndarray]) -> np.ndarray:
    """(m,) uint64: `pixel_hash` of each image."""
    digests = b"".join(
        hashlib.blake2b(p.tobytes(), digest_size=8, person=bytes(p.shape[:3])).digest()
        for p in pixels
    )
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


# --- whole-dataset rules (pure functions over arrays) -----------------------------------


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """All pairs (i, j), i < j, whose 64-bit hashes differ in at most `max_distance` bits.

    Multi-index hashing: split the hash into max_distance + 1 chunks; two hashes that close
    agree exactly on at least one chunk (pigeonhole), so only rows sharing a chunk value are
    compared. Returns an (n_pairs, 2) int64 array.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n_chunks = max_distance + 1
    bounds = np.linspace(0, 64, n_chunks + 1).astype(int)
    found: list[np.ndarray] = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        mask = np.uint64((1 << (hi - lo)) - 1)
        keys = (hashes >> np.uint64(lo)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        sizes = ends - starts
        # Buckets of up to _SMALL_BUCKET rows: all their pairs at once, grouped by size.
        for size in np.unique(sizes[(sizes > 1) & (sizes <= _SMALL_BUCKET)]):
            found.extend(
                _bucket_pairs(order, starts[sizes == size], int(size), hashes, max_distance)
            )
        for start, end in zip(
            starts[sizes > _SMALL_BUCKET], ends[sizes > _SMALL_BUCKET], strict=True
        ):
            found.append(_close_pairs(order[start:end], hashes, max_distance))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


_SMALL_BUCKET = 128  # larger buckets go through _close_pairs, a block at a time
_PAIRS_PER_STEP = 1 << 20  # bounds the candidate pairs _bucket_pairs holds at once


def _bucket_pairs(
    order: np.ndarray, starts: np.ndarray, size: int, hashes: np.ndarray, max_distance: int
) -> list[np.ndarray]:
    """`_close_pairs` of every bucket `order[start : start + size]`, buckets of one size at
    a time: the same pairs, (smaller index, larger index), without a call per bucket."""
    first, second = np.triu_indices(size, 1)
    out = []
    step = max(1, _PAIRS_PER_STEP // len(first))
    for lo in range(0, len(starts), step):
        base = starts[lo : lo + step, None]
        a = order[base + first].ravel()
        b = order[base + second].ravel()
        close = np.bitwise_count(hashes[a] ^ hashes[b]) <= max_distance
        a, b = a[close], b[close]
        out.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.int64))
    return out


def _close_pairs(members: np.ndarray, hashes: np.ndarray, max_distance: int) -> np.ndarray:
    members = np.sort(members)
    out = []
    block = 2048  # bounds the distance matrix of a large bucket to block x bucket
    for lo in range(0, len(members), block):
        rows = members[lo : lo + block]
        later = members[lo:]  # members before `lo` are smaller than every row: never a pair
        dist = np.bitwise_count(hashes[rows, None] ^ hashes[None, later])
        i, j = np.nonzero((dist <= max_distance) & (rows[:, None] < later[None, :]))
        out.append(np.stack([rows[i], later[j]], axis=1))
    return np.concatenate(out).astype(np.int64)


def resolve_duplicates(
    ids: np.ndarray,
    labels: np.ndarray,
    pixel_hashes: np.ndarray,
    dhashes: np.ndarray,
    thumbnails: np.ndarray,
    max_distance: int,
    max_difference: float,
) -> tuple[np.ndarray, list[Rejection | None]]:
    """Decide which rows survive de-duplication.

    Near-duplicates: dHashes within `max_distance` bits propose a pair; their 8x8 thumbnails
    differing by at most `max_difference` (mean absolute, 0-255) confirm it. A hash alone
    is too coarse for tiny images: distinct 8x8 digits often share a dHash.
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
    pairs = near_duplicate_pairs(dhashes[survivors], max_distance)
    if len(pairs):
        a = thumbnails[survivors[pairs[:, 0]]].astype(np.int16)
        b = thumbnails[survivors[pairs[:, 1]]].astype(np.int16)
        pairs = pairs[np.abs(a - b).mean(axis=1) <= max_difference]
    if len(pairs):
        # pairs index into `survivors`, which is id-ordered, so i < j means i ranks first.
        pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]
        kept_rank = np.ones(len(survivors), dtype=bool)
        for i, j in pairs:
            if kept_rank[i] and kept_rank[j]:
                kept_rank[j] = False
                row = survivors[j]
                keep[row] = False
                rejections[row] = Rejection(
                    "near_duplicate", f"within {max_distance} dHash bits of {ids[survivors[i]]}"
                )
    return keep, rejections


def assign_splits(
    ids: np.ndarray, labels: np.ndarray, fractions: dict[str, float], seed: int
) -> np.ndarray:
    """Deterministic stratified split: within each class, rows ordered by a seeded hash of
    their id; the first share goes to val, the next to test, the rest to train."""
    keys = np.array(
        [hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).hexdigest() for i in ids]
    )
    splits = np.empty(len(ids), dtype=object)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rows = rows[np.argsort(keys[rows], kind="stable")]
        n_val = int(round(len(rows) * fractions["val"]))
        n_test = int(round(len(rows) * fractions["test"]))
        splits[rows[:n_val]] = "val"
        splits[rows[n_val : n_val + n_test]] = "test"
        splits[rows[n_val + n_test :]] = "train"
    return splits


# --- the stage ---------------------------------------------------------------------------


def run_clean(cfg: CleanConfig, validate: bool = True) -> dict:
    """Clean `cfg.input` into `cfg.output/{train,val,test}`; returns the report it writes."""
    remove_stale_temporaries(cfg.output)
    quarantine: list[dict] = []
    reasons: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    ingested = 0

    def reject(row: dict, label: str | None, rejection: Rejection) -> None:
        reasons[rejection.reason] += 1
        quarantine.append(
            {
                "id": row["id"],
                "source": row["source"],
                "path": row["path"],
                "label": label,
                "reason": rejection.reason,
                "detail": rejection.detail,
            }
        )

    ids: list[str] = []
    labels: list[str] = []
    # Per kept row, in chunks: the numbers the whole-dataset rules need.
    pixel_hashes: list[np.ndarray] = []  # (m,) uint64
    dhashes: list[np.ndarray] = []  # (m,) uint64
    thumbnails: list[np.ndarray] = []  # (m, 64) uint8
    mapped: dict[str | None, str | Rejection | None] = {}  # map_label is pure: once per label
    pixel_bytes = cfg.image_size * cfg.image_size * cfg.channels
    chunk_rows = max(1, min(4096, (8 << 20) // pixel_bytes))  # bounds a chunk's pixels
    with atomic_dir(cfg.output) as out_dir:
        staging = out_dir / "_staging"
        with ShardWriter(staging, IMAGE_SCHEMA, cfg.shard_rows) as staged:
            # Pass 1: decode each image once; keep only ids and hashes in memory.
            columns = ["id", "label", "source", "path", "image"]
            for batch in iter_batches(cfg.input, columns=columns):
                col = {name: batch.column(name).to_pylist() for name in columns}
                for lo in range(0, batch.num_rows, chunk_rows):
                    hi = min(lo + chunk_rows, batch.num_rows)
                    ingested += hi - lo
                    # Per row: label, then decode-verify and convert.
                    outcome: list[tuple[str | None, Converted | Rejection]] = []
                    for i in range(lo, hi):
                        raw = col["label"][i]
                        label = (
                            mapped[raw]
                            if raw in mapped
                            else mapped.setdefault(raw, map_label(raw, cfg))
                        )
                        if isinstance(label, Rejection):
                            outcome.append((raw, label))
                        else:
                            outcome.append((label, convert_image(col["image"][i], cfg)))
                    decoded = [r.pixels for _, r in outcome if isinstance(r, Converted)]
                    blank = iter(_blank_flags(decoded, cfg))
                    kept: list[int] = []
                    kept_labels: list[str] = []
                    kept_png: list[bytes] = []
                    kept_pixels: list[np.ndarray] = []
                    for i, (label, result) in zip(range(lo, hi), outcome, strict=True):
                        if isinstance(result, Rejection):
                            reject(_where(col, i), label, result)
                            continue
                        if next(blank):
                            detail = f"std {result.pixels.std():.2f}"
                            reject(_where(col, i), label, Rejection("blank", detail))
                            continue
                        converted["resized"] += result.resized
                        converted["channels_converted"] += result.mode_changed
                        kept.append(i)
                        kept_labels.append(label)
                        kept_png.append(result.png)
                        kept_pixels.append(result.pixels)
                    if kept:
                        m = len(kept)
                        kept_ids = [col["id"][i] for i in kept]
                        ids.extend(kept_ids)
                        labels.extend(kept_labels)
                        staged.extend(
                            {
                                "id": kept_ids,
                                "label": kept_labels,
                                "source": [col["source"][i] for i in kept],
                                "path": [col["path"][i] for i in kept],
                                "image": kept_png,
                                "height": [cfg.image_size] * m,
                                "width": [cfg.image_size] * m,
                                "channels": [cfg.channels] * m,
                            },
                            m,
                        )
                        numbers = _row_numbers(kept_pixels)
                        pixel_hashes.append(numbers[0])
                        dhashes.append(numbers[1])
                        thumbnails.append(numbers[2])

        id_array = np.array(ids, dtype=object)
        label_array = np.array(labels, dtype=object)
        keep, dup_rejections = resolve_duplicates(
            id_array,
            label_array,
            np.concatenate(pixel_hashes) if ids else np.empty(0, dtype=np.uint64),
            np.concatenate(dhashes) if ids else np.empty(0, dtype=np.uint64),
            np.concatenate(thumbnails) if ids else np.empty((0, 64), dtype=np.uint8),
            cfg.near_duplicate_distance,
            cfg.near_duplicate_difference,
        )
        splits = np.empty(len(ids), dtype=object)
        splits[keep] = assign_splits(
            id_array[keep], label_array[keep], cfg.split.fractions(), cfg.seed
        )

        # Pass 2: route the staged rows, already in pass-1 order, to their split.
        writers = {s: ShardWriter(out_dir / s, IMAGE_SCHEMA, cfg.shard_rows) for s in SPLITS}
        position = 0
        for batch in iter_batches(staging):
            n = batch.num_rows
            col = {name: batch.column(name).to_pylist() for name in batch.schema.names}
            kept_here = keep[position : position + n]
            split_here = splits[position : position + n]
            for split in SPLITS:
                rows = np.flatnonzero(kept_here & (split_here == split)).tolist()
                if rows:
                    part = {name: [values[i] for i in rows] for name, values in col.items()}
                    part["split"] = [split] * len(rows)
                    writers[split].extend(part, len(rows))
            for i in np.flatnonzero(~kept_here).tolist():
                reject(_where(col, i), col["label"][i], dup_rejections[position + i])
            position += n
        for writer in writers.values():
            writer.close()
        shutil.rmtree(staging)

        kept_meta = _kept_metadata(out_dir)
        report = _report(cfg, ingested, kept_meta, reasons, converted)
        if validate:
            from tasks.expectations import raise_on_critical, validate_clean_dataset

            known = cfg.labels if cfg.labels is not None else sorted(set(label_array[keep]))
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
        write_table(cfg.quarantine, quarantine, QUARANTINE_SCHEMA)
        write_json(cfg.report, report)
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


def _row_numbers(pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixel hashes, dHashes, thumbnails) of kept rows, vectorised when they share a shape."""
    shape = pixels[0].shape
    if all(p.shape == shape for p in pixels):
        gray = _grays(np.stack(pixels))
        return _pixel_hashes(pixels), _dhashes(gray), _thumbnails(gray)
    return (
        np.array([pixel_hash(p) for p in pixels], dtype=np.uint64),
        np.array([dhash(p) for p in pixels], dtype=np.uint64),
        np.array([thumbnail(p) for p in pixels], dtype=np.uint8).reshape(-1, 64),
    )


def _kept_metadata(out_dir: Path) -> pd.DataFrame:
    columns = ["id", "label", "split", "source", "parent_id", "height", "width", "channels"]
    frames = [read_columns(out_dir / s, columns).to_pandas() for s in SPLITS]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _report(
    cfg: CleanConfig,
    ingested: int,
    kept: pd.DataFrame,
    reasons: Counter[str],
    converted: Counter[str],
) -> dict:
    per_class = {
        str(label): {s: int((group["split"] == s).sum()) for s in SPLITS} | {"total": len(group)}
        for label, group in kept.groupby("label", sort=True)
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
