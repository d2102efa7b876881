"""The merge: the shards' pass-1 results, in shard order, become the clean dataset.

Contract: `merge_clean(cfg, folders)` reads each shard folder (tasks/clean/stage.py writes
them: staged rows as part-*.parquet, per-image rejections as quarantine.parquet, the
`decode.NUMBERS` as .npy, the counts as shard.json) and, in named steps:

  gather    the shards' rows and numbers, in pass-1 order (shard by shard, row by row)
  decide    the whole-dataset rules on those numbers: duplicates and conflicting labels
            (rules.resolve_duplicates), then the split of every kept row (splits.py)
  route     pass 2: the staged rows into train/val/test, the dropped ones to the quarantine
            (route.py)
  conclude  the expectations, reports/clean.json, the near-duplicate sheet and the
            quarantine (report.py)

Everything lands in one `atomic_dir` of clean.output, so a failure part-way (a failed
critical expectation included) leaves the previous clean data as it was. Memory stays a few
numbers per kept row: ids as their ranks (`id_ranks`: every ordering decision is made on
them; the few id strings the rejections' details name are read back from the staged files,
`read_ids`), labels as a compact array, thumbnails in a file read back by row
(`RowReader`: only candidates' rows, none kept resident), the images streamed, the
quarantine streamed to its file (quarantine.py), and the kept rows read back in streams for
the report and the expectations (report.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synthloop.config import CleanConfig, ConfigError
from synthloop.dataset import (
    atomic_dir,
    remove_stale_temporaries,
    write_json,
)
from synthloop.sharding import cached_result
from tasks.clean.hashing import thumbnail_width
from tasks.clean.image_numbers import key_share
from tasks.clean.quarantine import QuarantineSink
from tasks.clean.report import (
    build_report,
    kept_batches,
    kept_counts,
    nothing_kept_message,
    raise_on_critical,
    sheet_pairs,
    validate_kept,
    write_sheet,
)
from tasks.clean.route import route_staged, staged_batches, staged_files
from tasks.clean.rules import Rejection, resolve_duplicates
from tasks.clean.splits import split_codes

log = logging.getLogger(__name__)


@dataclass
class Gathered:
    """The shards' pass-1 results, shard by shard: the counts, the quarantine (streamed to
    its file as it comes) and, per kept row, what the whole-dataset rules need (a part per
    shard; `_take` joins them, `id_ranks` the ids)."""

    quarantine: QuarantineSink
    ingested: int = 0
    converted: Counter[str] = field(default_factory=Counter)
    ids: list[pa.ChunkedArray] = field(default_factory=list)  # (m,) strings, until ranked
    # The staged files, in pass-1 order, with their row counts: where `read_ids` reads.
    files: list[tuple[Path, int]] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)  # (m,) int32: label_index codes
    label_index: dict[str, int] = field(default_factory=dict)  # name -> code, first met first
    numbers: dict[str, list[np.ndarray]] = field(  # (m,) uint64 each
        default_factory=lambda: {
            "split_keys": [],
            "pixel_hashes": [],
            "dhashes": [],
            "crop_dhashes": [],
        }
    )

    def label_codes(self, labels: pa.ChunkedArray) -> np.ndarray:
        """(m,) int32: each label's code in `label_index` (new names get the next codes)."""
        encoded = labels.combine_chunks().dictionary_encode()
        index = self.label_index
        names = encoded.dictionary.to_pylist()
        codes = np.array([index.setdefault(n, len(index)) for n in names], dtype=np.int32)
        return codes[encoded.indices.to_numpy()]


@dataclass(frozen=True)
class Decisions:
    """The whole-dataset decisions, per pass-1 position."""

    keep: np.ndarray  # (n,) bool
    rejections: list[Rejection | None]  # why a row is not kept
    splits: np.ndarray  # (n,) int8: an index into SPLITS where kept, -1 where not
    known_labels: list[str]  # what the expectations accept
    sheet_pairs: np.ndarray  # (k, 2) positions (removed, kept) on the near-duplicate sheet


def merge_clean(
    cfg: CleanConfig,
    folders: list[Path],
    validate: bool = True,
    gx_import: threading.Thread | None = None,
) -> dict:
    """The shards' pass-1 results in shard order, then the whole-dataset decisions
    (duplicates, conflicting labels, split), pass 2, the expectations and the report."""
    remove_stale_temporaries(cfg.output)
    # (n, thumbnail_width) uint8 thumbnails go to a file (784 B a row for 28x28 grey): only
    # near-duplicate candidates' are read back.
    thumbnails = RowFile(thumbnail_width(cfg))
    quarantine = QuarantineSink(cfg.quarantine)
    with atomic_dir(cfg.output) as out_dir, thumbnails, quarantine:
        staging = out_dir / "_staging"
        staging.mkdir()
        thumbnails.open(staging / "thumbnails.u8")  # removed with the staging area
        gathered = gather(folders, thumbnails, quarantine)
        decided = decide(cfg, gathered, thumbnails.read())
        images = route(cfg, folders, out_dir, decided, gathered)
        shutil.rmtree(staging)
        report = conclude(cfg, out_dir, gathered, decided, images, validate, gx_import)
    log.info(
        "clean: %d ingested -> %d kept, %d quarantined %s",
        gathered.ingested,
        report["kept"],
        quarantine.total,
        dict(sorted(quarantine.reasons.items())),
    )
    return report


