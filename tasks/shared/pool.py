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
- The pool is bounded: a class stops growing at its target (`pool_targets`: `auto` fills the
  class's gap to the largest class, at most `loop.synthetic_multiple` times its real rows;
  `proportional` gives every class that multiple, the largest too) and the whole pool at
  `loop.max_pool_rows`. Fuse mixes in at most the same target
  per class, so the pool never holds rows fuse would not read while the targets stand.
- Which accepted rows a promotion takes is one pure function, `select_for_pool`; validate
  scores the same rows (tasks/validate/stage.py), so its verdict is about what the pool receives.
- A full class is refreshed, not frozen: `plan_refresh` pairs its oldest pooled rows (at
  most `loop.refresh_share` of its target a round) with new accepted rows of the class;
  validate scores the refreshed pool against the pool as it stands on the same seeds and
  keeps the refresh only when it scores at least as well. The promotion then writes the new
  rows and `retire_rows` moves the replaced ones into `retired/` (one shard per promotion);
  `loop.json` records which row replaced which.
- Retired shards (`synthloop pool retire`) live in `retired/`: fuse does not read them, but
  their ids still count as "already in the pool", so a retired row is never promoted again.
  The flow retires the whole live pool itself when the real data moved beyond
  `loop.drift_threshold`, and any live shard whose image size differs from the clean train
  split's (`live_sizes`): such rows came from other data, and fuse cannot mix them in.
- Shards named `part-rNNNN.parquet` come from the first naming scheme (round numbers only);
  `legacy_name` gives each a name in the current scheme that sorts before every new one.
"""

from __future__ import annotations

import re
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from math import ceil, floor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from synthloop.config import TargetRule
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
    target_per_class: TargetRule,
    synthetic_multiple: float,
    requests: dict[str, int] | None = None,
) -> dict[str, int | None]:
    """Per class, the most synthetic rows the pool keeps and fuse mixes in (None: no bound).

    `auto` fills each class's gap to the largest class, at most `synthetic_multiple` (m)
    times its own real training rows: min(floor(m * R), R_max - R) for a class with R rows
    when the largest has R_max. The short classes, the ones the loop is for, get the most;
    the largest class gets 0. `proportional` gives every class floor(m * R), the largest
    too: when only the short classes hold synthetic rows, a classifier can learn "looks
    synthetic, so it is a short class" and miss the short classes' real images
    (benchmarks/long_tail.py --pool). An integer is the same bound for every class; None: no
    per-class bound. Whatever the setting, a class without real training rows gets 0: the
    generator has nothing real of it to learn from. A person's request (`requests`, label ->
    extra rows, from data/feedback's `label,extra` rows) raises that class's target by the
    rows it asks for (`answer_requests` says whether it was met).
    """
    largest = max(train_per_class.values(), default=0)
    multiple = Fraction(str(synthetic_multiple))  # exact: 0.3 is 3/10, as fuse reads shares

    asked = requests or {}

    def target(c: str, real: int) -> int | None:
        if real <= 0:
            return 0
        if target_per_class is None:
            return None
        if target_per_class == "auto":
            base = max(0, min(floor(multiple * real), largest - real))
        elif target_per_class == "proportional":
            base = floor(multiple * real)
        else:
            base = int(target_per_class)
        return base + asked.get(c, 0)

    return {c: target(c, r) for c, r in train_per_class.items()}


def answer_requests(
    requests: dict[str, int],
    targets: dict[str, int | None],
    pooled: dict[str, int],
    disk_room: int | None,
    why_not: str | None = None,
) -> dict[str, dict]:
    """Per requested label: was it met (its class holds its raised target), and if not,
    why, in words: an unknown class, `why_not` (the gates failed: nothing was promoted), the
    pool at loop.max_pool_rows (`disk_room` 0), or too few accepted rows yet."""
    out = {}
    for label, extra in sorted(requests.items()):
        target = targets.get(label)
        held = pooled.get(label, 0)
        answer = {"asked": extra, "target": target, "pooled": held}
        if label not in targets:
            answer |= {"met": False, "why": f"unknown class {label!r} (not in the clean data)"}
        elif target is None or held >= target:
            answer |= {"met": True, "why": None}
        elif why_not:
            answer |= {"met": False, "why": why_not}
        elif disk_room == 0:
            answer |= {"met": False, "why": "the pool is at loop.max_pool_rows"}
        else:
            short = target - held
            answer |= {"met": False, "why": f"{short} rows short: too few accepted so far"}
        out[label] = answer
    return out


def describe_targets(target_per_class: TargetRule, synthetic_multiple: float) -> str:
    """`pool_targets`' rule in words, for reports."""
    if target_per_class == "auto":
        return (
            f"loop.target_per_class auto: min(floor({synthetic_multiple:g} x R), R_max - R) "
            "for a class of R real train rows, the largest holding R_max"
        )
    if target_per_class == "proportional":
        return (
            f"loop.target_per_class proportional: floor({synthetic_multiple:g} x R) for a "
            "class of R real train rows, every class alike"
        )
    if target_per_class is None:
        return "loop.target_per_class null: no per-class target"
    return f"loop.target_per_class: {int(target_per_class)} rows per class"


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


