"""The accepted-synthetic pool (`data/pool/`): what the loop keeps.

Each promotion appends one Parquet shard of accepted rows not already in the pool, written
to a temporary name and renamed into place, so a crash mid-promotion leaves the previous
pool. The flow then versions the new shard with `dvc add` (one `.dvc` file per round), and
checks every shard against its recorded hash before the pool is used again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from synthloop.dataset import IMAGE_SCHEMA, iter_batches, read_columns, shard_paths

POOL_SCHEMA = IMAGE_SCHEMA.append(pa.field("round", pa.int32()))


class PoolCorrupt(RuntimeError):
    """A pool shard no longer matches the hash DVC recorded for it."""


def pool_ids(pool: Path) -> set[str]:
    if not Path(pool).is_dir() or not shard_paths(pool):
        return set()
    return set(read_columns(pool, ["id"]).column("id").to_pylist())


def pool_counts(pool: Path) -> dict[str, int]:
    if not Path(pool).is_dir() or not shard_paths(pool):
        return {}
    labels = read_columns(pool, ["label"]).column("label").to_pylist()
    return dict(sorted(Counter(labels).items()))


def promote(accepted: Path, pool: Path, round_no: int) -> dict:
    """Append the accepted rows that are new to the pool as `part-rNNNN.parquet`."""
    pool = Path(pool)
    pool.mkdir(parents=True, exist_ok=True)
    known = pool_ids(pool)
    target = pool / f"part-r{round_no:04d}.parquet"
    if target.exists():
        raise FileExistsError(f"{target}: round {round_no} was already promoted")
    columns: dict[str, list] = {name: [] for name in POOL_SCHEMA.names}
    duplicates = 0
    per_class: Counter[str] = Counter()
    for batch in iter_batches(accepted, columns=IMAGE_SCHEMA.names):
        for row in batch.to_pylist():
            if row["id"] in known:
                duplicates += 1
                continue
            known.add(row["id"])
            per_class[row["label"]] += 1
            for name in IMAGE_SCHEMA.names:
                columns[name].append(row[name])
            columns["round"].append(round_no)
    promoted = len(columns["id"])
    if promoted:
        fd, tmp = tempfile.mkstemp(prefix=".promote-", suffix=".tmp", dir=pool)
        os.close(fd)
        try:
            pq.write_table(pa.table(columns, schema=POOL_SCHEMA), tmp)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return {
        "round": round_no,
        "promoted": promoted,
        "already_in_pool": duplicates,
        "per_class": dict(sorted(per_class.items())),
        "shard": target.name if promoted else None,
    }


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_pool(pool: Path) -> int:
    """Check every shard that has a `.dvc` record against its md5; returns shards checked."""
    checked = 0
    for record in sorted(Path(pool).glob("part-*.parquet.dvc")):
        out = yaml.safe_load(record.read_text())["outs"][0]
        shard = record.with_suffix("")
        if not shard.exists():
            raise PoolCorrupt(f"{shard}: missing (run `dvc checkout {record}` or `dvc pull`)")
        if file_md5(shard) != out["md5"]:
            raise PoolCorrupt(
                f"{shard}: its hash differs from the one recorded in {record.name}; the pool is "
                "corrupt or was edited by hand. Restore it with `dvc checkout "
                f"{record}` before running again."
            )
        checked += 1
    return checked