def gather(folders: list[Path], thumbnails: RowFile, quarantine: QuarantineSink) -> Gathered:
    """Step 1: the shards' counts, quarantine rows (to `quarantine`) and per-kept-row
    numbers, in shard order; the thumbnails are appended to `thumbnails`."""
    gathered = Gathered(quarantine)
    for folder in folders:
        summary = cached_result(folder) or {}
        gathered.ingested += summary["rows"]
        quarantine.add(pq.read_table(folder / "quarantine.parquet").to_pylist())
        if not summary["kept"]:
            continue
        gathered.converted["resized"] += summary["resized"]
        gathered.converted["channels_converted"] += summary["channels_converted"]
        parts = [(p, pq.read_table(p, columns=["id", "label"])) for p in staged_files(folder)]
        gathered.files.extend((p, part.num_rows) for p, part in parts)
        kept = pa.concat_tables(part for _, part in parts)
        del parts
        gathered.ids.append(kept["id"])
        gathered.labels.append(gathered.label_codes(kept["label"]))
        for name, parts in gathered.numbers.items():
            parts.append(np.load(folder / f"{name}.npy"))
        thumbnails.write(np.load(folder / "thumbnails.npy"))
    return gathered


def decide(cfg: CleanConfig, gathered: Gathered, thumbnails: np.ndarray) -> Decisions:
    """Step 2: the whole-dataset rules on the gathered numbers (which it consumes: each is
    held once, joined); ids and labels are dropped on return, pass 2 reads them back.

    The rules order rows by the ids' ranks, not the id strings (the same decisions, with
    no string array sorted or copied); the ids the rejections' details name are read back
    from the staged files."""
    ranks = id_ranks(gathered.ids)
    gathered.ids.clear()
    import pandas as pd  # here: decode workers import this package and never need pandas

    codes = _take(gathered.labels, np.int32)
    # The labels as pandas categories: a name where the rules print one, a code a row.
    names = list(gathered.label_index)  # by code
    labels = pd.Categorical.from_codes(codes, categories=names)
    numbers = gathered.numbers
    keep, rejections = resolve_duplicates(
        ranks,
        labels,
        _take(numbers["pixel_hashes"], np.uint64),
        _take(numbers["dhashes"], np.uint64),
        thumbnails,
        cfg.near_duplicate_distance,
        cfg.near_duplicate_difference,
        cfg.near_duplicate_contrast,
        cfg.near_duplicate_local,
        names=lambda rows: read_ids(gathered.files, rows),
        crop_dhashes=_take(numbers["crop_dhashes"], np.uint64),
        crop_share=key_share(cfg.image_size),
    )
    splits = np.full(len(ranks), -1, dtype=np.int8)
    keys = _take(numbers["split_keys"], np.uint64)
    kept_codes = codes[keep]
    splits[keep] = split_codes(kept_codes, cfg.split, keys[keep])
    del keys
    seen = [names[c] for c in np.unique(kept_codes)]
    known = cfg.labels if cfg.labels is not None else sorted(seen)
    pairs = sheet_pairs(ranks, rejections, cfg.near_duplicate_sheet_pairs)
    return Decisions(keep, rejections, splits, list(known), pairs)


def route(
    cfg: CleanConfig, folders: list[Path], out_dir: Path, decided: Decisions, gathered: Gathered
) -> dict[int, bytes]:
    """Step 3, pass 2: the staged rows, in pass-1 order, into out_dir/<split>; the dropped
    ones join the quarantine. Returns the PNGs of the rows on the near-duplicate sheet.

    (Run beside the validation in a thread it saved 0.2 s at 100,000 rows, lost time at
    1,000,000 and raised the peak RSS by 100 MiB there.)"""
    return route_staged(
        staged_batches(folders),
        out_dir,
        decided.keep,
        decided.splits,
        decided.rejections,
        cfg.shard_rows,
        np.unique(decided.sheet_pairs.ravel()),
        gathered.quarantine.add,
    )