@dataclass(frozen=True)
class Selection:
    """The accepted rows a promotion takes, and why it leaves the others."""

    chosen: list[int]  # row positions in the accepted set, in its order
    already_in_pool: int  # ids the pool (retired shards included) or an earlier row holds
    over_target: int  # rows past their class's room or the pool's total room


def select_for_pool(
    ids: Sequence[str],
    labels: Sequence[str],
    known: set[str],
    room: dict[str, int | None],
    total_room: int | None,
) -> Selection:
    """The rows a promotion takes: in the rows' order, skip an id already `known` (or taken
    earlier), then take a row while its class has room (a class missing from `room`, or
    None, is unbounded) and the whole selection stays within `total_room` (None: unbounded).
    """
    seen = set(known)
    chosen: list[int] = []
    per_class: Counter[str] = Counter()
    duplicates = over = 0
    for position, (row_id, label) in enumerate(zip(ids, labels, strict=True)):
        if row_id in seen:
            duplicates += 1
            continue
        left = room.get(label)
        if (left is not None and per_class[label] >= left) or (
            total_room is not None and len(chosen) >= total_room
        ):
            over += 1
            continue
        seen.add(row_id)
        per_class[label] += 1
        chosen.append(position)
    return Selection(chosen, duplicates, over)


def pool_rows(pool: Path) -> list[tuple[str, str]]:
    """(id, label) of every live row, oldest first: shards in name order (their run's start,
    then round), rows in shard order."""
    rows: list[tuple[str, str]] = []
    for path in _shards(pool):
        table = pq.read_table(path, columns=["id", "label"]).to_pydict()
        rows += zip(table["id"], table["label"], strict=True)
    return rows


def plan_refresh(
    pooled: Sequence[tuple[str, str]],
    targets: dict[str, int | None],
    ids: Sequence[str],
    labels: Sequence[str],
    known: set[str],
    taken: Sequence[int],
    share: float,
) -> list[tuple[int, str]]:
    """Which new accepted rows would replace which pooled rows: (accepted position, pooled id).

    Only a class at its target (pooled rows >= target > 0) is refreshed: its oldest pooled
    rows (`pooled`, oldest first), at most ceil(`share` x target) of them, each by the next
    accepted row of the class in the accepted set's order whose id is new to the pool
    (`known`, retired shards included) and that promotion does not already take (`taken`).
    Whether the refresh happens is the utility verdict's call (tasks/validate/stage.py).
    """
    held: dict[str, list[str]] = {}
    for row_id, label in pooled:
        held.setdefault(label, []).append(row_id)
    quota = {
        c: min(len(held.get(c, [])), ceil(Fraction(str(share)) * t))
        for c, t in targets.items()
        if t and len(held.get(c, [])) >= t
    }
    skip = set(known) | {ids[i] for i in taken}
    pairs: list[tuple[int, str]] = []
    used: Counter[str] = Counter()
    for position, (row_id, label) in enumerate(zip(ids, labels, strict=True)):
        if row_id in skip or used[label] >= quota.get(label, 0):
            continue
        skip.add(row_id)
        pairs.append((position, held[label][used[label]]))
        used[label] += 1
    return pairs


