"""The accepted-synthetic pool (`data/pool/`): what the loop keeps, night after night.

- A promotion appends one Parquet shard of accepted rows not already in the pool, named
  `part-<run key>-r<round>.parquet`. The run key is the run's UTC start time plus a token of
  its id (`20261130T020000Z-3f2a9c1b`), so names are unique across runs and machines and
  sort in the order the runs started. Each row records its run, round and generator family.
- The shard is written to a temporary name and renamed into place: a crash mid-promotion
  leaves the previous pool. The flow then versions it with `dvc add` (one `.dvc` file per
  shard) and checks every shard against its recorded hash before the pool is used again.
- A process killed between the rename and `dvc add` leaves an orphan: a complete shard
  without a `.dvc` record (`pool_orphans`). The next run adopts it
  (`flows.pool_admin.adopt_orphans`) before it reads the pool; its rows passed the gates.
- The pool is bounded: a class stops growing at its target (`loop.target_per_class`;
  `auto` is what fuse can mix in for that class) and the whole pool at `loop.max_pool_rows`.
- Retired shards (`synthloop pool retire`) live in `retired/`: fuse does not read them, but
  their ids still count as "already in the pool", so a retired row is never promoted again.
  The flow retires the whole live pool itself when the real data moved beyond
  `loop.drift_threshold`, and any live shard whose image size differs from the clean train
  split's (`live_sizes`): such rows came from other data, and fuse cannot mix them in.
- Shards named `part-rNNNN.parquet` come from the first naming scheme (round numbers only);
  `legacy_name` gives each a name in the current scheme that sorts before every new one.
"""

from __future__ import annotations

import math
import re
import secrets
from collections import Counter
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from synthloop.dataset import (
    IMAGE_SCHEMA,
    atomic_file,
    file_hash,
    iter_batches,
    read_columns,
    shard_paths,
)

POOL_SCHEMA = IMAGE_SCHEMA.append(pa.field("round", pa.int32()))
POOL_SCHEMA = POOL_SCHEMA.append(pa.field("run", pa.string()))
POOL_SCHEMA = POOL_SCHEMA.append(pa.field("family", pa.string()))
RETIRED = "retired"
_LEGACY = re.compile(r"^part-r(\d{4})\.parquet$")
_NAME = re.compile(r"^part-(?P<run>\d{8}T\d{6}Z-[0-9a-z]+)-r(?P<round>\d+)\.parquet$")


class PoolCorrupt(RuntimeError):
    """A pool shard no longer matches the hash DVC recorded for it."""


def run_key(started: datetime, token: str | None = None) -> str:
    """`YYYYmmddTHHMMSSZ-<token>`: the run's UTC start and 8 characters of its id."""
    token = (token or secrets.token_hex(4)).replace("-", "")[:8].lower()
    return f"{started.strftime('%Y%m%dT%H%M%SZ')}-{token}"


def shard_name(key: str, round_no: int) -> str:
    return f"part-{key}-r{round_no:02d}.parquet"


def legacy_name(name: str) -> str | None:
    """The current-scheme name of a `part-rNNNN.parquet` shard (None: not a legacy name)."""
    match = _LEGACY.match(name)
    return shard_name("00000000T000000Z-legacy", int(match[1])) if match else None


def _shards(pool: Path, retired: bool = False) -> list[Path]:
    pool = Path(pool)
    found = shard_paths(pool) if pool.is_dir() else []
    if retired and (pool / RETIRED).is_dir():
        found += shard_paths(pool / RETIRED)
    return found


def pool_ids(pool: Path) -> set[str]:
    """Ids of every row in the pool, retired shards included."""
    ids: set[str] = set()
    for path in _shards(pool, retired=True):
        ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


def pool_counts(pool: Path) -> dict[str, int]:
    """Rows per class in the live pool (what fuse reads)."""
    counts: Counter[str] = Counter()
    for path in _shards(pool):
        counts.update(pq.read_table(path, columns=["label"]).column("label").to_pylist())
    return dict(sorted(counts.items()))


Size = tuple[int, int, int]  # height, width, channels
_SIZE_COLUMNS = ["height", "width", "channels"]


def _sizes(table: pa.Table) -> set[Size]:
    rows = table.to_pydict()
    return set(zip(*(rows.get(c, []) for c in _SIZE_COLUMNS), strict=True))


def image_sizes(directory: Path) -> set[Size]:
    """Every (height, width, channels) among a dataset's rows, read from its small columns."""
    return _sizes(read_columns(directory, _SIZE_COLUMNS))


def live_sizes(pool: Path) -> dict[str, set[Size]]:
    """Per live shard, the (height, width, channels) of its rows: fuse reads one size only."""
    return {p.name: _sizes(pq.read_table(p, columns=_SIZE_COLUMNS)) for p in _shards(pool)}


def describe_sizes(sizes: set[Size]) -> str:
    return ", ".join(f"{h}x{w} with {c} channel(s)" for h, w, c in sorted(sizes)) or "no rows"


def pool_targets(
    train_per_class: dict[str, int],
    target_per_class: int | str | None,
    max_share: dict[str, float],
) -> dict[str, int | None]:
    """Per class, the most pooled rows worth keeping (None: no per-class bound).

    `auto` is what fuse can mix in: with shares summing below 1, fuse keeps at most
    share_synthetic * R / (1 - sum of shares) synthetic rows of a class with R real rows, so
    more would never be read. Without that bound (no synthetic share, or shares summing to
    1 or more), `auto` is R: as many synthetic rows as real ones.
    """
    if target_per_class is None:
        return dict.fromkeys(train_per_class)
    if target_per_class != "auto":
        return dict.fromkeys(train_per_class, int(target_per_class))
    share = max_share.get("synthetic")
    total = sum(max_share.values())
    if share is None or total >= 1:
        return dict(train_per_class)
    return {c: math.ceil(share * r / (1 - total)) for c, r in train_per_class.items()}


