"""Fuse: merge real, augmented and accepted-synthetic rows into the training set.

Inputs, in priority order: the clean train split ("real"; its `source` column is kept),
the augmented rows ("augmented"), and the accepted-synthetic pool ("synthetic"; a missing
pool, or one without shards, is empty). Then, in this order:

  duplicate_id  an id already seen in a higher-priority source (or earlier in the same one)
  feedback      rejected in `data/feedback/`, or descended (via parent_id) from a rejected row
  cap           over the source's cap in its class: the synthetic rows' pool target, the
                augmented rows' `fuse.max_share` (below)

Feedback: every *.csv / *.parquet file in `fuse.feedback` (listed by
`tasks.shared.feedback.feedback_files`, which refuses a file that resolves outside that folder;
a missing or empty folder is fine) with
columns `id, verdict`; a file with only `label, extra` holds per-class requests for the
generator and is skipped here, any other file without `id, verdict` is an error. `reject`
removes that row from whichever source holds it, and every row whose parent_id chain leads
to it (an augmented copy of a rejected image goes too); `accept` is valid and changes
nothing. A row with an empty verdict but a `label`/`extra` value is a per-class request and
is ignored too. Anything else (an unknown id, an unknown or empty verdict) is listed under
`problems` in the report with its file and row (1 = the first data row); the valid rows
still apply.

Caps: the synthetic rows of a class are capped at its pool target, `tasks.shared.pool.pool_targets`
over the clean train split's rows per class (`loop.target_per_class`; proportional:
floor(m * R), auto: min(floor(m * R), R_max - R), with m = `loop.synthetic_multiple`, R the
class's real rows, R_max the largest class's; 0 for a class without real rows), the number
at which promotion stops the class growing, so fuse mixes in every pooled row (feedback
aside) while the targets stand. A source in
`fuse.max_share` (the augmented rows; a synthetic share is refused by the config) is capped
by its share: with R real rows in a class and the kept augmented/synthetic rows k_s, every
capped source s must satisfy k_s <= share_s * (R + sum of k), i.e. k_s <= share_s / (1 -
share_s) * (R + the other sources' k). Fuse keeps the component-wise largest counts meeting
all bounds at once: starting from every available row (synthetic: at most the target), it
applies k_s <- min(available_s, floor(share_s / (1 - share_s) * (R + sum_{o != s} k_o)))
until nothing changes. The map is monotone, so this stops at the greatest fixed point, which
holds every bound and is at least as large as any other choice that does; shares are read as
exact decimals, so 0.4 means 2/5. No share cuts the synthetic rows: a class keeps
min(its pooled rows, its target); with the defaults (m = 1, augmented 0.4) real rows stay at
least 30% of a class. Which rows stay under a cap: the first k_s by blake2b("seed:id"),
deterministic and independent of file order.

All sources must share one image size and channel count. Nothing is decoded: rows stream
through as PNG bytes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from fractions import Fraction
from math import floor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from synthloop.config import FuseConfig, LoopConfig, Params
from synthloop.dataset import (
    IMAGE_SCHEMA,
    ShardWriter,
    atomic_dir,
    iter_batches,
    read_columns,
    remove_stale_temporaries,
    shard_paths,
    write_json,
)
from tasks.shared.feedback import feedback_files, read_requests
from tasks.shared.pool import pool_targets

log = logging.getLogger(__name__)

SOURCES = ("real", "augmented", "synthetic")  # priority order for duplicate ids
META_COLUMNS = ["id", "label", "parent_id", "height", "width", "channels"]
VERDICTS = {"accept", "reject"}
REQUEST_COLUMNS = ("label", "extra")  # per-class generation requests share the files
MAX_LISTED_PROBLEMS = 1000  # the report counts them all but lists only this many


@dataclass(frozen=True)
class Feedback:
    files: list[str]
    rows: pd.DataFrame  # file, row, id, verdict, request


# --- pure functions -----------------------------------------------------------------------


def share_caps(real: int, available: dict[str, int], shares: dict[str, float]) -> dict[str, int]:
    """The largest kept count per source with k_s <= share_s * (real + sum k) for capped s."""
    ratio = {s: Fraction(str(shares[s])) / (1 - Fraction(str(shares[s]))) for s in shares}
    kept = dict(available)
    while True:
        total = real + sum(kept.values())
        new = {
            s: min(n, floor(ratio[s] * (total - kept[s]))) if s in ratio else n
            for s, n in available.items()
        }
        if new == kept:
            return kept
        kept = new


def rank_keys(ids: pd.Series, seed: int) -> pd.Series:
    """Seeded, order-independent keys: which capped rows stay."""
    return ids.map(lambda i: hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).hexdigest())


def descendants_mask(ids: pd.Series, parents: pd.Series, rejected: set[str]) -> pd.Series:
    """Rows that are rejected or whose parent_id chain reaches a rejected row."""
    removed = ids.isin(rejected)
    while True:
        grown = removed | parents.isin(set(ids[removed]))
        if grown.equals(removed):
            return removed
        removed = grown


def check_feedback(feedback: pd.DataFrame, known_ids: set[str]) -> tuple[set[str], list[dict]]:
    """Split feedback rows into the ids to reject and the problems to report."""
    rejected: set[str] = set()
    problems: list[dict] = []
    for row in feedback.itertuples(index=False):
        if row.verdict == "" and row.request:
            continue  # a per-class request, not a verdict on a row
        reason = None
        if row.verdict not in VERDICTS:
            shown = repr(row.verdict) if row.verdict else "empty"
            reason = f"unknown verdict {shown} (expected one of {sorted(VERDICTS)})"
        elif not row.id:
            reason = "empty id"
        elif row.id not in known_ids:
            reason = "unknown id: in none of the fused sources"
        if reason is not None:
            problems.append(
                {
                    "file": row.file,
                    "row": row.row,
                    "id": row.id,
                    "verdict": row.verdict,
                    "reason": reason,
                }
            )
        elif row.verdict == "reject":
            rejected.add(row.id)
    return rejected, problems


def check_sizes(frames: dict[str, pd.DataFrame], paths: dict[str, Path]) -> dict[str, int]:
    """One height, width and channel count across every source, else a clear error."""
    sizes = {
        name: sorted(set(zip(f.height, f.width, f.channels, strict=True)))
        for name, f in frames.items()
        if len(f)
    }
    distinct = set().union(*sizes.values())
    if len(distinct) > 1:
        found = "; ".join(
            f"{name} ({paths[name]}): " + ", ".join(f"{h}x{w} with {c} channel(s)" for h, w, c in s)
            for name, s in sizes.items()
        )
        raise ValueError(
            f"fuse: all sources must share one image size and channel count; found {found}. "
            "A pool made from earlier data (another image size) goes with `synthloop pool "
            "reset` (or `synthloop pool retire SHARD --reason TEXT`); `synthloop run` "
            "retires it itself when the real data changed beyond loop.drift_threshold. "
            "Regenerate any other odd source with the current clean.image_size and "
            "clean.channels (`dvc repro`)."
        )
    ((height, width, channels),) = distinct
    return {"height": int(height), "width": int(width), "channels": int(channels)}


# --- IO -------------------------------------------------------------------------------------


def read_meta(directory: Path, optional: bool) -> pd.DataFrame:
    """The small columns of a dataset; an optional one may be missing or have no shards."""
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in META_COLUMNS})
    if optional and not Path(directory).is_dir():
        return empty
    paths = shard_paths(directory)
    if not paths:
        return empty
    missing = [c for c in IMAGE_SCHEMA.names if c not in pq.read_schema(paths[0]).names]
    if missing:
        raise ValueError(f"fuse: {paths[0]}: missing the image column(s) {missing}")
    return read_columns(directory, META_COLUMNS).to_pandas()


def read_feedback(directory: Path) -> Feedback:
    """Every feedback file's rows as strings; a file without id/verdict is an error."""
    columns = ["file", "row", "id", "verdict", "request"]
    directory = Path(directory)
    if not directory.exists():
        return Feedback([], pd.DataFrame(columns=columns))
    if not directory.is_dir():
        raise ValueError(f"fuse: {directory}: fuse.feedback must be a directory of CSV/Parquet")
    files = feedback_files(directory)
    frames = []
    for path in files:
        try:
            if path.suffix.lower() == ".csv":
                table = pd.read_csv(path, dtype=str, keep_default_na=False)
            else:
                table = pd.read_parquet(path)
        except Exception as err:  # a parser's own error types vary; name the file
            raise ValueError(f"fuse: {path}: not a readable feedback file: {err}") from err
        table.columns = [str(c).strip().lower() for c in table.columns]
        missing = [c for c in ("id", "verdict") if c not in table.columns]
        if missing and set(REQUEST_COLUMNS) <= set(table.columns):
            table = table.assign(id="", verdict="")  # a file of per-class requests only
        elif missing:
            raise ValueError(
                f"fuse: {path}: a feedback file needs the columns id and verdict; missing "
                f"{missing}, found {list(table.columns)}"
            )
        text = {c: table[c].fillna("").astype(str).str.strip() for c in table.columns}
        request = pd.Series(False, index=table.index)
        for c in REQUEST_COLUMNS:
            if c in text:
                request |= text[c] != ""
        frames.append(
            pd.DataFrame(
                {
                    "file": path.name,
                    "row": np.arange(1, len(table) + 1),
                    "id": text["id"],
                    "verdict": text["verdict"].str.lower(),
                    "request": request,
                }
            )
        )
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return Feedback([p.name for p in files], rows)


