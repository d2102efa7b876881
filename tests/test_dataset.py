"""ShardWriter: rows given as Arrow record batches make the same files as rows given one by
one (the clean stage's pass 2 writes batches; every other stage writes rows)."""

from pathlib import Path

import pyarrow as pa
import pytest

from synthloop.dataset import IMAGE_SCHEMA, ShardWriter


def rows(n: int) -> list[dict]:
    return [
        {
            "id": f"{i:04x}",
            "label": str(i % 3),
            "split": "train",
            "source": "s",
            "parent_id": None if i % 2 else "p",
            "image": bytes([i % 256]) * (i % 7),
            "height": 8,
            "width": 8,
            "channels": 1,
            "path": f"f{i}.png",
        }
        for i in range(n)
    ]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("part-*.parquet"))}


@pytest.mark.parametrize("sizes", [[23], [5, 5, 5, 8], [1] * 23, [10, 0, 13]])
def test_batches_write_the_same_shards_as_rows(tmp_path, sizes):
    data = rows(sum(sizes))
    with ShardWriter(tmp_path / "rows", IMAGE_SCHEMA, shard_rows=7) as out:
        for row in data:
            out.append(row)
    with ShardWriter(tmp_path / "batches", IMAGE_SCHEMA, shard_rows=7) as out:
        start = 0
        for size in sizes:
            part = data[start : start + size]
            out.write_batch(pa.RecordBatch.from_pylist(part, schema=IMAGE_SCHEMA))
            start += size
    expected = files(tmp_path / "rows")
    assert len(expected) == 4  # 23 rows in shards of 7: 7, 7, 7, 2
    assert files(tmp_path / "batches") == expected


def test_rows_and_batches_mixed_keep_their_order(tmp_path):
    data = rows(20)
    with ShardWriter(tmp_path / "rows", IMAGE_SCHEMA, shard_rows=6) as out:
        for row in data:
            out.append(row)
    with ShardWriter(tmp_path / "mixed", IMAGE_SCHEMA, shard_rows=6) as out:
        out.append(data[0])
        out.write_batch(pa.RecordBatch.from_pylist(data[1:4], schema=IMAGE_SCHEMA))
        for row in data[4:9]:
            out.append(row)
        out.write_batch(pa.RecordBatch.from_pylist(data[9:20], schema=IMAGE_SCHEMA))
        assert out.shards == 3 and out.rows == 18
    assert files(tmp_path / "mixed") == files(tmp_path / "rows")