def pool_room(
    counts: dict[str, int], targets: dict[str, int | None], max_rows: int | None
) -> tuple[dict[str, int | None], int | None]:
    """Rows each class may still gain (None: unbounded), and the whole pool."""
    per_class = {c: None if t is None else max(0, t - counts.get(c, 0)) for c, t in targets.items()}
    total = None if max_rows is None else max(0, max_rows - sum(counts.values()))
    return per_class, total


def pool_full(counts: dict[str, int], targets: dict[str, int | None], max_rows: int | None) -> bool:
    per_class, total = pool_room(counts, targets, max_rows)
    if total == 0:
        return True
    return bool(per_class) and all(room == 0 for room in per_class.values())


def promote(
    accepted: Path,
    pool: Path,
    key: str,
    round_no: int,
    family: str = "",
    room: dict[str, int | None] | None = None,
    total_room: int | None = None,
) -> dict:
    """Append the accepted rows that are new to the pool, within its room, as one shard.

    `room` maps a class to the rows it may still gain (a class missing from it, or None, is
    unbounded); `total_room` bounds the whole shard. Rows past either are counted as
    `over_target` and left out, in the accepted set's order.
    """
    pool = Path(pool)
    pool.mkdir(parents=True, exist_ok=True)
    known = pool_ids(pool)
    target = pool / shard_name(key, round_no)
    if target.exists():
        raise FileExistsError(
            f"{target}: this run ({key}) already promoted round {round_no}; a run key is "
            "made once per run, so another process is writing this pool"
        )
    room = dict(room or {})
    columns: dict[str, list] = {name: [] for name in POOL_SCHEMA.names}
    duplicates = over = 0
    per_class: Counter[str] = Counter()
    for batch in iter_batches(accepted, columns=IMAGE_SCHEMA.names):
        for row in batch.to_pylist():
            if row["id"] in known:
                duplicates += 1
                continue
            label = row["label"]
            left = room.get(label)
            if (left is not None and per_class[label] >= left) or (
                total_room is not None and len(columns["id"]) >= total_room
            ):
                over += 1
                continue
            known.add(row["id"])
            per_class[label] += 1
            for name in IMAGE_SCHEMA.names:
                columns[name].append(row[name])
            columns["round"].append(round_no)
            columns["run"].append(key)
            columns["family"].append(family)
    promoted = len(columns["id"])
    if promoted:
        with atomic_file(target) as tmp:
            pq.write_table(pa.table(columns, schema=POOL_SCHEMA), tmp)
    return {
        "run": key,
        "round": round_no,
        "family": family,
        "promoted": promoted,
        "already_in_pool": duplicates,
        "over_target": over,
        "per_class": dict(sorted(per_class.items())),
        "shard": target.name if promoted else None,
    }


def describe_pool(pool: Path) -> list[dict]:
    """One entry per shard, live then retired: its rows per class, run, round and family."""
    entries = []
    for path in _shards(pool, retired=True):
        names = pq.read_schema(path).names
        wanted = [c for c in ("label", "run", "round", "family") if c in names]
        table = pq.read_table(path, columns=wanted).to_pydict()
        match = _NAME.match(path.name)
        legacy = _LEGACY.match(path.name)
        entries.append(
            {
                "shard": path.name,
                "retired": path.parent.name == RETIRED,
                "rows": len(table["label"]),
                "per_class": dict(sorted(Counter(table["label"]).items())),
                "run": _first(table, "run") or (match["run"] if match else "legacy"),
                "round": _first(table, "round")
                or (int(match["round"]) if match else int(legacy[1]) if legacy else None),
                "family": _first(table, "family") or "unknown",
            }
        )
    return entries


def _first(table: dict[str, list], column: str) -> object:
    """A shard's value of a per-shard column (None: an older shard without it)."""
    values = table.get(column)
    return values[0] if values else None


def pool_orphans(pool: Path) -> list[Path]:
    """Live shards without a `.dvc` record, and temporaries a killed promotion left."""
    pool = Path(pool)
    if not pool.is_dir():
        return []
    untracked = [p for p in _shards(pool) if not Path(f"{p}.dvc").is_file()]
    return untracked + sorted(pool.glob(".part-*.parquet.tmp-*"))


def is_pool_shard(path: Path) -> bool:
    """Whether a file reads as a complete pool shard: a Parquet footer and the image columns
    (older shards lack the run and family columns; they are still shards)."""
    try:
        return set(IMAGE_SCHEMA.names) <= set(pq.read_schema(path).names)
    except (OSError, pa.ArrowInvalid):
        return False


def verify_pool(pool: Path) -> int:
    """Check every live shard that has a `.dvc` record against its md5; returns shards
    checked."""
    checked = 0
    for record in sorted(Path(pool).glob("part-*.parquet.dvc")):
        out = yaml.safe_load(record.read_text())["outs"][0]
        shard = record.with_suffix("")
        if not shard.exists():
            raise PoolCorrupt(f"{shard}: missing (run `dvc checkout {record}` or `dvc pull`)")
        if file_hash(shard, algorithm="md5") != out["md5"]:
            raise PoolCorrupt(
                f"{shard}: its hash differs from the one recorded in {record.name}; the pool is "
                "corrupt or was edited by hand. Restore it with `dvc checkout "
                f"{record}` before running again."
            )
        checked += 1
    return checked