def conclude(
    cfg: CleanConfig,
    out_dir: Path,
    gathered: Gathered,
    decided: Decisions,
    images: dict[int, bytes],
    validate: bool,
    gx_import: threading.Thread | None,
) -> dict:
    """Step 4: the report (with the expectations' results when validating), the sheet and
    the quarantine, written; then raises if nothing was kept or a critical expectation
    failed (inside the merge's atomic_dir: the previous clean data stays)."""
    kept = kept_counts(out_dir)
    quarantine = gathered.quarantine
    report = build_report(cfg, gathered.ingested, kept, quarantine.reasons, gathered.converted)
    nothing_kept = nothing_kept_message(
        gathered.ingested, quarantine.reasons, quarantine.not_allowed_labels, cfg
    )
    if validate and nothing_kept is None:
        batches = kept_batches(out_dir, out_dir / "_expectations")
        report["expectations"] = validate_kept(cfg, batches, decided.known_labels, gx_import)
    write_sheet(cfg.near_duplicate_sheet, decided.sheet_pairs, images)
    report["near_duplicate_sheet"] = {
        "path": os.path.relpath(cfg.near_duplicate_sheet, cfg.report.parent),
        "pairs": len(decided.sheet_pairs),
    }
    quarantine.commit()
    write_json(cfg.report, report)
    if nothing_kept is not None:
        raise ConfigError(nothing_kept)  # the quarantine says why, row by row
    if validate:
        raise_on_critical(report["expectations"])
    return report


def id_ranks(ids: list[pa.ChunkedArray]) -> np.ndarray:
    """(n,) int64: each id's dense rank among all of `ids` (joined in order): equal ids
    share a rank, and ranks order as the ids do (by code point, as Python's str, numpy and
    pandas compare them). Arrow ranks the compact string columns as read, so no string
    array is built, copied or sorted here."""
    if not ids:
        return np.empty((0,), dtype=np.int64)
    chunks = pa.chunked_array([c for part in ids for c in part.chunks], type=ids[0].type)
    return pc.rank(chunks, sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.int64)


def read_ids(files: list[tuple[Path, int]], rows: np.ndarray) -> list[str]:
    """The ids at pass-1 positions `rows`, read back from the staged `files` ((path, row
    count) in pass-1 order): only the id column of the files that hold one of them."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.cumsum([0] + [count for _, count in files])
    out: list[str] = [""] * len(rows)
    which = np.searchsorted(starts, rows, side="right") - 1
    for f in np.unique(which).tolist():
        at = np.flatnonzero(which == f)
        column = pq.read_table(files[f][0], columns=["id"])["id"]
        for k, value in zip(
            at.tolist(), column.take(rows[at] - starts[f]).to_pylist(), strict=True
        ):
            out[k] = value
    return out


def _take(parts: list[np.ndarray], dtype) -> np.ndarray:
    """np.concatenate(parts), emptying `parts` (so they are not held twice)."""
    out = np.concatenate(parts) if parts else np.empty((0,), dtype=dtype)
    parts.clear()
    return out


class RowFile:
    """Fixed-size uint8 rows appended to a file, read back by index (`RowReader`): only the
    rows looked at are read."""

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

    def read(self) -> RowReader | np.ndarray:
        self._file.close()
        if not self.rows:
            return np.empty((0, self.row_bytes), dtype=np.uint8)
        return RowReader(self._path, (self.rows, self.row_bytes))

    def __enter__(self) -> RowFile:
        return self

    def __exit__(self, *_: object) -> None:
        if self._file is not None:
            self._file.close()


class RowReader:
    """A RowFile's rows as an (n, row_bytes) uint8 array that is only indexed by arrays of
    row numbers: `reader[rows]` reads those rows (each run of consecutive ones in one
    call) into a new array. Read, not memory-mapped: a map faults in the pages around
    every row looked at, so at 1,000,000 16x16 RGB rows a block of candidates made the
    whole 288 MB file resident (+230 MiB at the merge's peak); pages read stay in the
    page cache, not in this process."""

    def __init__(self, path: Path, shape: tuple[int, int]) -> None:
        self.path = path
        self.shape = shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        wanted, inverse = np.unique(rows, return_inverse=True)
        width = self.shape[1]
        out = np.empty((len(wanted), width), dtype=np.uint8)
        if not len(wanted):
            return out[inverse.reshape(rows.shape)]
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        starts, ends = np.r_[0, breaks], np.r_[breaks, len(wanted)]  # runs of rows
        with open(self.path, "rb", buffering=0) as fh:
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                size = os.preadv(fh.fileno(), [out[a:b]], int(wanted[a]) * width)
                if size != (b - a) * width:
                    raise OSError(f"{self.path}: short read at row {int(wanted[a])}")
        return out[inverse.reshape(rows.shape)]