def retire_rows(pool: Path, ids: set[str], key: str, round_no: int) -> dict:
    """Move live rows (by id) into one retired shard, `retired/<this promotion's shard
    name>`, and rewrite each live shard that held them without them (removed when emptied).

    Returns the shard written, the live shards rewritten and those emptied. The retired
    shard is written first: a crash part-way leaves a row live and retired at once (still
    known, so never promoted again), never lost. The caller versions every shard named.
    """
    pool = Path(pool)
    if not ids:
        return {"retired_shard": None, "rewritten": [], "emptied": []}
    kept_tables: dict[Path, pa.Table] = {}
    moved: list[pa.Table] = []
    wanted = pa.array(sorted(ids), pa.string())
    for path in _shards(pool):
        # The small id column first: only the shards that hold a row are read whole.
        held = pq.read_table(path, columns=["id"]).column("id")
        if not pc.any(pc.is_in(held, value_set=wanted)).as_py():
            continue
        table = pq.read_table(path)
        hit = pc.is_in(table.column("id"), value_set=wanted)
        moved.append(table.filter(hit))
        kept_tables[path] = table.filter(pc.invert(hit))
    found = sum(len(t) for t in moved)
    if found != len(ids):
        raise ValueError(
            f"{pool}: {len(ids) - found} of the {len(ids)} rows to retire are not live in the "
            "pool; the refresh was planned on another pool (rerun validate)"
        )
    target = pool / RETIRED / shard_name(key, round_no)
    target.parent.mkdir(exist_ok=True)
    if target.exists():
        raise FileExistsError(
            f"{target}: this run ({key}) already retired rows in round {round_no}"
        )
    with atomic_file(target) as tmp:
        pq.write_table(pa.concat_tables(moved, promote_options="permissive"), tmp)
    rewritten, emptied = [], []
    for path, table in kept_tables.items():
        if len(table):
            with atomic_file(path) as tmp:
                pq.write_table(table, tmp)
            rewritten.append(path.name)
        else:
            path.unlink()
            emptied.append(path.name)
    return {"retired_shard": target.name, "rewritten": rewritten, "emptied": emptied}


def promote(
    accepted: Path,
    pool: Path,
    key: str,
    round_no: int,
    family: str = "",
    room: dict[str, int | None] | None = None,
    total_room: int | None = None,
    replace: Sequence[tuple[str, str]] = (),
) -> dict:
    """Append the accepted rows that are new to the pool, within its room, as one shard.

    The rows are `select_for_pool`'s choice: `room` maps a class to the rows it may still
    gain (a class missing from it, or None, is unbounded); `total_room` bounds the whole
    shard. Rows past either are counted as `over_target` and left out, in the accepted set's
    order. `replace` ((new id, pooled id) pairs, `plan_refresh`'s choice once the verdict
    kept it) adds those new rows too, and the pooled rows they replace are retired
    (`retire_rows`; the caller versions the shards it names).
    """
    pool = Path(pool)
    pool.mkdir(parents=True, exist_ok=True)
    target = pool / shard_name(key, round_no)
    if target.exists():
        raise FileExistsError(
            f"{target}: this run ({key}) already promoted round {round_no}; a run key is "
            "made once per run, so another process is writing this pool"
        )
    meta = read_columns(accepted, ["id", "label"]).to_pydict()
    ids, labels = meta.get("id", []), meta.get("label", [])
    known = pool_ids(pool)
    replacing = {new: old for new, old in replace}
    stale = sorted(set(replacing) & known)
    if stale:
        raise ValueError(f"{pool}: replacement rows already in the pool: {stale[:5]}")
    # Replacements belong to full classes, which have no room: the rest are selected alone.
    rest = [i for i, row_id in enumerate(ids) if row_id not in replacing]
    selection = select_for_pool(
        [ids[i] for i in rest], [labels[i] for i in rest], known, dict(room or {}), total_room
    )
    chosen = {rest[j] for j in selection.chosen}
    chosen |= {i for i, row_id in enumerate(ids) if row_id in replacing}
    columns: dict[str, list] = {name: [] for name in POOL_SCHEMA.names}
    position = 0
    for batch in iter_batches(accepted, columns=IMAGE_SCHEMA.names):
        for row in batch.to_pylist():
            if position in chosen:
                for name in IMAGE_SCHEMA.names:
                    columns[name].append(row[name])
                columns["round"].append(round_no)
                columns["run"].append(key)
                columns["family"].append(family)
            position += 1
    promoted = len(columns["id"])
    missing = set(replacing) - set(columns["id"])
    if missing:
        raise ValueError(
            f"{accepted}: replacement rows not among the accepted: {sorted(missing)[:5]}"
        )
    if promoted:
        with atomic_file(target) as tmp:
            pq.write_table(pa.table(columns, schema=POOL_SCHEMA), tmp)
    # After the new shard: a crash between the two leaves both rows live, none lost.
    retired = retire_rows(pool, set(replacing.values()), key, round_no)
    label_of = dict(zip(ids, labels, strict=True))
    return {
        "run": key,
        "round": round_no,
        "family": family,
        "promoted": promoted,
        "replaced": len(replacing),
        "already_in_pool": selection.already_in_pool,
        "over_target": selection.over_target,
        "per_class": dict(sorted(Counter(columns["label"]).items())),
        "shard": target.name if promoted else None,
        # which pooled row each new one replaced, per class: restorable from retired/
        "replacements": {
            c: [[new, old] for new, old in replace if label_of[new] == c]
            for c in sorted({label_of[new] for new, _ in replace})
        },
        **retired,
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
