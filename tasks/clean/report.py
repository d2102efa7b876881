"""What the clean stage tells the user: reports/clean.json's counts, the near-duplicate
sheet, the Great Expectations validation of the kept rows, and the message when nothing was
kept.

Contract: `build_report` checks its own arithmetic (every ingested row is kept or
quarantined, once) and gives each class its train/val/test counts and the accuracy points
one of its test images is worth (`points_per_test_image`: the resolution the split leaves).
The sheet shows the first clean.near_duplicate_sheet_pairs near-duplicates in the order of
the removed rows' ids, each beside the kept image it matched. The kept rows are read back
from the split folders as streams, never as one frame: counted for the report
(`kept_counts`) and validated in frames of at most EXPECTATION_ROWS rows (`kept_batches`),
so memory does not grow with the dataset. Great Expectations is imported only when
validating (seconds): a caller that started the import in the background
(`workers.start_gx_import`) hands its thread in.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import tasks.clean.sheet as near_duplicate_sheet
from synthloop.config import CleanConfig
from synthloop.dataset import atomic_file, shard_paths
from tasks.clean.rules import Rejection
from tasks.clean.splits import SPLITS

if TYPE_CHECKING:
    import pandas as pd  # imported where used: decode workers never need it (~0.3 s each)


# The most kept rows Great Expectations validates as one batch: its frame is what validation
# holds in memory, whatever the dataset's size.
EXPECTATION_ROWS = 100_000
KEPT_COLUMNS = ["id", "label", "split", "source", "parent_id", "height", "width", "channels"]


def kept_counts(out_dir: Path) -> Counter[tuple[str, str]]:
    """(label, split) -> kept rows, counted from the split folders' rows (streamed)."""
    counts: Counter[tuple[str, str]] = Counter()
    for path in _kept_files(out_dir):
        for batch in pq.ParquetFile(path).iter_batches(columns=["label", "split"]):
            groups = pa.Table.from_batches([batch]).group_by(["label", "split"])
            for row in groups.aggregate([([], "count_all")]).to_pylist():
                counts[(row["label"], row["split"])] += row["count_all"]
    return counts


def kept_batches(out_dir: Path, spill: Path) -> Iterator[pd.DataFrame]:
    """The kept rows' KEPT_COLUMNS, every split, as frames of about EXPECTATION_ROWS rows.

    More kept rows than that are spread over ceil(rows / EXPECTATION_ROWS) frames by a hash
    of the id (so each id, and every copy of it, is in one frame: uniqueness within each
    frame is uniqueness over all), through one Parquet file per frame under `spill`, which
    is removed once read."""
    import pandas as pd

    files = _kept_files(out_dir)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    parts = max(1, math.ceil(rows / EXPECTATION_ROWS))
    if parts == 1:
        tables = [pq.read_table(p, columns=KEPT_COLUMNS) for p in files]
        yield pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=KEPT_COLUMNS)
        return
    spill.mkdir()
    try:
        paths = [spill / f"part-{k:05d}.parquet" for k in range(parts)]
        writers: dict[int, pq.ParquetWriter] = {}
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(columns=KEPT_COLUMNS):
                ids = batch.column("id").to_numpy(zero_copy_only=False)
                part = pd.util.hash_array(ids, categorize=False) % parts
                for k in np.unique(part).tolist():
                    if k not in writers:
                        writers[k] = pq.ParquetWriter(paths[k], batch.schema)
                    writers[k].write_batch(batch.take(pa.array(np.flatnonzero(part == k))))
        for writer in writers.values():
            writer.close()
        for k in sorted(writers):
            frame = pq.read_table(paths[k]).to_pandas()
            paths[k].unlink()
            yield frame
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _kept_files(out_dir: Path) -> list[Path]:
    return [p for s in SPLITS for p in shard_paths(out_dir / s)]