# --- the stage ------------------------------------------------------------------------------


def run_fuse(cfg: FuseConfig, loop: LoopConfig | None = None) -> dict:
    """Fuse the sources into `cfg.output`; returns the report it writes to `cfg.report`.
    `loop` holds the pool targets' rule (its defaults when None)."""
    loop = loop or LoopConfig()
    remove_stale_temporaries(cfg.output)
    paths = {"real": cfg.clean, "augmented": cfg.augmented, "synthetic": cfg.pool}
    frames = {
        "real": read_meta(cfg.clean, optional=False),
        "augmented": read_meta(cfg.augmented, optional=False),
        "synthetic": read_meta(cfg.pool, optional=True),
    }
    if not len(frames["real"]):
        raise ValueError(f"fuse: {cfg.clean}: the clean train split has no rows")
    image = check_sizes(frames, paths)

    rows = pd.concat(
        [f.assign(kind=name, pos=np.arange(len(f))) for name, f in frames.items()],
        ignore_index=True,
    )
    rows["parent_id"] = rows["parent_id"].fillna("")
    inputs = rows["kind"].value_counts()
    duplicate = rows.duplicated("id", keep="first")  # rows are in priority order

    feedback = read_feedback(cfg.feedback)
    rejected, problems = check_feedback(feedback.rows, set(rows["id"]))
    by_feedback = descendants_mask(rows["id"], rows["parent_id"], rejected) & ~duplicate
    direct = by_feedback & rows["id"].isin(rejected)

    alive = ~duplicate & ~by_feedback
    # The clean train split's rows per class, as promotion counts them (clean.json), so the
    # synthetic cap is the pool's own target.
    real_rows = frames["real"]["label"].value_counts()
    targets = pool_targets(
        {c: int(real_rows.get(c, 0)) for c in sorted(set(rows["label"]))},
        loop.target_per_class,
        loop.synthetic_multiple,
        read_requests(cfg.feedback)[0],
    )
    capped = pd.Series(False, index=rows.index)
    keys = rank_keys(rows["id"], cfg.seed)
    for label, group in rows[alive].groupby("label", sort=True):
        counts = group["kind"].value_counts()
        available = {s: int(counts.get(s, 0)) for s in SOURCES[1:]}
        if targets[label] is not None:
            available["synthetic"] = min(available["synthetic"], targets[label])
        caps = share_caps(int(counts.get("real", 0)), available, dict(cfg.max_share))
        for source, cap in caps.items():
            members = group.index[group["kind"] == source]
            order = members[np.argsort(keys[members].to_numpy(), kind="stable")]
            capped.loc[order[cap:]] = True
    keep = alive & ~capped

    with atomic_dir(cfg.output) as tmp, ShardWriter(tmp, IMAGE_SCHEMA, cfg.shard_rows) as out:
        for name in SOURCES:
            if not len(frames[name]):
                continue
            mask = keep[rows["kind"] == name].to_numpy()
            position = 0
            for batch in iter_batches(paths[name], columns=IMAGE_SCHEMA.names):
                chosen = batch.filter(mask[position : position + batch.num_rows])
                position += batch.num_rows
                for row in chosen.to_pylist():
                    row["split"] = "train"
                    if name != "real":
                        row["source"] = name
                    out.append(row)

    def per_kind(mask: pd.Series) -> dict[str, int]:
        counts = rows.loc[mask, "kind"].value_counts()
        return {s: int(counts.get(s, 0)) for s in SOURCES}

    labels = sorted(set(rows.loc[~duplicate, "label"]))
    per_class = {}
    for label in labels:
        in_class = rows["label"] == label
        kept = per_kind(keep & in_class)
        dropped = per_kind(capped & in_class)
        per_class[label] = kept | {
            "total": sum(kept.values()),
            "synthetic_target": targets[label],
            "dropped_by_cap": {s: dropped[s] for s in SOURCES[1:]},
        }
    report = {
        "total": int(keep.sum()),
        "per_source": per_kind(keep),
        "per_class": per_class,
        "inputs": {s: int(inputs.get(s, 0)) for s in SOURCES},
        "dropped": {
            "duplicate_id": per_kind(duplicate),
            "feedback": per_kind(by_feedback),
            "cap": per_kind(capped),
        },
        "max_share": dict(cfg.max_share),
        "synthetic_target": {
            "target_per_class": loop.target_per_class,
            "synthetic_multiple": loop.synthetic_multiple,
        },
        "feedback": {
            "files": feedback.files,
            "rows": len(feedback.rows),
            "requests_ignored": _requests(feedback.rows),
            "applied": len(feedback.rows) - len(problems) - _requests(feedback.rows),
            "rejected_ids": len(rejected),
            "removed": {
                "direct": int(direct.sum()),
                "descendants": int((by_feedback & ~direct).sum()),
            },
            "problems": len(problems),
        },
        "problems": problems[:MAX_LISTED_PROBLEMS],
        "image": image,
    }
    for s in SOURCES:  # every input row is kept or dropped for exactly one reason
        dropped = sum(report["dropped"][reason][s] for reason in report["dropped"])
        assert report["inputs"][s] == report["per_source"][s] + dropped, (s, report)
    write_json(cfg.report, report)
    log.info(
        "fuse: %d rows %s; dropped %d duplicate, %d by feedback, %d by cap; "
        "%d feedback problem(s) -> %s",
        report["total"],
        report["per_source"],
        int(duplicate.sum()),
        int(by_feedback.sum()),
        int(capped.sum()),
        len(problems),
        cfg.output,
    )
    return report


def _requests(feedback: pd.DataFrame) -> int:
    if not len(feedback):
        return 0
    return int((feedback["verdict"].eq("") & feedback["request"].astype(bool)).sum())


def run_stage(params: Params) -> dict:
    return run_fuse(params.fuse, params.loop)
