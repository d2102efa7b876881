"""What the clean stage tells the user: reports/clean.json's counts, the near-duplicate
sheet, the Great Expectations validation of the kept rows, and the message when nothing was
kept.

Contract: `build_report` checks its own arithmetic (every ingested row is kept or
quarantined, once). The sheet shows the first clean.near_duplicate_sheet_pairs
near-duplicates in the order of the removed rows' ids, each beside the kept image it
matched. Great Expectations is imported only when validating (seconds): a caller that
started the import in the background (`workers.start_gx_import`) hands its thread in.
"""

from __future__ import annotations

import io
import os
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from PIL import Image

from synthloop.config import CleanConfig
from synthloop.dataset import atomic_file, read_columns
from tasks import near_duplicates
from tasks.clean.rules import Rejection
from tasks.clean.splits import SPLITS

if TYPE_CHECKING:
    import pandas as pd  # imported where used: decode workers never need it (~0.3 s each)


def kept_metadata(out_dir: Path) -> pd.DataFrame:
    """The kept rows' small columns, every split, as one frame."""
    import pandas as pd

    columns = ["id", "label", "split", "source", "parent_id", "height", "width", "channels"]
    tables = [read_columns(out_dir / s, columns) for s in SPLITS]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pd.DataFrame(columns=columns)
    # One conversion of the concatenated table: the frame pd.concat of one frame per split
    # gives, without holding both.
    return pa.concat_tables(tables).to_pandas()


def build_report(
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


def validate_kept(
    cfg: CleanConfig,
    kept: pd.DataFrame,
    known_labels: list[str],
    gx_import: threading.Thread | None,
) -> dict:
    """The expectations' results on the kept rows (Data Docs written to clean.data_docs,
    their path made relative to the report's folder); raises nothing on a failed one."""
    if gx_import is not None:
        gx_import.join()
    from tasks.expectations import validate_clean_dataset

    expectations = validate_clean_dataset(
        kept,
        known_labels=known_labels,
        height=cfg.image_size,
        width=cfg.image_size,
        channels=cfg.channels,
        split_fractions=cfg.split.fractions(),
        split_tolerance=cfg.split_tolerance,
        min_class_count=cfg.min_class_count,
        docs_dir=cfg.data_docs,
    )
    expectations["data_docs"] = os.path.relpath(expectations["data_docs"], cfg.report.parent)
    return expectations


def raise_on_critical(expectations: dict) -> None:
    """Fail the stage on a failed critical expectation (tasks/expectations.py says which)."""
    from tasks.expectations import raise_on_critical

    raise_on_critical(expectations)


def sheet_pairs(ids: np.ndarray, rejections: list[Rejection | None], limit: int) -> np.ndarray:
    """(k, 2) pass-1 positions (removed, kept) of the first `limit` near-duplicates in
    the order of the removed rows' ids: what reports/near_duplicates.png shows."""
    removed = [j for j, r in enumerate(rejections) if r is not None and r.keeper is not None]
    removed.sort(key=lambda j: ids[j])
    pairs = [(j, rejections[j].keeper) for j in removed[:limit]]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def write_sheet(path: Path, pairs: np.ndarray, images: dict[int, bytes]) -> None:
    """The near-duplicate sheet (`near_duplicates.sheet`) of `pairs`, written atomically."""

    def pixels(row: int) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(images[row])))

    image = near_duplicates.sheet([(pixels(j), pixels(i)) for j, i in pairs.tolist()])
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