def build_report(
    cfg: CleanConfig,
    ingested: int,
    kept: Counter[tuple[str, str]],
    reasons: Counter[str],
    converted: Counter[str],
) -> dict:
    """reports/clean.json's content; `kept` counts the kept rows by (label, split). Per
    class: its train, val and test rows, their total, and `points_per_test_image`, the
    accuracy points one test image is worth (100 / test rows; None without test rows): the
    resolution the split leaves for judging that class."""
    labels = sorted({label for label, _ in kept})
    per_class = {
        str(label): {s: kept[(label, s)] for s in SPLITS}
        | {
            "total": sum(kept[(label, s)] for s in SPLITS),
            "points_per_test_image": points_per_test_image(kept[(label, "test")]),
        }
        for label in labels
    }
    quarantined = dict(sorted(reasons.items()))
    report = {
        "ingested": ingested,
        "kept": sum(kept.values()),
        "quarantined": quarantined,
        "quarantined_total": sum(quarantined.values()),
        "per_class": per_class,
        "per_split": {s: sum(n for (_, split), n in kept.items() if split == s) for s in SPLITS},
        "converted": dict(converted),
        "image": {"height": cfg.image_size, "width": cfg.image_size, "channels": cfg.channels},
    }
    assert report["ingested"] == report["kept"] + report["quarantined_total"], report
    return report


def points_per_test_image(test_rows: int) -> float | None:
    """Accuracy points (of 100) that one of `test_rows` test images is worth."""
    return round(100 / test_rows, 2) if test_rows else None


def nothing_kept_message(
    ingested: int, reasons: Counter[str], not_allowed_labels: set[str], cfg: CleanConfig
) -> str | None:
    """What to tell the user when every ingested row was quarantined (None: some were kept).
    The usual cause, an allow-list that matches none of the labels, is named as such."""
    if ingested == 0 or sum(reasons.values()) < ingested:
        return None
    where = f"see {cfg.quarantine} for each row"
    not_allowed = reasons.get("label_not_allowed", 0)
    if not_allowed == ingested:
        seen = sorted(not_allowed_labels)
        shown = ", ".join(seen[:10]) + (f" (+{len(seen) - 10} more)" if len(seen) > 10 else "")
        return (
            f"no ingested label is in clean.labels ({', '.join(cfg.labels or [])}); "
            f"{ingested} rows quarantined as label_not_allowed. The data's labels: {shown}. "
            f"Set clean.labels (or clean.label_map) in params.yaml to match them; {where}."
        )
    counts = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    return f"clean kept none of the {ingested} ingested rows ({counts}); {where}."


def validate_kept(
    cfg: CleanConfig,
    kept: Iterable[pd.DataFrame],
    known_labels: list[str],
    gx_import: threading.Thread | None,
) -> dict:
    """The expectations' results on the kept rows (`kept_batches`; Data Docs written to
    clean.data_docs, their path made relative to the report's folder); raises nothing on a
    failed one."""
    if gx_import is not None:
        gx_import.join()
    from tasks.shared.expectations import CleanExpectations, validate_clean_dataset

    spec = CleanExpectations(
        known_labels=known_labels,
        height=cfg.image_size,
        width=cfg.image_size,
        channels=cfg.channels,
        split_fractions=cfg.split.fractions(),
        split_tolerance=cfg.split_tolerance,
        min_class_count=cfg.min_class_count,
    )
    expectations = validate_clean_dataset(kept, spec, cfg.data_docs)
    expectations["data_docs"] = os.path.relpath(expectations["data_docs"], cfg.report.parent)
    return expectations


def raise_on_critical(expectations: dict) -> None:
    """Fail the stage on a failed critical expectation (tasks/shared/expectations.py says which)."""
    from tasks.shared.expectations import raise_on_critical

    raise_on_critical(expectations)


def sheet_pairs(ids: np.ndarray, rejections: list[Rejection | None], limit: int) -> np.ndarray:
    """(k, 2) pass-1 positions (removed, kept) of the first `limit` near-duplicates in
    the order of the removed rows' ids: what reports/near_duplicates.png shows."""
    removed = [j for j, r in enumerate(rejections) if r is not None and r.keeper is not None]
    removed.sort(key=lambda j: ids[j])
    pairs = [(j, rejections[j].keeper) for j in removed[:limit]]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def write_sheet(path: Path, pairs: np.ndarray, images: dict[int, bytes]) -> None:
    """The near-duplicate sheet (tasks/clean/sheet.py) of `pairs`, written atomically."""

    def pixels(row: int) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(images[row])))

    image = near_duplicate_sheet.sheet([(pixels(j), pixels(i)) for j, i in pairs.tolist()])
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
